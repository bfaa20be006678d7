"""Packed 2:4 weights (``kernels/sparse``): the format round-trips, and the matmul (XLA reference
and the Pallas kernel in interpret mode) equals the dense masked matmul, forward and gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxseed import kernels
from flaxseed.models import prune


def _pruned(k, n, seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  w, _ = prune.prune_matrix(rng.normal(size=(k, n)), "magnitude_row", 0.0, (2, 4))
  w[:4, 0] = 0.0  # a group with no nonzero, and one with a single nonzero
  w[4:8, 1] = [0.0, 0.0, 3.0, 0.0]
  return w.astype(dtype)


def test_pack_round_trips_at_half_the_bytes():
  w = _pruned(64, 40)
  sw = kernels.pack_24(w)
  np.testing.assert_array_equal(kernels.unpack_24(sw), w)
  assert sw.values.shape == (2, 16, 40) and sw.meta.shape == (8, 40)
  assert sw.nbytes / w.nbytes == pytest.approx(0.5 + 1 / 32)  # float32: half + 4 bits a group
  assert jax.tree.leaves(sw)[0].shape == (2, 16, 40)  # a pytree: the arrays are its leaves


@pytest.mark.parametrize("implementation", ["xla", "pallas_tpu"])
@pytest.mark.parametrize("m,k,n", [(1, 64, 40), (7, 128, 130), (16, 1024, 128)])
def test_matmul_equals_the_dense_masked_matmul(implementation, m, k, n):
  w = _pruned(k, n, seed=k)
  sw = kernels.pack_24(w)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(m, k)), jnp.float32)
  dy = jnp.asarray(np.random.default_rng(2).normal(size=(m, n)), jnp.float32)

  def loss(x, fn):
    return jnp.sum(fn(x) * dy)

  sparse = lambda x: kernels.sparse24_matmul(  # noqa: E731
    x, sw, implementation=implementation, interpret=True
  )
  dense = lambda x: x @ jnp.asarray(w)  # noqa: E731
  # float32 sums of k terms in another order: errors scale with the outputs' magnitude
  tol = dict(rtol=1e-5, atol=2e-6 * float(jnp.abs(dense(x)).max()))
  np.testing.assert_allclose(sparse(x), dense(x), **tol)
  dx_tol = dict(rtol=1e-5, atol=2e-6 * float(jnp.abs(dy @ jnp.asarray(w).T).max()))
  np.testing.assert_allclose(jax.grad(loss)(x, sparse), jax.grad(loss)(x, dense), **dx_tol)
  # leading axes are flattened into M
  np.testing.assert_allclose(
    kernels.sparse24_matmul(x.reshape(1, m, k), sw, implementation=implementation, interpret=True),
    dense(x)[None],
    **tol,
  )


def test_errors():
  w = np.ones((8, 4), np.float32)
  with pytest.raises(ValueError, match=r"w is not 2:4 sparse: rows 0..3 of column 0 hold 4"):
    kernels.pack_24(w)
  with pytest.raises(ValueError, match="K a multiple of 8"):
    kernels.pack_24(np.zeros((12, 4)))
  sw = kernels.pack_24(_pruned(64, 8))
  with pytest.raises(ValueError, match=r"x's last dim \(32\) must equal the weight's K \(64\)"):
    kernels.sparse24_matmul(jnp.zeros((2, 32)), sw)
  with pytest.raises(ValueError, match="unknown sparse24_matmul implementation 'cuda'"):
    kernels.sparse24_matmul(jnp.zeros((2, 64)), sw, implementation="cuda")
  with pytest.raises(ValueError, match="pallas_tpu needs K a multiple of 1024"):
    kernels.sparse24_matmul(jnp.zeros((2, 64)), sw, implementation="pallas_tpu")
