"""Weight-only quantized matmul for TPU in Pallas (Mosaic): dequantize in VMEM, accumulate fp32.

Grid ``(M / bm, N / bn, K / (p * bkp))``; the last axis walks the packed weight's byte rows.
Each step copies one ``[bkp, bn]`` tile of packed codes (1/p of the bytes of the float tile it
stands for) and, per packing segment (see ``formats``), a ``[bm, bkp]`` tile of ``x`` and the
segment's scales; then unpacks the codes with shifts and masks, maps them to levels, scales them
and ``dot``s into a float32 accumulator. Scales travel as ``[groups, 1, N]`` so that a block of
them is ``(rows, 1, bn)``: Mosaic wants the last two block dims divisible by (8, 128) or whole.
"""

import functools

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

from flaxseed.kernels.quant import formats
from flaxseed.kernels.quant import tiling


def _kernel(*refs, layout: formats.Layout, tiles: tiling.Tiles):
  p = layout.per_byte
  x_refs, values_ref = refs[:p], refs[p]
  scale_refs, (o_ref, acc_ref) = refs[p + 1 : 2 * p + 1], refs[2 * p + 1 :]
  t = pl.program_id(2)
  per_tile = tiling.groups_per_tile(layout, tiles.bkp)

  @pl.when(t == 0)
  def _():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  values = values_ref[...]
  acc = acc_ref[...]
  for j in range(p):
    codes = (
      values.astype(jnp.int32) if layout.fmt == "int8" else formats.unpack_segment(values, p, j)
    )
    levels = formats.codes_to_levels(codes, layout.fmt)
    scales = scale_refs[j][...]  # [per_tile, 1, bn]
    if per_tile == 1:
      w = levels * scales[0]
    else:  # the tile covers several groups: scale each group's rows
      w = (levels.reshape(per_tile, tiles.bkp // per_tile, tiles.bn) * scales).reshape(
        tiles.bkp, tiles.bn
      )
    acc += jax.lax.dot_general(
      x_refs[j][...],
      w.astype(x_refs[j].dtype),
      (((1,), (0,)), ((), ())),
      preferred_element_type=jnp.float32,
    )
  acc_ref[...] = acc

  @pl.when(t == pl.num_programs(2) - 1)
  def _():
    o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def matmul(x, qw: formats.QuantizedWeight, *, interpret: bool = False):
  """``x [M, K] @ W [K, N]`` for a quantized ``W``; returns ``[M, N]`` in ``x``'s dtype."""
  layout = qw.layout
  m = x.shape[0]
  k, n = layout.shape
  p = layout.per_byte
  tiles = tiling.Tiles.plan(layout, m)
  x = tiling.pad_to(x, 0, tiles.bm)
  values = tiling.pad_to(qw.values, 1, tiles.bn)
  scales = qw.scales[:, None, :]  # [groups, 1, N]
  if layout.fmt == "ternary":
    scales = jnp.broadcast_to(scales, (1, 1, n))
  scales = tiling.pad_to(scales, 2, tiles.bn)
  steps = (k // p) // tiles.bkp
  per_tile = tiling.groups_per_tile(layout, tiles.bkp)
  x_specs = [
    pl.BlockSpec((tiles.bm, tiles.bkp), lambda i, jn, t, seg=seg: (i, seg * steps + t))
    for seg in range(p)
  ]
  scale_specs = [
    pl.BlockSpec(
      (per_tile, 1, tiles.bn),
      lambda i, jn, t, seg=seg: (tiling.scale_block(layout, seg, t, tiles.bkp), 0, jn),
    )
    for seg in range(p)
  ]
  out = pl.pallas_call(
    functools.partial(_kernel, layout=layout, tiles=tiles),
    grid=(x.shape[0] // tiles.bm, values.shape[1] // tiles.bn, steps),
    in_specs=x_specs
    + [pl.BlockSpec((tiles.bkp, tiles.bn), lambda i, jn, t: (t, jn))]
    + scale_specs,
    out_specs=pl.BlockSpec((tiles.bm, tiles.bn), lambda i, jn, t: (i, jn)),
    out_shape=jax.ShapeDtypeStruct((x.shape[0], values.shape[1]), x.dtype),
    scratch_shapes=[pltpu.VMEM((tiles.bm, tiles.bn), jnp.float32)],
    compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
    interpret=pltpu.InterpretParams() if interpret else False,
    name=f"flaxseed_{layout.fmt}_matmul",
  )(*([x] * p), values, *([scales] * p))
  return out[:m, :n]


def _w8a8_kernel(x_ref, x_scale_ref, w_ref, w_scale_ref, o_ref, acc_ref):
  t = pl.program_id(2)

  @pl.when(t == 0)
  def _():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.int32)

  acc_ref[...] += jax.lax.dot_general(
    x_ref[...], w_ref[...], (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32
  )

  @pl.when(t == pl.num_programs(2) - 1)
  def _():
    scaled = acc_ref[...].astype(jnp.float32) * x_scale_ref[...] * w_scale_ref[0]
    o_ref[...] = scaled.astype(o_ref.dtype)


def w8a8_matmul(codes, x_scale, qw: formats.QuantizedWeight, *, out_dtype, interpret: bool = False):
  """int8 activations ``codes [M, K]`` (row scales ``x_scale [M, 1]``) times an int8 weight with
  per-channel scales: int32 accumulation on the MXU, rescaled at the end."""
  layout = qw.layout
  if layout.fmt != "int8" or layout.group_size is not None:
    raise ValueError("w8a8 needs int8 weights with per-channel scales (group_size=None)")
  m = codes.shape[0]
  k, n = layout.shape
  tiles = tiling.Tiles.plan(layout, m, min_bm=32)  # int8 tiles: 32 sublanes
  codes = tiling.pad_to(codes, 0, tiles.bm)
  x_scale = tiling.pad_to(x_scale, 0, tiles.bm)
  values = tiling.pad_to(qw.values, 1, tiles.bn)
  w_scale = tiling.pad_to(qw.scales[:, None, :], 2, tiles.bn)
  out = pl.pallas_call(
    _w8a8_kernel,
    grid=(codes.shape[0] // tiles.bm, values.shape[1] // tiles.bn, k // tiles.bkp),
    in_specs=[
      pl.BlockSpec((tiles.bm, tiles.bkp), lambda i, jn, t: (i, t)),
      pl.BlockSpec((tiles.bm, 1), lambda i, jn, t: (i, 0)),
      pl.BlockSpec((tiles.bkp, tiles.bn), lambda i, jn, t: (t, jn)),
      pl.BlockSpec((1, 1, tiles.bn), lambda i, jn, t: (0, 0, jn)),
    ],
    out_specs=pl.BlockSpec((tiles.bm, tiles.bn), lambda i, jn, t: (i, jn)),
    out_shape=jax.ShapeDtypeStruct((codes.shape[0], values.shape[1]), out_dtype),
    scratch_shapes=[pltpu.VMEM((tiles.bm, tiles.bn), jnp.int32)],
    compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
    interpret=pltpu.InterpretParams() if interpret else False,
    name="flaxseed_w8a8_matmul",
  )(codes, x_scale, values, w_scale)
  return out[:m, :n]
