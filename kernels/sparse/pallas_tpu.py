"""Packed 2:4 matmul for TPU in Pallas (Mosaic): unpack weight tiles in VMEM, accumulate fp32.

Grid ``(M / bm, N / bn, K / (8 bg))``; the last axis walks the ``meta`` byte rows ``bg`` at a
time. Byte rows ``[r0, r0 + bg)`` describe the groups ``[r0, r0 + bg)`` (low nibbles) and
``[K/8 + r0, + bg)`` (high nibbles): for each of these two segments the step reads the matching
``[2, bg, bn]`` tile of kept values and the ``[4, bm, bg]`` tile of ``x``'s four strided column
sets (``x[:, r::4]``, split outside the kernel), builds each position's weights ``W_r`` with
compares and selects, and ``dot``s ``x_r W_r`` into a float32 accumulator: four matmuls of a
quarter of the depth, a dense matmul's FLOPs, the weight read at half its values.
"""

import dataclasses

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

from flaxseed.kernels.quant import tiling
from flaxseed.kernels.sparse import formats


@dataclasses.dataclass(frozen=True)
class Tiles:
  bm: int  # rows of x per tile (M padded to a multiple)
  bn: int  # output columns per tile (N padded to a multiple)
  bg: int  # meta byte rows (groups per segment) per step

  @staticmethod
  def plan(k: int, n: int, m: int, *, max_bg: int = 512, bn: int = 256, max_bm: int = 128):
    half = k // 8
    bg = 1
    while bg * 2 <= max_bg and half % (bg * 2) == 0:
      bg *= 2
    bm = min(max_bm, max(8, 1 << (m - 1).bit_length()))
    return Tiles(bm=bm, bn=min(bn, max(128, 1 << (n - 1).bit_length())), bg=bg)


def _kernel(x0_ref, x1_ref, v0_ref, v1_ref, meta_ref, o_ref, acc_ref):
  t = pl.program_id(2)

  @pl.when(t == 0)
  def _():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  nibbles = meta_ref[...].astype(jnp.int32)
  acc = acc_ref[...]
  for segment, (x_ref, v_ref) in enumerate(((x0_ref, v0_ref), (x1_ref, v1_ref))):
    nib = (nibbles >> (4 * segment)) & 15
    p0, p1 = nib & 3, nib >> 2
    values = v_ref[...]
    for r in range(4):
      w_r = formats.position_weights(values, p0, p1, r, x_ref.dtype)
      acc += jax.lax.dot_general(
        x_ref[r], w_r, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
      )
  acc_ref[...] = acc

  @pl.when(t == pl.num_programs(2) - 1)
  def _():
    o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def matmul(x, sw: formats.Sparse24Weight, *, interpret: bool = False):
  """``x [M, K] @ W [K, N]`` for a packed 2:4 ``W``; returns ``[M, N]`` in ``x``'s dtype."""
  m = x.shape[0]
  k, n = sw.shape
  tiles = Tiles.plan(k, n, m)
  if not interpret and tiles.bg % 128:
    raise ValueError(
      f"pallas_tpu needs K a multiple of 1024 for its tiles (K / 8 byte rows in tiles of 128), "
      f"got K={k}; use implementation='xla'"
    )
  xs = jnp.stack([x[:, r::4] for r in range(4)])  # [4, M, K/4]
  xs = tiling.pad_to(xs, 1, tiles.bm)
  values = tiling.pad_to(sw.values, 2, tiles.bn)
  meta = tiling.pad_to(sw.meta, 1, tiles.bn)
  steps = (k // 8) // tiles.bg
  x_specs = [
    pl.BlockSpec((4, tiles.bm, tiles.bg), lambda i, j, t, s=s: (0, i, s * steps + t))
    for s in range(2)
  ]
  v_specs = [
    pl.BlockSpec((2, tiles.bg, tiles.bn), lambda i, j, t, s=s: (0, s * steps + t, j))
    for s in range(2)
  ]
  out = pl.pallas_call(
    _kernel,
    grid=(xs.shape[1] // tiles.bm, values.shape[2] // tiles.bn, steps),
    in_specs=x_specs + v_specs + [pl.BlockSpec((tiles.bg, tiles.bn), lambda i, j, t: (t, j))],
    out_specs=pl.BlockSpec((tiles.bm, tiles.bn), lambda i, j, t: (i, j)),
    out_shape=jax.ShapeDtypeStruct((xs.shape[1], values.shape[2]), x.dtype),
    scratch_shapes=[pltpu.VMEM((tiles.bm, tiles.bn), jnp.float32)],
    compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
    interpret=pltpu.InterpretParams() if interpret else False,
    name="flaxseed_sparse24_matmul",
  )(xs, xs, values, values, meta)
  return out[:m, :n]
