"""Every zoo preset wraps into NNX with ``flax.nnx.bridge.ToNNX``: every preset (up to the 8B)
builds the Linen module's parameter shapes (abstractly, nothing is allocated), and a tiny preset
of each family gives the Linen module's outputs on the same weights."""

from flax import nnx
import flax.linen as nn
from flax.nnx import bridge
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxseed import models


def _input(module):
  if isinstance(module, models.sae.SAE):
    return jax.random.normal(jax.random.key(1), (4, module.config.d_in))
  return jnp.asarray(np.arange(12).reshape(2, 6) % module.config.vocab_size, jnp.int32)


def _to_nnx(module, x):
  # Without a mesh: the boxes' logical axis names stay metadata (no eager sharding).
  with nnx.use_eager_sharding(False):
    wrapped = bridge.ToNNX(module, rngs=nnx.Rngs(0))
    bridge.lazy_init(wrapped, x)
  return wrapped


def _collection(wrapped, kind=nnx.Param):
  state = nnx.to_pure_dict(nnx.state(wrapped, kind))
  return {k: v for k, v in state.items() if not k.startswith("to_nnx__")}


def _variables(wrapped):
  """The Linen variables of a wrapped module: parameters, and statistics where it keeps some
  (BatchTopK's threshold)."""
  stats = _collection(wrapped, nnx.BatchStat)
  return {"params": _collection(wrapped), **({"batch_stats": stats} if stats else {})}


# One tiny preset per family (and BatchTopK, which keeps a statistic): the wrapping is the same
# for a family's variants, whose parameter structure the next test checks one by one.
@pytest.mark.parametrize(
  "name",
  [
    "transformer-tiny",
    "titans-mal-tiny",
    "diffusion-lm-tiny",
    "sae-batch-topk-tiny",
    "sae-jumprelu-tiny",
  ],
)
def test_tiny_presets_give_the_same_outputs_in_nnx(name):
  # One layer: the wrapping does not depend on depth, and the eager NNX call stays cheap.
  module = models.get(name, **({} if name.startswith("sae") else {"num_layers": 1}))
  x = _input(module)
  wrapped = _to_nnx(module, x)
  got = wrapped(x)
  want = module.apply(_variables(wrapped), x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), got, want)


@pytest.mark.parametrize("name", models.list())
def test_every_preset_wraps_with_the_same_parameter_shapes(name):
  module = models.get(name)
  x = _input(module)
  linen = jax.eval_shape(lambda: nn.unbox(module.init(jax.random.key(0), x)["params"]))
  wrapped = nnx.eval_shape(lambda: _to_nnx(module, x))
  shapes = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype), tree)  # noqa: E731
  assert shapes(_collection(wrapped)) == shapes(linen)
