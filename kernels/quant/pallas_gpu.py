"""Weight-only quantized matmul for GPU in Pallas (Triton): dequantize in registers, fp32 acc.

One program per ``[bm, bn]`` output tile and K split loops over its share of the packed weight's
byte rows in steps of ``bkp``: it loads a ``[bkp, bn]`` tile of codes (1/p of the float tile's
bytes) and, per packing segment, the matching ``[bm, bkp]`` slice of ``x``, unpacks, scales and
accumulates with ``dot``. Decode shapes (small M) are memory-bound, so what matters is that every
SM streams weight bytes: with few output tiles (N / bn of them at M <= bm) the byte rows are split
``splits`` ways ("split-K") into float32 partials that XLA sums, so the grid has at least about
two programs per SM. ``plan`` picks the tiles; ``matmul`` takes overrides for tuning sweeps
(``experiments/benchmarks/quantized_matmul.py --sweep``).
"""

import dataclasses
import functools

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr
import jax.numpy as jnp

from flaxseed.kernels.quant import formats
from flaxseed.kernels.quant import tiling

# Programs the grid should have at least (about two per SM of an H100, which has 132).
MIN_PROGRAMS = 256


@dataclasses.dataclass(frozen=True)
class GpuTiles:
  bm: int  # rows of x per tile (>= 16: tl.dot's minimum)
  bn: int  # output columns per tile
  bkp: int  # packed byte rows per loop step
  splits: int  # K splits: partial sums over byte rows [s R / splits, (s + 1) R / splits)
  num_warps: int = 4
  num_stages: int = 3


def plan(
  layout: formats.Layout,
  m: int,
  *,
  bn: int | None = None,
  splits: int | None = None,
  bkp: int | None = None,
  num_warps: int = 4,
  num_stages: int = 3,
) -> GpuTiles:
  """Tiles for ``x [m, K] @ W``; any argument given overrides the heuristic."""
  k, n = layout.shape
  bn = bn or (64 if m <= 16 else 128)
  # Tiles stay inside one scale group (bkp <= group size): no reshapes in the kernel.
  # Ternary's four packing segments at 64 x 256 x-tiles overflow shared memory (measured at
  # M = 64): it steps 64 byte rows (256 weight rows, as int8 does) with at most 32-row tiles.
  max_bm, max_bkp = (32, 64) if layout.fmt == "ternary" else (64, 256)
  base = tiling.Tiles.plan(
    layout,
    m,
    min_bm=16,
    max_bm=max_bm,
    bn=bn,
    max_bkp=bkp or min(max_bkp, layout.group_size or max_bkp),
  )
  steps = k // layout.per_byte // base.bkp
  if splits is None:
    tiles = -(-m // base.bm) * -(-n // base.bn)
    splits = 1
    while tiles * splits < MIN_PROGRAMS and steps % (splits * 2) == 0:
      splits *= 2
  if steps % splits:
    raise ValueError(f"splits={splits} must divide the {steps} steps of {base.bkp} byte rows")
  return GpuTiles(base.bm, base.bn, base.bkp, splits, num_warps, num_stages)


def _kernel(x_ref, values_ref, scales_ref, o_ref, *, layout: formats.Layout, tiles: GpuTiles):
  p, bkp = layout.per_byte, tiles.bkp
  byte_rows = layout.shape[0] // p
  steps = byte_rows // bkp // tiles.splits
  first = pl.program_id(2) * steps

  def step(t, acc):
    values = values_ref[pl.ds(t * bkp, bkp), :]
    for j in range(p):
      codes = (
        values.astype(jnp.int32) if layout.fmt == "int8" else formats.unpack_segment(values, p, j)
      )
      if layout.fmt == "ternary":
        scale = scales_ref[0, 0]
      else:
        scale = scales_ref[tiling.scale_block(layout, j, t, bkp), :][None, :]
      x = x_ref[:, pl.ds(j * byte_rows + t * bkp, bkp)]
      w = (formats.codes_to_levels(codes, layout.fmt) * scale).astype(x.dtype)
      acc += jnp.dot(x, w, preferred_element_type=jnp.float32)
    return acc

  acc = jax.lax.fori_loop(first, first + steps, step, jnp.zeros((tiles.bm, tiles.bn), jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def matmul(x, qw: formats.QuantizedWeight, *, interpret: bool = False, **overrides):
  """``x [M, K] @ W [K, N]`` for a quantized ``W``; returns ``[M, N]`` in ``x``'s dtype.
  ``overrides``: ``plan``'s keyword arguments (tuning)."""
  layout = qw.layout
  m = x.shape[0]
  k, n = layout.shape
  tiles = plan(layout, m, **overrides)
  x = tiling.pad_to(x, 0, tiles.bm)
  values = tiling.pad_to(qw.values, 1, tiles.bn)
  scales = qw.scales if layout.fmt == "ternary" else tiling.pad_to(qw.scales, 1, tiles.bn)
  if layout.fmt == "ternary":
    scale_spec = pl.BlockSpec((1, 1), lambda i, jn, s: (0, 0))
  else:
    scale_spec = pl.BlockSpec((scales.shape[0], tiles.bn), lambda i, jn, s: (0, jn))
  partials = pl.pallas_call(
    functools.partial(_kernel, layout=layout, tiles=tiles),
    grid=(x.shape[0] // tiles.bm, values.shape[1] // tiles.bn, tiles.splits),
    in_specs=[
      pl.BlockSpec((tiles.bm, k), lambda i, jn, s: (i, 0)),
      pl.BlockSpec((values.shape[0], tiles.bn), lambda i, jn, s: (0, jn)),
      scale_spec,
    ],
    out_specs=pl.BlockSpec((None, tiles.bm, tiles.bn), lambda i, jn, s: (s, i, jn)),
    out_shape=jax.ShapeDtypeStruct((tiles.splits, x.shape[0], values.shape[1]), jnp.float32),
    compiler_params=pltr.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages),
    interpret=interpret,
    name=f"flaxseed_{layout.fmt}_matmul",
  )(x, values, scales)
  return partials.sum(0)[:m, :n].astype(x.dtype)
