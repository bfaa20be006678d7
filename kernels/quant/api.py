"""One entry point for matmuls with quantized weights.

``quantized_matmul(x, qw, implementation=None)``: ``x [..., K] @ W [K, N]`` where ``qw`` is a
``QuantizedWeight`` (``formats.quantize_weight``). Implementations:

  ``"xla"``         the reference: dequantize the whole weight, then a float matmul.
  ``"pallas_tpu"``  dequantizes tiles in VMEM (``pallas_tpu.py``).
  ``"pallas_gpu"``  dequantizes tiles in registers (``pallas_gpu.py``).

``None`` picks the Pallas kernel of the backend, ``"xla"`` on CPU (XLA:CPU gains nothing from
quantized weights). Gradients flow to ``x`` (``dx = dy W^T`` through the dequantized weight, for
QLoRA and QAT); the quantized weight is frozen (its cotangent is zero).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from flaxseed.kernels.quant import formats

IMPLEMENTATIONS = ("xla", "pallas_tpu", "pallas_gpu")


def default_implementation() -> str:
  return {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(jax.default_backend(), "xla")


def _matmul_2d(x, qw, implementation, interpret):
  if implementation == "xla":
    return jnp.dot(x, formats.dequantize_weight(qw, x.dtype), preferred_element_type=jnp.float32
                   ).astype(x.dtype)
  if implementation == "pallas_tpu":
    from flaxseed.kernels.quant import pallas_tpu  # pylint: disable=g-import-not-at-top
    return pallas_tpu.matmul(x, qw, interpret=interpret)
  from flaxseed.kernels.quant import pallas_gpu  # pylint: disable=g-import-not-at-top
  return pallas_gpu.matmul(x, qw, interpret=interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matmul(x, qw, implementation, interpret):
  return _matmul_2d(x, qw, implementation, interpret)


def _matmul_fwd(x, qw, implementation, interpret):
  return _matmul_2d(x, qw, implementation, interpret), qw


def _zero_cotangent(leaf):
  if jnp.issubdtype(leaf.dtype, jnp.integer):
    return np.zeros(leaf.shape, jax.dtypes.float0)
  return jnp.zeros_like(leaf)


def _matmul_bwd(implementation, interpret, qw, dy):
  del implementation, interpret
  w = formats.dequantize_weight(qw, dy.dtype)
  dx = jnp.dot(dy, w.T, preferred_element_type=jnp.float32).astype(dy.dtype)
  return dx, jax.tree.map(_zero_cotangent, qw)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def quantized_matmul(x, qw: formats.QuantizedWeight, *, implementation: str | None = None,
                     interpret: bool | None = None):
  """``x [..., K] @ W [K, N] -> [..., N]`` in ``x``'s dtype, accumulating in float32.

  Args:
    x: activations; leading axes are flattened into the matmul's M.
    qw: the quantized weight.
    implementation: ``None`` (best for the backend) or one of ``IMPLEMENTATIONS``.
    interpret: run a Pallas implementation in interpret mode (CPU tests).
  """
  if not isinstance(qw, formats.QuantizedWeight):
    raise ValueError(f"qw must be a QuantizedWeight (kernels.quantize_weight), got "
                     f"{type(qw).__name__}")
  k, n = qw.shape
  if x.shape[-1] != k:
    raise ValueError(f"x's last dim ({x.shape[-1]}) must equal the weight's K ({k})")
  implementation = implementation or default_implementation()
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown quantized_matmul implementation {implementation!r}; "
                     f"available: {', '.join(IMPLEMENTATIONS)}")
  lead = x.shape[:-1]
  y = _matmul(x.reshape(-1, k), qw, implementation, bool(interpret))
  return y.reshape(*lead, n)
