"""One-shot pruning (``models/prune.py``): exact per-row sparsity and N:M patterns, zero sparsity is
the identity, SparseGPT reconstructs its calibration outputs better than Wanda, block order."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxseed.models import params as params_lib
from flaxseed.models import prune
from flaxseed.models import transformer

CFG = dict(d_model=32, num_layers=2, num_heads=2, mlp_dim=64, scan_layers=False)


@pytest.fixture(scope="module")
def model_and_params():
  model = transformer.Transformer(transformer.TransformerConfig(**CFG))
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  tokens = np.random.default_rng(0).integers(0, 256, (8, 24)).astype(np.int32)
  return model, params, tokens


def _inputs(rng, n=512, width=64):
  """Correlated calibration inputs with a few large channels (what makes the methods differ)."""
  x = rng.normal(size=(n, width)) @ rng.normal(size=(width, width)) / math.sqrt(width)
  x[:, :4] *= 8.0
  return x


@pytest.mark.parametrize("method", prune.METHODS)
@pytest.mark.parametrize("sparsity,nm", [(0.5, None), (0.3, None), (0.0, (2, 4)), (0.0, (4, 8))])
def test_exact_sparsity_per_row_and_n_of_m(method, sparsity, nm):
  rng = np.random.default_rng(1)
  w = rng.normal(size=(64, 48))  # [in, out]
  x = _inputs(rng)
  stats = {"sq": (x**2).sum(0), "xtx": x.T @ x}
  pruned, keep = prune.prune_matrix(w, method, sparsity, nm, stats)
  assert keep.shape == w.shape and keep.dtype == bool
  np.testing.assert_array_equal(pruned[~keep], 0.0)
  if nm is not None:
    n, m = nm
    per_group = keep.T.reshape(48, 64 // m, m).sum(-1)  # per output unit, per group of inputs
    np.testing.assert_array_equal(per_group, n)
  elif method == "magnitude":  # per matrix: the total is exact, rows vary
    assert (~keep).sum() == math.floor(sparsity * w.size)
  else:
    np.testing.assert_array_equal((~keep).sum(0), math.floor(sparsity * 64))
  if method != "sparsegpt":  # only SparseGPT updates the weights it keeps
    np.testing.assert_array_equal(pruned[keep], w[keep])


@pytest.mark.parametrize("method", prune.METHODS)
def test_zero_sparsity_is_the_identity(model_and_params, method):
  model, params, tokens = model_and_params
  out, masks = prune.prune(model, params, tokens, method=method, sparsity=0.0)
  assert masks and all(k.all() for k in masks.values())
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("sparsity,nm", [(0.5, None), (0.0, (2, 4))])
def test_sparsegpt_reconstructs_better_than_wanda(sparsity, nm):
  """On its calibration inputs, SparseGPT's weight update leaves a smaller output error."""
  rng = np.random.default_rng(2)
  w, x = rng.normal(size=(64, 32)), _inputs(rng)
  stats = {"sq": (x**2).sum(0), "xtx": x.T @ x}
  error = {}
  for method in ("magnitude_row", "wanda", "sparsegpt"):
    pruned, _ = prune.prune_matrix(w, method, sparsity, nm, stats, blocksize=16)
    error[method] = np.linalg.norm(x @ w - x @ pruned) / np.linalg.norm(x @ w)
  assert error["sparsegpt"] < error["wanda"] < error["magnitude_row"], error


def test_blocks_are_pruned_in_order_on_the_pruned_model(model_and_params):
  """Pruning both blocks at once equals pruning layers_0, then layers_1 of the result: the second
  block's calibration inputs come from the first block already pruned."""
  model, params, tokens = model_and_params
  kw = dict(method="sparsegpt", sparsity=0.5)
  both, masks = prune.prune(model, params, tokens, **kw)
  first, _ = prune.prune(model, params, tokens, targets=r"layers_0/.*kernel", **kw)
  second, _ = prune.prune(model, first, tokens, targets=r"layers_1/.*kernel", **kw)
  for a, b in zip(jax.tree.leaves(both), jax.tree.leaves(second)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  # layers_1 pruned against the unpruned model's activations differs
  alone, _ = prune.prune(model, params, tokens, targets=r"layers_1/.*kernel", **kw)
  assert not np.allclose(
    alone["layers_1"]["mlp"]["down"]["kernel"], both["layers_1"]["mlp"]["down"]["kernel"]
  )
  assert sorted(masks) == sorted(
    f"layers_{i}/{m}/kernel"
    for i in range(2)
    for m in ("attn/q", "attn/k", "attn/v", "attn/o", "mlp/gate", "mlp/up", "mlp/down")
  )
  np.testing.assert_array_equal(both["embed"]["embedding"], params["embed"]["embedding"])
  # the kept pattern survives a fine-tuning update through apply_masks
  moved = jax.tree.map(lambda w: w + 1.0, both)
  again = prune.apply_masks(moved, masks)
  kernel = again["layers_0"]["attn"]["o"]["kernel"]  # [H, E, D]: two input axes
  np.testing.assert_array_equal(kernel[~masks["layers_0/attn/o/kernel"]], 0.0)


def test_errors(model_and_params):
  model, params, tokens = model_and_params
  for bad in (1.0, -0.1, float("nan")):
    with pytest.raises(ValueError, match=r"sparsity=.* must be in \[0, 1\)"):
      prune.prune(model, params, tokens, method="wanda", sparsity=bad)
  with pytest.raises(
    ValueError, match=r"m=10 does not divide the input width 32 of layers_0/attn/k/kernel"
  ):
    prune.prune(model, params, tokens, method="wanda", nm="5:10")
  with pytest.raises(ValueError, match="need 0 < n < m"):
    prune.prune(model, params, tokens, method="wanda", nm="4:2")
  with pytest.raises(ValueError, match="method='obs' is not one of"):
    prune.prune(model, params, tokens, method="obs", sparsity=0.5)
  with pytest.raises(ValueError, match="an N:M pattern fixes the sparsity"):
    prune.prune(model, params, tokens, method="wanda", sparsity=0.5, nm="2:4")
  with pytest.raises(ValueError, match="matches no parameter"):
    prune.prune(model, params, tokens, method="wanda", sparsity=0.5, targets="nothing")
  with pytest.raises(ValueError, match="needs calibration tokens"):
    prune.prune(model, params, np.zeros((0,), np.int32), method="wanda", sparsity=0.5)


def test_a_2_4_model_packs_and_runs_at_half_the_weight_bytes(model_and_params):
  from flaxseed.models import quantize  # pylint: disable=g-import-not-at-top

  model, params, tokens = model_and_params
  pruned, _ = prune.prune(model, params, tokens, method="wanda", nm="2:4")
  packed = prune.pack(pruned)
  np.testing.assert_allclose(
    model.apply({"params": packed}, tokens),
    model.apply({"params": pruned}, tokens),
    rtol=1e-5,
    atol=1e-5,
  )
  kernels_bytes = lambda p: sum(  # noqa: E731
    quantize.weight_bytes(p[f"layers_{i}"]) for i in range(2)
  )
  assert kernels_bytes(packed) < 0.6 * kernels_bytes(pruned)
  with pytest.raises(ValueError, match=r"layers_0/attn/k/kernel is not 2:4 sparse"):
    prune.pack(params)


def test_a_sparse_fine_tune_keeps_the_pattern(tmp_path):
  """Prune a run's model, save it as a Hugging Face folder, fine-tune from it with
  ``config.keep_zeros``: every pruned weight is still zero, every other target weight moved."""
  from flaxseed import training  # pylint: disable=g-import-not-at-top
  from flaxseed.configs import common  # pylint: disable=g-import-not-at-top
  from flaxseed.configs import lm as lm_configs  # pylint: disable=g-import-not-at-top
  from flaxseed.models import hf  # pylint: disable=g-import-not-at-top

  pytest.importorskip("safetensors")
  config = common.override(
    lm_configs.get_config("test"),
    **{"model.scan_layers": False, "mesh.data": 1, "sample_tokens": 0, "steps": 2},
  )
  training.train(config, str(tmp_path / "base"))
  restored = training.restore(config, str(tmp_path / "base"))
  model, params = restored.setup.task.model, restored.params
  rows = restored.setup.task.corpus.train.tokens[: 8 * 32].reshape(8, 32).astype(np.int32)
  pruned, masks = prune.prune(model, params, rows, method="wanda", sparsity=0.5)
  hf.to_pretrained(model, pruned, str(tmp_path / "pruned"))
  targets = r".*(attn|mlp).*kernel"
  tuned = common.override(
    config, **{"init_from": str(tmp_path / "pruned"), "keep_zeros": targets, "steps": 3}
  )
  training.train(tuned, str(tmp_path / "tuned"))
  after = training.restore(tuned, str(tmp_path / "tuned")).params
  for path, keep in masks.items():
    w, before = np.asarray(params_lib.get(after, path)), np.asarray(params_lib.get(pruned, path))
    np.testing.assert_array_equal(w[~keep], 0.0)
    assert np.all(w[keep] != before[keep]), path  # the kept weights trained
  with pytest.raises(ValueError, match="config.keep_zeros='nothing' matches no trainable"):
    training.train(common.override(tuned, keep_zeros="nothing"), str(tmp_path / "bad"))
