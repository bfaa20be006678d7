"""Block-sparse flash attention for TPU in Pallas (Mosaic): forward, dq and dk/dv kernels.

Layout ``[B, heads, L, E]``. The block layout of the mask (``masks.block_layout``) is prefetched
into SMEM as scalars; the last grid axis walks the visit list of the current block, and the
BlockSpec index maps read the list to choose which block of K and V (forward, dq) or of Q, dO
(dk/dv) the pipeline copies next. Entries past a list's count repeat its last block, so no copy
is issued for them, and the body skips them: empty blocks cost neither bandwidth nor FLOPs.

Forward (grid ``B, H, q blocks, visits``), online softmax over the visited key blocks:

    s = q k^T * scale (capped, masked)     m' = max(m, rowmax s)     p = exp(s - m')
    l = l e^(m - m') + rowsum p            acc = acc e^(m - m') + p v
    out = acc / l,  lse = m + log l        (rows that see nothing: out = 0)

Backward, with ``D = rowsum(dO * O)`` computed outside, recomputes ``p = exp(s - lse)``:
  dq kernel  (grid ``B, H, q blocks, visits``):               dq += ds k
  dkv kernel (grid ``B, K, kv blocks, G, visits``):  dv += p^T dO,  dk += ds^T q,
where ``ds = p (dO v^T - D) * scale`` (times ``1 - tanh^2`` under a soft cap). For GQA the dkv
grid walks the ``G`` query heads of a kv head one after another, accumulating in VMEM.

Mosaic kernels cannot be partitioned by XLA: ``api`` wraps this in ``shard_map`` when given a
mesh. ``interpret=True`` runs the kernels with the TPU interpreter on CPU (tests: TPU memory
semantics, race and out-of-bounds detection); ``interpret="generic"`` with the plain Pallas
interpreter, which has no side effects and so can run inside ``nn.scan`` (the transformer's
``attention_interpret``).
"""

import functools

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

from flaxseed.kernels.attention import block_common
from flaxseed.kernels.attention.reference import MASK_VALUE

_F32 = jnp.float32


def default_block(dtype, head_dim: int) -> int:
  """128 x 128 blocks (the MXU tile) whatever the dtype and head size."""
  del dtype, head_dim
  return block_common.DEFAULT_BLOCK


def _interpret(static):
  if static.interpret == "generic":
    return True
  return pltpu.InterpretParams() if static.interpret else False


def _unpack(refs, static):
  """Splits a kernel's refs into ``(q, k, v, seg_q, seg_kv, stored block)`` (the optional ones
  ``None`` when absent) and the rest (more inputs, outputs, scratch)."""
  refs = list(refs)
  q, k, v = refs[:3]
  rest = refs[3:]
  seg_q = seg_kv = block = None
  if static.has_segments:
    seg_q, seg_kv, *rest = rest
  if static.stores_blocks:
    block, *rest = rest
  return (q, k, v, seg_q, seg_kv, block), rest


def _visible_or_none(static, code, q_start, kv_start, shape, block, seg_q, seg_kv):
  """The in-block mask of a block with layout code ``code`` (``None``: a full block)."""
  if code is None:
    return None
  return block_common.visible(
    static,
    q_start,
    kv_start,
    shape,
    code=code,
    stored_block=None if block is None else block[...],
    seg_q=None if seg_q is None else seg_q[...],
    seg_kv=None if seg_kv is None else seg_kv[...],
  )


def _for_full_and_partial(static, code, body):
  """Runs ``body(code)`` with the in-block mask only where the block needs one (code != 0),
  ``body(None)`` elsewhere."""
  if static.has_segments:  # segment ids: every block may need masking
    body(code)
    return

  @pl.when(code == 0)
  def _():
    body(None)

  @pl.when(code != 0)
  def _():
    body(code)


# ------------------------------------------------------------------------------------ forward


def _fwd_kernel(kv_blocks, kv_counts, kv_codes, *refs, static):
  (q_ref, k_ref, v_ref, seg_q, seg_kv, block), (o_ref, lse_ref, m_scr, l_scr, acc_scr) = _unpack(
    refs, static
  )
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _():
    m_scr[...] = jnp.full(m_scr.shape, MASK_VALUE, _F32)
    l_scr[...] = jnp.zeros(l_scr.shape, _F32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, _F32)

  def step(code):
    s, _ = block_common.scores(q_ref[...], k_ref[...], static)
    vis = _visible_or_none(
      static,
      code,
      i * static.block_q,
      kv_blocks[i, j] * static.block_kv,
      s.shape,
      block,
      seg_q,
      seg_kv,
    )
    if vis is not None:
      s = jnp.where(vis, s, MASK_VALUE)
    m_prev = m_scr[...]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    p = jnp.exp(s - m_new)
    if vis is not None:
      p = jnp.where(vis, p, 0.0)
    correction = jnp.exp(m_prev - m_new)
    l_scr[...] = correction * l_scr[...] + jnp.sum(p, axis=1, keepdims=True)
    acc_scr[...] = correction * acc_scr[...] + jax.lax.dot_general(
      p.astype(v_ref.dtype), v_ref[...], (((1,), (0,)), ((), ())), preferred_element_type=_F32
    )
    m_scr[...] = m_new

  @pl.when(j < kv_counts[i])
  def _():
    _for_full_and_partial(static, kv_codes[i, j], step)

  @pl.when(j == pl.num_programs(3) - 1)
  def _():
    l = l_scr[...]
    safe = jnp.where(l == 0.0, 1.0, l)  # rows that saw no key: acc is 0, so out is 0
    o_ref[...] = (acc_scr[...] / safe).astype(o_ref.dtype)
    lse_ref[...] = m_scr[...] + jnp.log(safe)


def _specs_for_q_walk(static, heads, kv_heads, e):
  """BlockSpecs of (q, k, v, segs, stored block) for grids ``(B, H, q block, visit)``."""
  bq, bk, groups = static.block_q, static.block_kv, heads // kv_heads
  q_map = lambda b, h, i, j, blocks, *_: (b, h, i, 0)
  kv_map = lambda b, h, i, j, blocks, *_: (b, h // groups, blocks[i, j], 0)
  specs = [
    pl.BlockSpec((None, None, bq, e), q_map),
    pl.BlockSpec((None, None, bk, e), kv_map),
    pl.BlockSpec((None, None, bk, e), kv_map),
  ]
  if static.has_segments:
    specs += [
      pl.BlockSpec((None, bq, 1), lambda b, h, i, j, *_: (b, i, 0)),
      pl.BlockSpec((None, 1, bk), lambda b, h, i, j, blocks, *_: (b, 0, blocks[i, j])),
    ]
  if static.stores_blocks:
    specs.append(
      pl.BlockSpec(
        (None, bq, bk),
        lambda b, h, i, j, blocks, counts, codes: (jnp.maximum(codes[i, j] - 1, 0), 0, 0),
      )
    )
  return specs


def _extra_inputs(static, seg_q, seg_kv, stored):
  extra = []
  if static.has_segments:
    extra += [seg_q[:, :, None], seg_kv[:, None, :]]
  if static.stores_blocks:
    extra.append(stored)
  return extra


def _forward(q, k, v, seg_q, seg_kv, static):
  """``q [B, H, Lp, E]``, ``k, v [B, K, Lp, E]`` -> ``out [B, H, Lp, E]``, ``lse [B, H, Lp, 1]``."""
  b, heads, length, e = q.shape
  layout = static.layout
  bq = static.block_q
  grid = (b, heads, length // bq, layout.kv_blocks.shape[1])
  row = lambda b_, h, i, j, *_: (b_, h, i, 0)
  out, lse = pl.pallas_call(
    functools.partial(_fwd_kernel, static=static),
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3,
      grid=grid,
      in_specs=_specs_for_q_walk(static, heads, k.shape[1], e),
      out_specs=[pl.BlockSpec((None, None, bq, e), row), pl.BlockSpec((None, None, bq, 1), row)],
      scratch_shapes=[
        pltpu.VMEM((bq, 1), _F32),
        pltpu.VMEM((bq, 1), _F32),
        pltpu.VMEM((bq, e), _F32),
      ],
    ),
    out_shape=[
      jax.ShapeDtypeStruct(q.shape, q.dtype),
      jax.ShapeDtypeStruct((b, heads, length, 1), _F32),
    ],
    compiler_params=pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
    ),
    interpret=_interpret(static),
    name="flaxseed_flash_fwd",
  )(
    *_tables(layout.kv_blocks, layout.kv_counts, layout.kv_codes),
    q,
    k,
    v,
    *_extra_inputs(static, seg_q, seg_kv, _stored(static)),
  )
  return out, lse


def _tables(*arrays):
  return [jnp.asarray(a, jnp.int32) for a in arrays]


def _stored(static):
  return jnp.asarray(static.layout.partial_blocks, jnp.int32) if static.stores_blocks else None


# ------------------------------------------------------------------------------------ backward


def _dq_kernel(kv_blocks, kv_counts, kv_codes, *refs, static):
  (q_ref, k_ref, v_ref, seg_q, seg_kv, block), rest = _unpack(refs, static)
  do_ref, lse_ref, delta_ref, dq_ref, dq_scr = rest
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _():
    dq_scr[...] = jnp.zeros(dq_scr.shape, _F32)

  def step(code):
    k = k_ref[...]
    ds, _ = _ds_and_p(
      q_ref[...],
      k,
      v_ref[...],
      do_ref[...],
      lse_ref[...],
      delta_ref[...],
      static,
      code,
      i * static.block_q,
      kv_blocks[i, j] * static.block_kv,
      block,
      seg_q,
      seg_kv,
    )
    dq_scr[...] += jax.lax.dot_general(
      ds.astype(k.dtype), k, (((1,), (0,)), ((), ())), preferred_element_type=_F32
    )

  @pl.when(j < kv_counts[i])
  def _():
    _for_full_and_partial(static, kv_codes[i, j], step)

  @pl.when(j == pl.num_programs(3) - 1)
  def _():
    dq_ref[...] = dq_scr[...].astype(dq_ref.dtype)


def _ds_and_p(q, k, v, do, lse, delta, static, code, q_start, kv_start, block, seg_q, seg_kv):
  """Recomputed probabilities ``p`` and score gradients ``ds`` of one block (float32)."""
  s, tanh = block_common.scores(q, k, static)
  p = jnp.exp(s - lse)
  vis = _visible_or_none(static, code, q_start, kv_start, s.shape, block, seg_q, seg_kv)
  if vis is not None:
    p = jnp.where(vis, p, 0.0)
  dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=_F32)
  ds = p * (dp - delta)
  if tanh is not None:  # d(cap tanh(x / cap)) / dx = 1 - tanh^2
    ds = ds * (1.0 - tanh * tanh)
  return ds * static.sm_scale, p


def _dkv_kernel(q_blocks, q_counts, q_codes, *refs, static):
  (q_ref, k_ref, v_ref, seg_q, seg_kv, block), rest = _unpack(refs, static)
  do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_scr, dv_scr = rest
  jk, g, t = pl.program_id(2), pl.program_id(3), pl.program_id(4)

  @pl.when((g == 0) & (t == 0))
  def _():
    dk_scr[...] = jnp.zeros(dk_scr.shape, _F32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, _F32)

  def step(code):
    q, do = q_ref[...], do_ref[...]
    ds, p = _ds_and_p(
      q,
      k_ref[...],
      v_ref[...],
      do,
      lse_ref[...],
      delta_ref[...],
      static,
      code,
      q_blocks[jk, t] * static.block_q,
      jk * static.block_kv,
      block,
      seg_q,
      seg_kv,
    )
    transpose_lhs = (((0,), (0,)), ((), ()))
    dv_scr[...] += jax.lax.dot_general(
      p.astype(do.dtype), do, transpose_lhs, preferred_element_type=_F32
    )
    dk_scr[...] += jax.lax.dot_general(
      ds.astype(q.dtype), q, transpose_lhs, preferred_element_type=_F32
    )

  @pl.when(t < q_counts[jk])
  def _():
    _for_full_and_partial(static, q_codes[jk, t], step)

  @pl.when((g == pl.num_programs(3) - 1) & (t == pl.num_programs(4) - 1))
  def _():
    dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _backward(q, k, v, seg_q, seg_kv, out, lse, d_out, static):
  b, heads, length, e = q.shape
  kv_heads = k.shape[1]
  groups = heads // kv_heads
  layout = static.layout
  bq, bk = static.block_q, static.block_kv
  delta = jnp.sum(d_out.astype(_F32) * out.astype(_F32), axis=-1, keepdims=True)
  extra = _extra_inputs(static, seg_q, seg_kv, _stored(static))
  params = lambda n: pltpu.CompilerParams(
    dimension_semantics=("parallel",) * 3 + ("arbitrary",) * (n - 3)
  )

  row = lambda b_, h, i, j, *_: (b_, h, i, 0)
  dq = pl.pallas_call(
    functools.partial(_dq_kernel, static=static),
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3,
      grid=(b, heads, length // bq, layout.kv_blocks.shape[1]),
      in_specs=_specs_for_q_walk(static, heads, kv_heads, e)
      + [
        pl.BlockSpec((None, None, bq, e), row),
        pl.BlockSpec((None, None, bq, 1), row),
        pl.BlockSpec((None, None, bq, 1), row),
      ],
      out_specs=pl.BlockSpec((None, None, bq, e), row),
      scratch_shapes=[pltpu.VMEM((bq, e), _F32)],
    ),
    out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
    compiler_params=params(4),
    interpret=_interpret(static),
    name="flaxseed_flash_dq",
  )(
    *_tables(layout.kv_blocks, layout.kv_counts, layout.kv_codes),
    q,
    k,
    v,
    *extra,
    d_out,
    lse,
    delta,
  )

  # dk/dv: grid (B, K, kv block, group member, visit); q-side blocks follow the visit list.
  q_map = lambda b_, kh, jk, g, t, blocks, *_: (b_, kh * groups + g, blocks[jk, t], 0)
  kv_map = lambda b_, kh, jk, g, t, *_: (b_, kh, jk, 0)
  specs = [
    pl.BlockSpec((None, None, bq, e), q_map),
    pl.BlockSpec((None, None, bk, e), kv_map),
    pl.BlockSpec((None, None, bk, e), kv_map),
  ]
  if static.has_segments:
    specs += [
      pl.BlockSpec((None, bq, 1), lambda b_, kh, jk, g, t, blocks, *_: (b_, blocks[jk, t], 0)),
      pl.BlockSpec((None, 1, bk), lambda b_, kh, jk, g, t, *_: (b_, 0, jk)),
    ]
  if static.stores_blocks:
    specs.append(
      pl.BlockSpec(
        (None, bq, bk),
        lambda b_, kh, jk, g, t, blocks, counts, codes: (jnp.maximum(codes[jk, t] - 1, 0), 0, 0),
      )
    )
  specs += [
    pl.BlockSpec((None, None, bq, e), q_map),
    pl.BlockSpec((None, None, bq, 1), q_map),
    pl.BlockSpec((None, None, bq, 1), q_map),
  ]
  dk, dv = pl.pallas_call(
    functools.partial(_dkv_kernel, static=static),
    grid_spec=pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3,
      grid=(b, kv_heads, length // bk, groups, layout.q_blocks.shape[1]),
      in_specs=specs,
      out_specs=[
        pl.BlockSpec((None, None, bk, e), kv_map),
        pl.BlockSpec((None, None, bk, e), kv_map),
      ],
      scratch_shapes=[pltpu.VMEM((bk, e), _F32), pltpu.VMEM((bk, e), _F32)],
    ),
    out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
    compiler_params=params(5),
    interpret=_interpret(static),
    name="flaxseed_flash_dkv",
  )(*_tables(layout.q_blocks, layout.q_counts, layout.q_codes), q, k, v, *extra, d_out, lse, delta)
  return dq, dk, dv


# ------------------------------------------------------------------------------------ entry

_attention = block_common.flash_vjp(_forward, _backward)


def attention(q_BLHE, k_BLKE, v_BLKE, seg_q, seg_kv, static: block_common.Static):
  """Block-sparse attention of ``[B, L, heads, E]`` arrays (``seg_*``: ``[B, L]`` int32, or
  ``None`` when ``static.has_segments`` is false)."""
  b, length = q_BLHE.shape[:2]
  padded = static.layout.padded_length
  to_kernel = lambda x: block_common.pad_length(x.transpose(0, 2, 1, 3), 2, padded)
  if static.has_segments:
    seg_q, seg_kv = (
      block_common.pad_length(s.astype(jnp.int32), 1, padded) for s in (seg_q, seg_kv)
    )
  out = _attention(to_kernel(q_BLHE), to_kernel(k_BLKE), to_kernel(v_BLKE), seg_q, seg_kv, static)
  return out[:, :, :length].transpose(0, 2, 1, 3)
