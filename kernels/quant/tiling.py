"""How the quantized-matmul kernels tile ``y [M, N] = x [M, K] @ W [K, N]``.

Both kernels walk the packed weight in tiles of ``bkp`` byte rows by ``bn`` columns. Byte rows
``[r0, r0 + bkp)`` hold, for each segment ``j < p`` (``p`` values per byte), the weight rows
``[j K/p + r0, + bkp)``: the kernel multiplies each with the matching columns of ``x`` and sums.
``bkp`` is a power of two dividing ``K / p``; group sizes are powers of two too, so a tile either
lies inside one scale group or covers whole groups (``groups_per_tile`` of them), never parts.
"""

import dataclasses

import jax
import jax.numpy as jnp

from flaxseed.kernels.quant.formats import Layout


@dataclasses.dataclass(frozen=True)
class Tiles:
  """Tile sizes of one call (hashable, static)."""

  bm: int  # rows of x per tile (M is padded to a multiple)
  bn: int  # output columns per tile (N is padded to a multiple)
  bkp: int  # packed byte rows per step (bkp * p weight rows)

  @staticmethod
  def plan(
    layout: Layout, m: int, *, max_bkp: int = 512, bn: int = 256, min_bm: int = 8, max_bm: int = 128
  ) -> "Tiles":
    k, n = layout.shape
    byte_rows = k // layout.per_byte
    bkp = 1
    while bkp * 2 <= max_bkp and byte_rows % (bkp * 2) == 0:
      bkp *= 2
    bm = min(max_bm, max(min_bm, 1 << (m - 1).bit_length()))
    bn = min(bn, max(128, 1 << (n - 1).bit_length()))
    return Tiles(bm=bm, bn=bn, bkp=bkp)


def groups_per_tile(layout: Layout, bkp: int) -> int:
  """Scale rows one tile of ``bkp`` weight rows spans (1 when it lies inside one group)."""
  if layout.fmt == "ternary" or layout.group_size is None:
    return 1
  return max(1, bkp // layout.group_size)


def scale_block(layout: Layout, segment: int, step, bkp: int):
  """Block index, in units of ``groups_per_tile`` scale rows, of the scales of segment
  ``segment`` at byte-row step ``step``."""
  if layout.fmt == "ternary" or layout.group_size is None:
    return 0
  # Non-negative operands: lax.div (truncating) is floor division here, and lowers on TPU
  # without the sign fix-ups of jnp's floor_divide.
  first_row = segment * (layout.shape[0] // layout.per_byte) + step * bkp
  return jax.lax.div(first_row, layout.group_size * groups_per_tile(layout, bkp))


def pad_to(x, axis: int, multiple: int):
  extra = -x.shape[axis] % multiple
  if not extra:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths)
