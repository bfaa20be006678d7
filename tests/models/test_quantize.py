"""Post-training quantization of zoo models: the same model class runs quantized weights."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxseed import kernels
from flaxseed.models import params as params_lib
from flaxseed.models import quantize
from flaxseed.models import transformer

CFG = transformer.TransformerConfig(
  d_model=128, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=256
)


@pytest.fixture(scope="module")
def model_and_params():
  model = transformer.Transformer(CFG)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  return model, params


@pytest.mark.parametrize(
  "fmt,group", [("int8", None), ("int4", 128), ("nf4", 64), ("ternary", None)]
)
def test_quantized_model_matches_dequantized_weights(model_and_params, fmt, group):
  model, params = model_and_params
  qparams = quantize.quantize_params(params, fmt=fmt, group_size=group)
  quantized = [p for p, leaf in _leaves(qparams) if isinstance(leaf, kernels.QuantizedWeight)]
  assert len(quantized) == 7  # q, k, v, o, gate, up, down, each stacked over the scanned layers
  assert all("attn" in p or "mlp" in p for p in quantized)
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 256)
  got = model.apply({"params": qparams}, tokens)
  # The same network with each quantized kernel replaced by its dequantized float weight.
  dequantized = jax.tree.map(
    lambda q, p: (
      kernels.dequantize_weight(q).reshape(p.shape) if isinstance(q, kernels.QuantizedWeight) else p
    ),
    qparams,
    params,
    is_leaf=lambda x: isinstance(x, kernels.QuantizedWeight),
  )
  want = model.apply({"params": dequantized}, tokens)
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=2e-4)
  assert quantize.weight_bytes(qparams) < quantize.weight_bytes(params)


def test_logit_error_shrinks_with_bits_and_group_size(model_and_params):
  model, params = model_and_params
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 256)
  full = model.apply({"params": params}, tokens)

  def error(fmt, group):
    q = model.apply({"params": quantize.quantize_params(params, fmt=fmt, group_size=group)}, tokens)
    return float(jnp.sqrt(jnp.mean((q - full) ** 2)))

  int8, int4_g32, int4_g128 = error("int8", None), error("int4", 32), error("int4", 128)
  assert 0 < int8 < 0.1 * int4_g32  # 16x finer steps (127 vs 7 levels a side)
  assert int4_g32 < int4_g128  # smaller groups, smaller absmax per scale


def _leaves(params):
  return [
    (params_lib.path_string(kp), leaf)
    for kp, leaf in jax.tree_util.tree_leaves_with_path(
      params, is_leaf=lambda x: isinstance(x, kernels.QuantizedWeight)
    )
  ]


def test_unmatched_targets_list_the_paths(model_and_params):
  _, params = model_and_params
  with pytest.raises(ValueError, match=r"matches no parameter; the paths are:\n.*embed/embedding"):
    quantize.quantize_params(params, targets=r".*nothing.*")


def test_unquantizable_weight_is_named():
  params = {"layers": {"mlp": {"down": {"kernel": jnp.zeros((2, 96, 64))}}}}
  with pytest.raises(
    ValueError,
    match=r"cannot quantize layers/mlp/down/kernel .*as 1 stacked "
    r"\[96, 64\].*group_size=64 must divide the contraction dim K=96",
  ):
    quantize.quantize_params(params, fmt="int4", group_size=64)


def test_bitnet_qat_model_exports_to_packed_ternary_exactly():
  """A ``quant="ternary"`` model computes the same logits from its float weights (quantized on
  the fly) as from the packed ternary export served by the quantized matmul."""
  cfg = transformer.TransformerConfig(
    d_model=64, num_layers=2, num_heads=4, mlp_dim=128, quant="ternary"
  )
  model = transformer.Transformer(cfg)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 256)
  qat = model.apply({"params": params}, tokens)
  exported = quantize.quantize_params(params, fmt="ternary")
  np.testing.assert_allclose(model.apply({"params": exported}, tokens), qat, atol=1e-4, rtol=1e-4)
  # The float model (no quantization) computes something else.
  float_model = transformer.Transformer(
    transformer.TransformerConfig(d_model=64, num_layers=2, num_heads=4, mlp_dim=128)
  )
  assert not np.allclose(float_model.apply({"params": params}, tokens), qat, atol=1e-2)
  assert quantize.weight_bytes(exported) < quantize.weight_bytes(params) / 3


def test_straight_through_estimators_pass_gradients_unchanged():
  from flaxseed.models import layers  # pylint: disable=g-import-not-at-top

  w = jax.random.normal(jax.random.key(0), (32, 16))
  c = jax.random.normal(jax.random.key(1), (32, 16))
  ternary = layers.ternary_ste(w)
  scale = float(jnp.mean(jnp.abs(w)))
  assert set(np.unique(np.round(np.asarray(ternary) / scale, 5))) <= {-1.0, 0.0, 1.0}
  np.testing.assert_allclose(jax.grad(lambda w: jnp.sum(layers.ternary_ste(w) * c))(w), c)
  x = jax.random.normal(jax.random.key(2), (4, 32))
  q = layers.int8_absmax_ste(x)
  steps = np.asarray(q) / (np.abs(np.asarray(x)).max(-1, keepdims=True) / 127)
  np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)  # on the int8 grid
  np.testing.assert_allclose(
    jax.grad(lambda x: jnp.sum(layers.int8_absmax_ste(x) * x))(x), q + x, atol=1e-6
  )  # d/dx [q(x) x] with dq/dx = 1
