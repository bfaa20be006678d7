"""Weight quantization formats: int8, int4, NF4 and ternary, packed, with their scales.

A weight matrix ``w [K, N]`` (``K`` contracted, ``N`` outputs) becomes a ``QuantizedWeight``:

  ``int8``     ``round(w / s)`` in [-127, 127], one int8 per value; ``s = absmax / 127`` per
               output channel (or per group of ``group_size`` rows when given).
  ``int4``     ``round(w / s)`` in [-7, 7], two values per byte; ``s = absmax / 7`` per group of
               ``group_size`` rows (32, 64 or 128; default 128) and output channel.
  ``nf4``      the index of the nearest of the 16 NormalFloat-4 levels (QLoRA, Dettmers et al.
               2023) to ``w / absmax``, two per byte; ``absmax`` per group and output channel.
  ``ternary``  ``round(w / s)`` clipped to {-1, 0, 1}, four values per byte (2 bits each);
               ``s = mean(|w|)`` over the whole matrix (the absmean of BitNet b1.58).

Packing splits ``K`` (the contraction) into ``p`` segments (``p`` values per byte): byte row
``r`` holds rows ``r + j * K / p`` at bits ``j * 8 / p`` (int4/NF4: row ``r`` in the low nibble,
row ``r + K/2`` in the high one). A kernel reading byte rows ``[r0, r0 + b)`` then has ``p``
contiguous weight tiles, one per segment, with no interleaving of rows to undo: it multiplies
each by its own slice of ``x`` and sums. Codes are stored non-negative (int4: ``q + 8``;
ternary: ``q + 1``; NF4: the level's index).
"""

import dataclasses
import statistics

import jax
import jax.numpy as jnp
import numpy as np

FORMATS = ("int8", "int4", "nf4", "ternary")
GROUP_SIZES = (32, 64, 128)

# The NF4 levels as printed in the QLoRA paper (Appendix E) and used by bitsandbytes.
NF4_LEVELS = (
  -1.0,
  -0.6961928009986877,
  -0.5250730514526367,
  -0.39491748809814453,
  -0.28444138169288635,
  -0.18477343022823334,
  -0.09105003625154495,
  0.0,
  0.07958029955625534,
  0.16093020141124725,
  0.24611230194568634,
  0.33791524171829224,
  0.44070982933044434,
  0.5626170039176941,
  0.7229568362236023,
  1.0,
)


def nf4_levels_from_quantiles() -> np.ndarray:
  """Rebuilds the NF4 levels from their definition: quantiles of N(0, 1) at evenly spaced
  probabilities, 8 on the positive side and 7 on the negative side (so 0 is exact), offset
  ``delta = (1 - 1/(2*15) + 1 - 1/(2*16)) / 2``, scaled to [-1, 1] (QLoRA, Section 3)."""
  quantile = statistics.NormalDist().inv_cdf  # float64
  offset = 0.5 * ((1 - 1 / 30) + (1 - 1 / 32))
  positive = [quantile(p) for p in np.linspace(offset, 0.5, 9)[:-1]]
  negative = [-quantile(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
  levels = np.sort(np.concatenate([positive, negative, [0.0]]))
  return levels / np.max(np.abs(levels))


@dataclasses.dataclass(frozen=True)
class Layout:
  """Static description of a quantized weight (hashable)."""

  fmt: str
  shape: tuple[int, int]  # the float weight's [K, N]
  group_size: int | None  # rows per scale (None: all K rows share one scale per column)

  @property
  def per_byte(self) -> int:
    return {"int8": 1, "int4": 2, "nf4": 2, "ternary": 4}[self.fmt]

  @property
  def groups(self) -> int:
    if self.fmt == "ternary":
      return 1
    return 1 if self.group_size is None else self.shape[0] // self.group_size


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
  """Packed codes ``[K / per_byte, N]`` (uint8; int8 for ``int8``) and float32 ``scales``
  (``[groups, N]``, or ``[1, 1]`` for ternary). A pytree: the arrays are leaves, ``layout``
  static, so it passes through ``jit``, sharding and checkpoints like a parameter."""

  values: jax.Array
  scales: jax.Array
  layout: Layout = dataclasses.field(metadata=dict(static=True))

  @property
  def shape(self) -> tuple[int, int]:
    return self.layout.shape

  @property
  def nbytes(self) -> int:
    """Bytes of the packed weight and its scales (what a matmul reads)."""
    return int(
      self.values.size * self.values.dtype.itemsize + self.scales.size * self.scales.dtype.itemsize
    )


def _check(w, fmt, group_size):
  if fmt not in FORMATS:
    raise ValueError(f"fmt={fmt!r} is not one of {FORMATS}")
  if w.ndim != 2:
    raise ValueError(f"quantize_weight takes a [K, N] matrix, got shape {w.shape}")
  k = w.shape[0]
  if fmt in ("int4", "nf4") and group_size is None:
    group_size = 128
  if fmt == "ternary" and group_size is not None:
    raise ValueError("ternary uses one absmean scale per matrix: group_size must be None")
  if group_size is not None:
    if group_size not in GROUP_SIZES:
      raise ValueError(f"group_size={group_size} is not one of {GROUP_SIZES} (or None for int8)")
    if k % group_size:
      raise ValueError(f"group_size={group_size} must divide the contraction dim K={k}")
  per_byte = Layout(fmt, (1, 1), None).per_byte
  if k % per_byte:
    raise ValueError(f"{fmt} packs {per_byte} rows per byte: K={k} must be a multiple")
  return Layout(fmt, (int(w.shape[0]), int(w.shape[1])), group_size)


def _grouped(x, layout: Layout):
  """``[K, N] -> [groups, K / groups, N]``."""
  return x.reshape(layout.groups, layout.shape[0] // layout.groups, layout.shape[1])


def quantize_weight(w, fmt: str = "int8", group_size: int | None = None) -> QuantizedWeight:
  """Quantizes a float ``[K, N]`` weight (see the module docstring for each format)."""
  w = jnp.asarray(w, jnp.float32)
  layout = _check(w, fmt, group_size)
  if fmt == "ternary":
    scale = jnp.maximum(jnp.mean(jnp.abs(w)), 1e-8)
    codes = jnp.clip(jnp.round(w / scale), -1, 1).astype(jnp.int32) + 1
    return QuantizedWeight(pack(codes, 4), scale.reshape(1, 1), layout)
  g = _grouped(w, layout)
  absmax = jnp.max(jnp.abs(g), axis=1, keepdims=True)  # [groups, 1, N]
  if fmt == "nf4":
    scale = jnp.where(absmax == 0, 1.0, absmax)
    levels = jnp.asarray(NF4_LEVELS, jnp.float32)
    codes = jnp.argmin(jnp.abs((g / scale)[..., None] - levels[None, None, None]), axis=-1)
    codes = codes.reshape(layout.shape)
    return QuantizedWeight(pack(codes, 2), scale[:, 0], layout)
  top = 127 if fmt == "int8" else 7
  scale = jnp.where(absmax == 0, 1.0, absmax / top)
  q = jnp.clip(jnp.round(g / scale), -top, top).reshape(layout.shape).astype(jnp.int32)
  if fmt == "int8":
    return QuantizedWeight(q.astype(jnp.int8), scale[:, 0], layout)
  return QuantizedWeight(pack(q + 8, 2), scale[:, 0], layout)


def pack(codes, per_byte: int):
  """Non-negative integer codes ``[K, N]`` -> uint8 ``[K / per_byte, N]`` (segment layout)."""
  bits = 8 // per_byte
  segments = jnp.split(codes.astype(jnp.uint8), per_byte, axis=0)
  out = segments[0]
  for j in range(1, per_byte):
    out = out | (segments[j] << (bits * j))
  return out


def unpack_segment(values, per_byte: int, j: int):
  """Codes (int32) of segment ``j`` held by uint8 ``values`` (any tile of byte rows)."""
  bits = 8 // per_byte
  return (values.astype(jnp.int32) >> (bits * j)) & ((1 << bits) - 1)


def unpack(values, per_byte: int):
  """uint8 ``[R, N]`` -> int32 codes ``[R * per_byte, N]`` (inverse of ``pack``)."""
  return jnp.concatenate([unpack_segment(values, per_byte, j) for j in range(per_byte)], axis=0)


def codes_to_levels(codes, fmt: str):
  """Integer codes -> the float levels they stand for (before scaling)."""
  if fmt == "int8":
    return codes.astype(jnp.float32)
  if fmt == "int4":
    return (codes - 8).astype(jnp.float32)
  if fmt == "ternary":
    return (codes - 1).astype(jnp.float32)
  q = jnp.zeros(codes.shape, jnp.float32)  # nf4: selects, a gather-free form kernels can lower
  for i, level in enumerate(NF4_LEVELS):
    q = jnp.where(codes == i, level, q)
  return q


def decode(values, scales, layout: Layout, dtype=jnp.float32):
  """The float ``[K, N]`` weight of packed ``values`` and ``scales``."""
  codes = values.astype(jnp.int32) if layout.fmt == "int8" else unpack(values, layout.per_byte)
  q = codes_to_levels(codes, layout.fmt)
  if layout.fmt == "ternary":
    return (q * scales[0, 0]).astype(dtype)
  k, n = q.shape
  groups = scales.shape[0]
  q = q.reshape(groups, k // groups, n) * scales[:, None, :]
  return q.reshape(k, n).astype(dtype)


def dequantize_weight(qw: QuantizedWeight, dtype=jnp.float32):
  """The float ``[..., K, N]`` weight that ``qw`` represents (leading axes: stacked layers)."""
  fn = lambda values, scales: decode(values, scales, qw.layout, dtype)  # noqa: E731
  for _ in range(qw.values.ndim - 2):
    fn = jax.vmap(fn)
  return fn(qw.values, qw.scales)


def max_abs_error(qw: QuantizedWeight, w) -> float:
  """Largest ``|dequantize(qw) - w|``."""
  return float(jnp.max(jnp.abs(dequantize_weight(qw) - jnp.asarray(w, jnp.float32))))


def rounding_bound(qw: QuantizedWeight):
  """Per-element bound on the quantization error, ``[K, N]``: half a step for int8/int4, half
  the widest gap between neighbouring levels times the scale for NF4 (ternary has no bound: it
  clips)."""
  fmt, layout = qw.layout.fmt, qw.layout
  if fmt == "ternary":
    raise ValueError("ternary clips large weights: no rounding bound")
  half_step = 0.5 * (max(np.diff(NF4_LEVELS)) if fmt == "nf4" else 1.0)
  scale = jnp.repeat(qw.scales, layout.shape[0] // qw.scales.shape[0], axis=0)
  return half_step * scale
