"""One entry point for matmuls with quantized weights.

``quantized_matmul(x, qw, implementation=None)``: ``x [..., K] @ W [K, N]`` where ``qw`` is a
``QuantizedWeight`` (``formats.quantize_weight``). Implementations:

  ``"xla"``         the reference: dequantize the whole weight, then a float matmul.
  ``"pallas_tpu"``  dequantizes tiles in VMEM (``pallas_tpu.py``).
  ``"pallas_gpu"``  dequantizes tiles in registers (``pallas_gpu.py``).

``None`` picks the Pallas kernel of the backend, ``"xla"`` on CPU (XLA:CPU gains nothing from
quantized weights). Gradients flow to ``x`` (``dx = dy W^T`` through the dequantized weight, for
QLoRA and QAT); the quantized weight is frozen (its cotangent is zero).

``activations="int8"`` (w8a8, int8 weights only; ``"xla"`` and ``"pallas_tpu"``): each row of
``x`` is quantized on the fly to int8 with its absmax, the product runs int8 x int8 -> int32 (the
TPU MXU's integer path) and is rescaled by both scales. The gradient to ``x`` is the same
straight-through one.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np

from flaxseed.kernels.quant import formats

IMPLEMENTATIONS = ("xla", "pallas_tpu", "pallas_gpu")


def default_implementation() -> str:
  return {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(jax.default_backend(), "xla")


def quantize_rows(x):
  """Per-row absmax int8 quantization: ``(int8 codes, float32 scales [M, 1])``."""
  scale = jnp.maximum(jnp.max(jnp.abs(x.astype(jnp.float32)), axis=1, keepdims=True), 1e-12)
  scale = scale / 127.0
  return jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8), scale


def _w8a8_2d(x, qw, implementation, interpret):
  codes, x_scale = quantize_rows(x)
  if implementation == "xla":
    acc = jnp.dot(codes, qw.values, preferred_element_type=jnp.int32)
    return (acc.astype(jnp.float32) * x_scale * qw.scales).astype(x.dtype)
  from flaxseed.kernels.quant import pallas_tpu  # pylint: disable=g-import-not-at-top

  return pallas_tpu.w8a8_matmul(codes, x_scale, qw, out_dtype=x.dtype, interpret=interpret)


def _matmul_2d(x, qw, implementation, interpret, activations=None):
  if activations == "int8":
    return _w8a8_2d(x, qw, implementation, interpret)
  if implementation == "xla":
    return jnp.dot(
      x, formats.dequantize_weight(qw, x.dtype), preferred_element_type=jnp.float32
    ).astype(x.dtype)
  if implementation == "pallas_tpu":
    from flaxseed.kernels.quant import pallas_tpu  # pylint: disable=g-import-not-at-top

    return pallas_tpu.matmul(x, qw, interpret=interpret)
  from flaxseed.kernels.quant import pallas_gpu  # pylint: disable=g-import-not-at-top

  return pallas_gpu.matmul(x, qw, interpret=interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _matmul(x, qw, implementation, interpret, activations):
  return _matmul_2d(x, qw, implementation, interpret, activations)


def _matmul_fwd(x, qw, implementation, interpret, activations):
  return _matmul_2d(x, qw, implementation, interpret, activations), qw


def _zero_cotangent(leaf):
  if jnp.issubdtype(leaf.dtype, jnp.integer):
    return np.zeros(leaf.shape, jax.dtypes.float0)
  return jnp.zeros_like(leaf)


def _matmul_bwd(implementation, interpret, activations, qw, dy):
  del implementation, interpret, activations
  w = formats.dequantize_weight(qw, dy.dtype)
  dx = jnp.dot(dy, w.T, preferred_element_type=jnp.float32).astype(dy.dtype)
  return dx, jax.tree.map(_zero_cotangent, qw)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _sharded(fn, qw: formats.QuantizedWeight, mesh, spec):
  """``fn(x [M, K], qw)`` under ``shard_map``: rows of x over ``spec[0]``, weight columns (and
  the output's) over ``spec[1]``; K stays whole on every device (XLA gathers it first)."""
  spec = P(*spec) if not isinstance(spec, P) else spec
  spec = P(*(tuple(spec) + (None,) * (2 - len(spec))))
  rows, cols = spec
  scale_spec = P(None, None) if qw.layout.fmt == "ternary" else P(None, cols)
  layout = qw.layout

  def local(x, values, scales):  # this device's columns: a weight of its own width
    shard = formats.QuantizedWeight(
      values, scales, dataclasses.replace(layout, shape=(layout.shape[0], values.shape[1]))
    )
    return fn(x, shard)

  sharded = jax.shard_map(
    local,
    mesh=mesh,
    in_specs=(P(rows, None), P(None, cols), scale_spec),
    out_specs=P(rows, cols),
    check_vma=False,
  )
  return lambda x, qw: sharded(x, qw.values, qw.scales)


def quantized_matmul(
  x,
  qw: formats.QuantizedWeight,
  *,
  implementation: str | None = None,
  interpret: bool | None = None,
  activations: str | None = None,
  mesh=None,
  spec=None,
):
  """``x [..., K] @ W [K, N] -> [..., N]`` in ``x``'s dtype, accumulating in float32.

  Args:
    x: activations; leading axes are flattened into the matmul's M.
    qw: the quantized weight.
    implementation: ``None`` (best for the backend) or one of ``IMPLEMENTATIONS``.
    interpret: run a Pallas implementation in interpret mode (CPU tests).
    activations: ``None`` (float activations) or ``"int8"`` (w8a8, see the module docstring).
    mesh, spec: run under ``shard_map`` over ``mesh`` (Mosaic kernels cannot be partitioned by
      XLA); ``spec`` is the ``PartitionSpec`` of the ``[M, N]`` output: rows of ``x`` shard over
      ``spec[0]``, the weight's columns over ``spec[1]``.
  """
  if not isinstance(qw, formats.QuantizedWeight):
    raise ValueError(
      f"qw must be a QuantizedWeight (kernels.quantize_weight), got {type(qw).__name__}"
    )
  k, n = qw.shape
  if x.shape[-1] != k:
    raise ValueError(f"x's last dim ({x.shape[-1]}) must equal the weight's K ({k})")
  implementation = implementation or default_implementation()
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
      f"unknown quantized_matmul implementation {implementation!r}; "
      f"available: {', '.join(IMPLEMENTATIONS)}"
    )
  if activations not in (None, "int8"):
    raise ValueError(f"activations={activations!r} is not one of (None, 'int8')")
  if activations == "int8":
    if qw.layout.fmt != "int8" or qw.layout.group_size is not None:
      raise ValueError(
        "activations='int8' (w8a8) needs int8 weights with per-channel scales, "
        f"got {qw.layout.fmt} with group_size={qw.layout.group_size}"
      )
    if implementation == "pallas_gpu":
      raise ValueError("activations='int8' (w8a8) runs on 'xla' or 'pallas_tpu'")
  if (mesh is None) != (spec is None):
    raise ValueError("mesh and spec go together: give both or neither")
  lead = x.shape[:-1]
  call = lambda x, qw: _matmul(x, qw, implementation, bool(interpret), activations)  # noqa: E731
  if mesh is not None:
    call = _sharded(call, qw, mesh, spec)
  return call(x.reshape(-1, k), qw).reshape(*lead, n)
