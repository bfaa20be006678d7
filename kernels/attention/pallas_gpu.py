"""Block-sparse flash attention for GPU in Pallas (Triton): forward, dq and dk/dv kernels.

Layout ``[B, L, heads, E]`` as the model holds it (no transposes). One program per (query block,
batch, head) loops over the key blocks its row of the block layout lists (``masks.block_layout``),
read from small int32 tables; the loop length is the row's count, so empty blocks cost nothing.
Full blocks run unmasked, partial blocks under ``lax.cond`` with the in-block mask.

Forward (online softmax, as in ``pallas_tpu.py``):

    s = q k^T * scale     m' = max(m, rowmax s)     p = exp(s - m')
    l = l e^(m - m') + rowsum p      acc = acc e^(m - m') + p v      out = acc / l

Backward, with ``D = rowsum(dO * O)`` and ``p = exp(s - lse)`` recomputed:
  dq kernel  (one program per query block): loops over its key blocks, dq += ds k;
  dkv kernel (one program per key block and query head): loops over the query blocks that see it,
  dv += p^T dO, dk += ds^T q. With GQA each query head writes its own dk/dv and XLA sums the ``G``
  heads of a group afterwards (simple, and every program stays independent).

Triton wants power-of-two tiles: ``E`` is zero-padded to the next power of two (zero columns add
nothing to ``q k^T``; the padded output columns are dropped) and block sizes must be powers of two.
``interpret=True`` runs the kernels with the Pallas interpreter on CPU.
"""

import functools

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr
import jax.numpy as jnp
import numpy as np

from flaxseed.kernels.attention import block_common
from flaxseed.kernels.attention.reference import MASK_VALUE

_F32 = jnp.float32


def _pow2(n: int) -> int:
  return 1 << (int(n) - 1).bit_length()


def _table(a) -> jax.Array:
  """An int32 table zero-padded to power-of-two dims (Triton tiles; entries past counts unused)."""
  a = np.asarray(a, np.int32)
  return jnp.asarray(np.pad(a, [(0, _pow2(n) - n) for n in a.shape]))


def default_block(dtype, head_dim: int) -> int:
  """128, except 64 for float32 with heads over 64 wide: 128-row float32 tiles of width 128 (E
  padded to a power of two) overflow an H100's shared memory with segment ids (measured,
  ``experiments/benchmarks/attention.py --sections=check``)."""
  if jnp.dtype(dtype).itemsize >= 4 and head_dim > 64:
    return 64
  return block_common.DEFAULT_BLOCK


def _params(e, dtype, static):
  """Warps by head size. Unpipelined (``num_stages=1``) where double-buffered tiles overflow an
  H100's 227 KiB of shared memory (measured, ``experiments/benchmarks/attention.py
  --sections=check``): float32 tiles, and bf16 tiles wider than 64 with segment ids and a stored
  mask table."""
  heavy = static.has_segments and static.stores_blocks and e > 64
  return pltr.CompilerParams(
    num_warps=4 if e <= 64 else 8, num_stages=1 if jnp.dtype(dtype).itemsize >= 4 or heavy else 2
  )


def _block(static, code, full_step, partial_step, carry):
  """``partial_step`` where the block needs masking (code != 0), ``full_step`` elsewhere."""
  if static.has_segments:
    return partial_step(carry)
  return jax.lax.cond(code != 0, partial_step, full_step, carry)


def _visible(static, q_start, kv_start, shape, stored, code, seg_q, seg_kv):
  return block_common.visible(
    static,
    q_start,
    kv_start,
    shape,
    code=code,
    stored_block=None if stored is None else stored[jnp.maximum(code - 1, 0)],
    seg_q=None if seg_q is None else seg_q[:, None],
    seg_kv=None if seg_kv is None else seg_kv[None, :],
  )


def _split(refs, static):
  """(seg_q, seg_kv, stored) optional refs, then the rest."""
  refs = list(refs)
  seg_q = seg_kv = stored = None
  if static.has_segments:
    seg_q, seg_kv, *refs = refs
  if static.stores_blocks:
    stored, *refs = refs
  return seg_q, seg_kv, stored, refs


# ------------------------------------------------------------------------------------ forward


def _fwd_kernel(q_ref, k_ref, v_ref, blocks, counts, codes, *refs, static):
  seg_q_ref, seg_kv_ref, stored, (o_ref, lse_ref) = _split(refs, static)
  i = pl.program_id(0)
  bq, bk = static.block_q, static.block_kv
  q = q_ref[...]
  seg_q = None if seg_q_ref is None else seg_q_ref[...]

  def body(t, carry):
    kb = blocks[i, t]
    k = k_ref[pl.ds(kb * bk, bk), :]
    v = v_ref[pl.ds(kb * bk, bk), :]
    s, _ = block_common.scores(q, k, static)

    def step(carry, vis=None):
      m, l, acc = carry
      s_ = s if vis is None else jnp.where(vis, s, MASK_VALUE)
      m_new = jnp.maximum(m, jnp.max(s_, axis=1))
      p = jnp.exp(s_ - m_new[:, None])
      if vis is not None:
        p = jnp.where(vis, p, 0.0)
      correction = jnp.exp(m - m_new)
      pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=_F32)
      return m_new, correction * l + jnp.sum(p, axis=1), correction[:, None] * acc + pv

    def masked(carry):
      seg_kv = None if seg_kv_ref is None else seg_kv_ref[pl.ds(kb * bk, bk)]
      return step(
        carry, _visible(static, i * bq, kb * bk, s.shape, stored, codes[i, t], seg_q, seg_kv)
      )

    return _block(static, codes[i, t], step, masked, carry)

  init = (jnp.full((bq,), MASK_VALUE, _F32), jnp.zeros((bq,), _F32), jnp.zeros(q.shape, _F32))
  m, l, acc = jax.lax.fori_loop(0, counts[i], body, init)
  safe = jnp.where(l == 0.0, 1.0, l)  # rows that saw no key: acc is 0, so out is 0
  o_ref[...] = (acc / safe[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(safe)


def _common_specs(static, groups, length, e, walk_q: bool):
  """BlockSpecs of (q, k, v[, seg_q, seg_kv]) for grid ``(block, B, H)``.

  ``walk_q=False`` (forward, dq): q is this program's block, k/v the whole sequence.
  ``walk_q=True`` (dkv): k/v are this program's block, q the whole sequence.
  """
  bq, bk = static.block_q, static.block_kv
  whole_q = pl.BlockSpec((None, length, None, e), lambda i, b, h: (b, 0, h, 0))
  whole_kv = pl.BlockSpec((None, length, None, e), lambda i, b, h: (b, 0, h // groups, 0))
  if walk_q:
    kv = pl.BlockSpec((None, bk, None, e), lambda i, b, h: (b, i, h // groups, 0))
    specs = [whole_q, kv, kv]
  else:
    specs = [pl.BlockSpec((None, bq, None, e), lambda i, b, h: (b, i, h, 0)), whole_kv, whole_kv]
  return specs


def _optional(static, seg_q, seg_kv, walk_q: bool):
  """(specs, arrays) of the segment ids and stored mask blocks."""
  bq, bk = static.block_q, static.block_kv
  length = static.layout.padded_length
  specs, arrays = [], []
  if static.has_segments:
    whole = pl.BlockSpec((None, length), lambda i, b, h: (b, 0))
    if walk_q:
      specs += [whole, pl.BlockSpec((None, bk), lambda i, b, h: (b, i))]
    else:
      specs += [pl.BlockSpec((None, bq), lambda i, b, h: (b, i)), whole]
    arrays += [seg_q, seg_kv]
  if static.stores_blocks:
    stored = static.layout.partial_blocks.astype(np.int8)  # 1/4 of int32's shared memory
    specs.append(pl.BlockSpec(stored.shape, lambda i, b, h: (0, 0, 0)))
    arrays.append(jnp.asarray(stored))
  return specs, arrays


def _whole(shape):
  return pl.BlockSpec(shape, lambda i, b, h: (0,) * len(shape))


def _forward(q, k, v, seg_q, seg_kv, static):
  """``q [B, Lp, H, Ep]``, ``k, v [B, Lp, K, Ep]`` -> ``out`` like q, ``lse [B, H, Lp]``."""
  b, length, heads, e = q.shape
  groups = heads // k.shape[2]
  layout = static.layout
  tables = [_table(layout.kv_blocks), _table(layout.kv_counts), _table(layout.kv_codes)]
  opt_specs, opt_arrays = _optional(static, seg_q, seg_kv, walk_q=False)
  bq = static.block_q
  return pl.pallas_call(
    functools.partial(_fwd_kernel, static=static),
    grid=(length // bq, b, heads),
    in_specs=_common_specs(static, groups, length, e, walk_q=False)
    + [_whole(t.shape) for t in tables]
    + opt_specs,
    out_specs=[
      pl.BlockSpec((None, bq, None, e), lambda i, b_, h: (b_, i, h, 0)),
      pl.BlockSpec((None, None, bq), lambda i, b_, h: (b_, h, i)),
    ],
    out_shape=[
      jax.ShapeDtypeStruct(q.shape, q.dtype),
      jax.ShapeDtypeStruct((b, heads, length), _F32),
    ],
    compiler_params=_params(e, q.dtype, static),
    interpret=static.interpret,
    name="flaxseed_flash_fwd",
  )(q, k, v, *tables, *opt_arrays)


# ------------------------------------------------------------------------------------ backward


def _ds_and_p(q, k, v, do, lse, delta, static, vis):
  """Recomputed probabilities ``p`` and score gradients ``ds`` of one block (float32)."""
  s, tanh = block_common.scores(q, k, static)
  p = jnp.exp(s - lse[:, None])
  if vis is not None:
    p = jnp.where(vis, p, 0.0)
  dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=_F32)
  ds = p * (dp - delta[:, None])
  if tanh is not None:  # d(cap tanh(x / cap)) / dx = 1 - tanh^2
    ds = ds * (1.0 - tanh * tanh)
  return ds * static.sm_scale, p


def _dq_kernel(q_ref, k_ref, v_ref, blocks, counts, codes, *refs, static):
  seg_q_ref, seg_kv_ref, stored, (do_ref, lse_ref, delta_ref, dq_ref) = _split(refs, static)
  i = pl.program_id(0)
  bq, bk = static.block_q, static.block_kv
  q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
  seg_q = None if seg_q_ref is None else seg_q_ref[...]

  def body(t, dq):
    kb = blocks[i, t]
    k = k_ref[pl.ds(kb * bk, bk), :]
    v = v_ref[pl.ds(kb * bk, bk), :]

    def step(dq, vis=None):
      ds, _ = _ds_and_p(q, k, v, do, lse, delta, static, vis)
      return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=_F32)

    def masked(dq):
      seg_kv = None if seg_kv_ref is None else seg_kv_ref[pl.ds(kb * bk, bk)]
      return step(
        dq, _visible(static, i * bq, kb * bk, (bq, bk), stored, codes[i, t], seg_q, seg_kv)
      )

    return _block(static, codes[i, t], step, masked, dq)

  dq = jax.lax.fori_loop(0, counts[i], body, jnp.zeros(q.shape, _F32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, blocks, counts, codes, *refs, static):
  seg_q_ref, seg_kv_ref, stored, (do_ref, lse_ref, delta_ref, dk_ref, dv_ref) = _split(refs, static)
  j = pl.program_id(0)
  bq, bk = static.block_q, static.block_kv
  k, v = k_ref[...], v_ref[...]
  seg_kv = None if seg_kv_ref is None else seg_kv_ref[...]

  def body(t, carry):
    qb = blocks[j, t]
    rows = pl.ds(qb * bq, bq)
    q, do = q_ref[rows, :], do_ref[rows, :]
    lse, delta = lse_ref[rows], delta_ref[rows]

    def step(carry, vis=None):
      dk, dv = carry
      ds, p = _ds_and_p(q, k, v, do, lse, delta, static, vis)
      dv = dv + jnp.dot(p.astype(do.dtype).T, do, preferred_element_type=_F32)
      dk = dk + jnp.dot(ds.astype(q.dtype).T, q, preferred_element_type=_F32)
      return dk, dv

    def masked(carry):
      seg_q = None if seg_q_ref is None else seg_q_ref[rows]
      return step(
        carry, _visible(static, qb * bq, j * bk, (bq, bk), stored, codes[j, t], seg_q, seg_kv)
      )

    return _block(static, codes[j, t], step, masked, carry)

  zeros = jnp.zeros(k.shape, _F32)
  dk, dv = jax.lax.fori_loop(0, counts[j], body, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _backward(q, k, v, seg_q, seg_kv, out, lse, d_out, static):
  b, length, heads, e = q.shape
  groups = heads // k.shape[2]
  layout = static.layout
  bq, bk = static.block_q, static.block_kv
  delta = jnp.sum(d_out.astype(_F32) * out.astype(_F32), axis=-1).transpose(0, 2, 1)  # [B,H,L]

  q_tables = [_table(layout.kv_blocks), _table(layout.kv_counts), _table(layout.kv_codes)]
  opt_specs, opt_arrays = _optional(static, seg_q, seg_kv, walk_q=False)
  own_row = lambda i, b_, h: (b_, h, i)
  dq = pl.pallas_call(
    functools.partial(_dq_kernel, static=static),
    grid=(length // bq, b, heads),
    in_specs=_common_specs(static, groups, length, e, walk_q=False)
    + [_whole(t.shape) for t in q_tables]
    + opt_specs
    + [
      pl.BlockSpec((None, bq, None, e), lambda i, b_, h: (b_, i, h, 0)),
      pl.BlockSpec((None, None, bq), own_row),
      pl.BlockSpec((None, None, bq), own_row),
    ],
    out_specs=pl.BlockSpec((None, bq, None, e), lambda i, b_, h: (b_, i, h, 0)),
    out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
    compiler_params=_params(e, q.dtype, static),
    interpret=static.interpret,
    name="flaxseed_flash_dq",
  )(q, k, v, *q_tables, *opt_arrays, d_out, lse, delta)

  kv_tables = [_table(layout.q_blocks), _table(layout.q_counts), _table(layout.q_codes)]
  opt_specs, opt_arrays = _optional(static, seg_q, seg_kv, walk_q=True)
  whole_row = lambda i, b_, h: (b_, h, 0)
  per_head = pl.BlockSpec((None, bk, None, e), lambda i, b_, h: (b_, i, h, 0))
  dk, dv = pl.pallas_call(
    functools.partial(_dkv_kernel, static=static),
    grid=(length // bk, b, heads),
    in_specs=_common_specs(static, groups, length, e, walk_q=True)
    + [_whole(t.shape) for t in kv_tables]
    + opt_specs
    + [
      pl.BlockSpec((None, length, None, e), lambda i, b_, h: (b_, 0, h, 0)),
      pl.BlockSpec((None, None, length), whole_row),
      pl.BlockSpec((None, None, length), whole_row),
    ],
    out_specs=[per_head, per_head],
    out_shape=[jax.ShapeDtypeStruct(q.shape, k.dtype if groups == 1 else _F32)] * 2,
    compiler_params=_params(e, q.dtype, static),
    interpret=static.interpret,
    name="flaxseed_flash_dkv",
  )(q, k, v, *kv_tables, *opt_arrays, d_out, lse, delta)
  if groups > 1:  # per-query-head partials -> per-kv-head sums
    dk, dv = (x.reshape(b, length, k.shape[2], groups, e).sum(3).astype(k.dtype) for x in (dk, dv))
  return dq, dk, dv


# ------------------------------------------------------------------------------------ entry

_attention = block_common.flash_vjp(_forward, _backward)


def attention(q_BLHE, k_BLKE, v_BLKE, seg_q, seg_kv, static: block_common.Static):
  """Block-sparse attention of ``[B, L, heads, E]`` arrays (``seg_*``: ``[B, L]`` ints, or
  ``None`` when ``static.has_segments`` is false)."""
  for name in ("block_q", "block_kv"):
    size = getattr(static, name)
    if size != _pow2(size):
      raise ValueError(f"pallas_gpu needs power-of-two block sizes, got {name}={size}")
  length, e = q_BLHE.shape[1], q_BLHE.shape[3]
  padded, e_padded = static.layout.padded_length, _pow2(e)

  def to_kernel(x):
    return block_common.pad_length(block_common.pad_length(x, 1, padded), 3, e_padded)

  if static.has_segments:
    seg_q, seg_kv = (
      block_common.pad_length(s.astype(jnp.int32), 1, padded) for s in (seg_q, seg_kv)
    )
  out = _attention(to_kernel(q_BLHE), to_kernel(k_BLKE), to_kernel(v_BLKE), seg_q, seg_kv, static)
  return out[:, :length, :, :e]
