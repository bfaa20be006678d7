"""Weight-only quantized matmul for GPU in Pallas (Triton): dequantize in registers, fp32 acc.

One program per ``[bm, bn]`` output tile loops over the packed weight's byte rows in steps of
``bkp``: it loads a ``[bkp, bn]`` tile of codes (1/p of the float tile's bytes) and, per packing
segment, the matching ``[bm, bkp]`` slice of ``x``, unpacks, scales and accumulates with ``dot``.
Decode shapes (small M) are memory-bound: the weight bytes read are what the format saves.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from flaxseed.kernels.quant import formats
from flaxseed.kernels.quant import tiling


def _kernel(x_ref, values_ref, scales_ref, o_ref, *, layout: formats.Layout,
            tiles: tiling.Tiles):
  p, bkp = layout.per_byte, tiles.bkp
  byte_rows = layout.shape[0] // p

  def step(t, acc):
    values = values_ref[pl.ds(t * bkp, bkp), :]
    for j in range(p):
      codes = values.astype(jnp.int32) if layout.fmt == "int8" else formats.unpack_segment(
          values, p, j)
      if layout.fmt == "ternary":
        scale = scales_ref[0, 0]
      else:
        scale = scales_ref[tiling.scale_block(layout, j, t, bkp), :][None, :]
      x = x_ref[:, pl.ds(j * byte_rows + t * bkp, bkp)]
      w = (formats.codes_to_levels(codes, layout.fmt) * scale).astype(x.dtype)
      acc += jnp.dot(x, w, preferred_element_type=jnp.float32)
    return acc

  acc = jax.lax.fori_loop(0, byte_rows // bkp, step,
                          jnp.zeros((tiles.bm, tiles.bn), jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def matmul(x, qw: formats.QuantizedWeight, *, interpret: bool = False):
  """``x [M, K] @ W [K, N]`` for a quantized ``W``; returns ``[M, N]`` in ``x``'s dtype."""
  layout = qw.layout
  m = x.shape[0]
  k, n = layout.shape
  # tl.dot needs M >= 16; tiles stay inside one scale group (bkp <= group size): no reshapes.
  tiles = tiling.Tiles.plan(layout, m, min_bm=16, max_bm=64, bn=128,
                            max_bkp=min(256, layout.group_size or 256))
  x = tiling.pad_to(x, 0, tiles.bm)
  values = tiling.pad_to(qw.values, 1, tiles.bn)
  scales = qw.scales if layout.fmt == "ternary" else tiling.pad_to(qw.scales, 1, tiles.bn)
  if layout.fmt == "ternary":
    scale_spec = pl.BlockSpec((1, 1), lambda i, jn: (0, 0))
  else:
    scale_spec = pl.BlockSpec((scales.shape[0], tiles.bn), lambda i, jn: (0, jn))
  out = pl.pallas_call(
      functools.partial(_kernel, layout=layout, tiles=tiles),
      grid=(x.shape[0] // tiles.bm, values.shape[1] // tiles.bn),
      in_specs=[pl.BlockSpec((tiles.bm, k), lambda i, jn: (i, 0)),
                pl.BlockSpec((values.shape[0], tiles.bn), lambda i, jn: (0, jn)),
                scale_spec],
      out_specs=pl.BlockSpec((tiles.bm, tiles.bn), lambda i, jn: (i, jn)),
      out_shape=jax.ShapeDtypeStruct((x.shape[0], values.shape[1]), x.dtype),
      compiler_params=pltr.CompilerParams(num_warps=4, num_stages=3),
      interpret=interpret, name=f"flaxseed_{layout.fmt}_matmul",
  )(x, values, scales)
  return out[:m, :n]
