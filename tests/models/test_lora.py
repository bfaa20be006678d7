"""LoRA as a parameter-tree transform: identity at init, merge == apply, unmerge, PiSSA, DoRA,
QLoRA on quantized bases, scanned layers and einsum-shaped kernels, and errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxseed import kernels
from flaxseed import models
from flaxseed.models import lora
from flaxseed.models import quantize

ALL = r".*(attn|mlp)/\w+/kernel"  # q, k, v, o ([H, E, D]: two input axes), gate, up, down
TOKENS = jax.random.randint(jax.random.key(1), (2, 16), 0, 256)


def _model(name, **kw):
  model = models.get(name, **kw)
  return model, model.init(jax.random.key(0), TOKENS)["params"]


def _nonzero(adapters, seed=3):
  """Adapters with every B (and magnitude) perturbed, so the adapter changes the model."""
  leaves, tree = jax.tree.flatten(nn.unbox(adapters))
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(
    tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  )


MODELS = [
  ("transformer-tiny", dict(num_layers=2)),
  ("transformer-tiny", dict(num_layers=2, scan_layers=True)),
  ("titans-mac-tiny", dict(num_layers=1)),
  ("diffusion-lm-tiny", dict(num_layers=2)),
]
CONFIGS = [
  lora.LoraConfig(rank=4, alpha=8, targets=ALL, variant=v, init=i)
  for v, i in (("lora", "default"), ("rslora", "default"), ("dora", "default"), ("lora", "pissa"))
]


# Every variant on the scanned transformer; the unrolled one, Titans and the diffusion LM with
# the variants whose shapes differ (plain and DoRA; PiSSA's residual).
CASES = [(MODELS[1], c) for c in CONFIGS] + [
  (MODELS[0], CONFIGS[0]),
  (MODELS[0], CONFIGS[2]),
  (MODELS[2], CONFIGS[2]),
  (MODELS[3], CONFIGS[3]),
]


@pytest.mark.parametrize(
  "model_kw,cfg",
  CASES,
  ids=lambda x: x[0] + str(x[1]) if isinstance(x, tuple) else f"{x.variant}-{x.init}",
)
def test_fresh_adapter_is_the_identity_and_merge_equals_apply(model_kw, cfg):
  name, kw = model_kw
  model, params = _model(name, **kw)
  want = model.apply({"params": params}, TOKENS)
  adapters = lora.init(jax.random.key(2), params, cfg)
  # PiSSA moves the principal part of W into the adapter: the model runs on the residual.
  base = lora.unmerge(params, adapters, cfg) if cfg.init == "pissa" else params
  np.testing.assert_allclose(lora.apply(model, base, adapters, cfg, TOKENS), want, atol=1e-5)
  trained = _nonzero(adapters)
  got = lora.apply(model, base, trained, cfg, TOKENS)
  assert float(jnp.abs(got - want).max()) > 1e-3  # the adapter does something
  merged = lora.merge(base, trained, cfg)
  assert jax.tree.structure(merged) == jax.tree.structure(nn.unbox(params))
  np.testing.assert_allclose(model.apply({"params": merged}, TOKENS), got, atol=1e-5)
  if cfg.variant != "dora":
    restored = lora.unmerge(merged, trained, cfg)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(nn.unbox(base))):
      np.testing.assert_allclose(a, b, atol=1e-5)


def test_scales_and_dora_against_the_formulas():
  w = jax.random.normal(jax.random.key(0), (6, 5))
  x = jax.random.normal(jax.random.key(1), (3, 6))
  a = jax.random.normal(jax.random.key(2), (6, 4))
  b = jax.random.normal(jax.random.key(3), (4, 5))
  assert lora.LoraConfig(rank=4, alpha=16).scale == 4.0
  assert lora.LoraConfig(rank=4, alpha=16, variant="rslora").scale == 8.0
  m = jnp.arange(1.0, 6.0)
  weight = lora.LoraWeight(base=w, a=a, b=b, magnitude=m, scale=0.5)
  v = w + 0.5 * a @ b
  # peft: m * (W + sBA) / ||W + sBA||_col
  want = x @ (v / jnp.linalg.norm(v, axis=0)[None] * m[None])
  np.testing.assert_allclose(weight.lora_matmul(x, lambda z: z @ w, lambda: w), want, rtol=1e-5)
  # DoRA's magnitude starts at the base's column norms, so a fresh DoRA adapter is the identity.
  params = {"layer": {"kernel": w}}
  fresh = lora.init(
    jax.random.key(4), params, lora.LoraConfig(rank=2, targets=".*kernel", variant="dora")
  )
  np.testing.assert_allclose(fresh["layer"]["kernel"]["magnitude"], jnp.linalg.norm(w, axis=0))


def test_pissa_takes_the_principal_components():
  model, params = _model("transformer-tiny", num_layers=1)
  cfg = lora.LoraConfig(rank=4, alpha=8, targets=r".*mlp/up/kernel", init="pissa")
  adapters = lora.init(jax.random.key(0), params, cfg)
  w = nn.unbox(params)["layers_0"]["mlp"]["up"]["kernel"]
  entry = nn.unbox(adapters)["layers_0"]["mlp"]["up"]["kernel"]
  u, s, vt = np.linalg.svd(np.asarray(w))
  np.testing.assert_allclose(
    cfg.scale * entry["a"] @ entry["b"], (u[:, :4] * s[:4]) @ vt[:4], atol=1e-5
  )
  residual = lora.unmerge(params, adapters, cfg)["layers_0"]["mlp"]["up"]["kernel"]
  np.testing.assert_allclose(
    np.linalg.svd(np.asarray(residual), compute_uv=False)[:-4], s[4:], atol=1e-4
  )  # what is left: the other singular values
  del model


@pytest.mark.parametrize("fmt,group", [("int8", None), ("int4", 32), ("nf4", 32)])
def test_qlora_adds_to_the_quantized_matmul(fmt, group):
  model, params = _model("transformer-tiny", num_layers=2, scan_layers=True)
  qparams = quantize.quantize_params(params, fmt=fmt, group_size=group)
  cfg = lora.LoraConfig(rank=4, alpha=8, targets=ALL)
  adapters = _nonzero(lora.init(jax.random.key(2), params, cfg))
  got = lora.apply(model, qparams, adapters, cfg, TOKENS)
  # The same adapters on the dequantized float weights.
  dequantized = jax.tree.map(
    lambda q, p: (
      kernels.dequantize_weight(q).reshape(p.shape) if isinstance(q, kernels.QuantizedWeight) else p
    ),
    qparams,
    nn.unbox(params),
    is_leaf=lambda x: isinstance(x, kernels.QuantizedWeight),
  )
  np.testing.assert_allclose(
    got, lora.apply(model, dequantized, adapters, cfg, TOKENS), atol=2e-4, rtol=2e-4
  )

  def loss(adapters):
    return lora.apply(model, qparams, adapters, cfg, TOKENS).astype(jnp.float32).std()

  grads = jax.grad(loss)(adapters)
  # Every adapter gets a gradient, the first layer's too (through the quantized matmuls above).
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert float(jnp.abs(g).max()) > 0, path


def test_adapters_carry_the_base_weights_axis_names():
  _, params = _model("transformer-tiny", num_layers=2, scan_layers=True)
  adapters = lora.init(jax.random.key(0), params, lora.LoraConfig(targets=ALL, variant="dora"))
  attn = adapters["layers"]["attn"]
  assert attn["q"]["kernel"]["a"].names == ("layers", "embed", None)
  assert attn["q"]["kernel"]["b"].names == ("layers", None, "heads")
  assert attn["o"]["kernel"]["a"].names == ("layers", "heads", None)  # [H * E, r]
  assert attn["o"]["kernel"]["b"].names == ("layers", None, "embed")
  assert attn["o"]["kernel"]["magnitude"].names == ("layers", "embed")
  assert attn["q"]["kernel"]["a"].value.shape == (2, 128, 8)
  assert lora.num_params(adapters) < 0.1 * sum(x.size for x in jax.tree.leaves(nn.unbox(params)))


def test_errors():
  _, params = _model("transformer-tiny", num_layers=1)
  with pytest.raises(ValueError, match=r"(?s)matches no parameter.*layers_0/attn/q/kernel"):
    lora.init(jax.random.key(0), params, lora.LoraConfig(targets=r".*nothing.*"))
  with pytest.raises(ValueError, match="rank=200 exceeds.*layers_0/attn/q/kernel"):
    lora.init(jax.random.key(0), params, lora.LoraConfig(rank=200, targets=r".*attn/q/kernel"))
  for bad, match in (
    (dict(rank=0), "rank"),
    (dict(variant="vera"), "variant"),
    (dict(init="eva"), "init"),
    (dict(targets="("), "targets"),
  ):
    with pytest.raises(ValueError, match=match):
      lora.LoraConfig(**bad)
  cfg = lora.LoraConfig(targets=r".*attn/q/kernel", variant="dora")
  adapters = lora.init(jax.random.key(0), params, cfg)
  with pytest.raises(ValueError, match="dora.*cannot be unmerged"):
    lora.unmerge(params, adapters, cfg)


@pytest.mark.parametrize("alpha", [float("nan"), float("inf")])
def test_nan_and_inf_alpha_are_refused(alpha):
  with pytest.raises(ValueError, match=f"alpha={alpha} must be positive and finite"):
    lora.LoraConfig(alpha=alpha)  # NaN passed `alpha <= 0`
