"""One entry point for matmuls with packed 2:4 weights.

``sparse24_matmul(x, sw, implementation=None)``: ``x [..., K] @ W [K, N]`` where ``sw`` is a
``Sparse24Weight`` (``formats.pack_24``). Implementations:

  ``"xla"``         the reference: unpack the whole weight, then a dense matmul.
  ``"pallas_tpu"``  unpacks tiles in VMEM (``pallas_tpu.py``): the weight is read packed.

``None`` picks ``"pallas_tpu"`` on TPU, else ``"xla"``. Neither is faster than a dense matmul
in FLOPs (TPUs have no sparse tensor cores): the gain is memory, the weight held and read at 53-56%
of its dense bytes. Gradients flow to ``x`` (``dx = dy W^T`` through the unpacked weight, for a
frozen pruned base); the packed weight is frozen (its cotangent is zero).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from flaxseed.kernels.sparse import formats

IMPLEMENTATIONS = ("xla", "pallas_tpu")


def _matmul_2d(x, sw, implementation, interpret):
  if implementation == "xla":
    return jnp.dot(x, formats.unpack_24(sw, x.dtype), preferred_element_type=jnp.float32).astype(
      x.dtype
    )
  from flaxseed.kernels.sparse import pallas_tpu  # pylint: disable=g-import-not-at-top

  return pallas_tpu.matmul(x, sw, interpret=interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matmul(x, sw, implementation, interpret):
  return _matmul_2d(x, sw, implementation, interpret)


def _matmul_fwd(x, sw, implementation, interpret):
  return _matmul_2d(x, sw, implementation, interpret), sw


def _zero_cotangent(leaf):
  if jnp.issubdtype(leaf.dtype, jnp.integer):
    return np.zeros(leaf.shape, jax.dtypes.float0)
  return jnp.zeros_like(leaf)


def _matmul_bwd(implementation, interpret, sw, dy):
  del implementation, interpret
  w = formats.unpack_24(sw, dy.dtype)
  dx = jnp.dot(dy, w.T, preferred_element_type=jnp.float32).astype(dy.dtype)
  return dx, jax.tree.map(_zero_cotangent, sw)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def sparse24_matmul(
  x, sw: formats.Sparse24Weight, *, implementation: str | None = None, interpret: bool = False
):
  """``x [..., K] @ W [K, N] -> [..., N]`` in ``x``'s dtype, accumulating in float32."""
  if not isinstance(sw, formats.Sparse24Weight):
    raise ValueError(f"sw must be a Sparse24Weight (kernels.pack_24), got {type(sw).__name__}")
  k, n = sw.shape
  if x.shape[-1] != k:
    raise ValueError(f"x's last dim ({x.shape[-1]}) must equal the weight's K ({k})")
  implementation = implementation or ("pallas_tpu" if jax.default_backend() == "tpu" else "xla")
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
      f"unknown sparse24_matmul implementation {implementation!r}; "
      f"available: {', '.join(IMPLEMENTATIONS)}"
    )
  lead = x.shape[:-1]
  return _matmul(x.reshape(-1, k), sw, implementation, bool(interpret)).reshape(*lead, n)
