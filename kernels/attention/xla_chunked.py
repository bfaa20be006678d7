"""Memory-efficient attention in pure XLA: the Pallas kernels' block walk, written with lax loops.

The same block layout the kernels use (``masks.block_layout``) drives three loops; each holds one
``[block_q, block_kv]`` tile of scores per (batch, kv head) at a time, so memory is ``O(L)``:
a 32k-token forward+backward fits in laptop memory (``experiments/benchmarks/attention.py``).

  forward: ``lax.map`` over query blocks; inside, ``fori_loop`` over the key blocks the layout
           lists for that block (a dynamic trip count: empty blocks cost nothing), online softmax
           ``m, l, acc`` as in FlashAttention; keeps only ``out`` and ``lse = m + log l``.
  dq:      the same walk, ``dq += ds k``.
  dk, dv:  ``lax.map`` over key blocks, walking the query blocks that see each one (the
           transposed layout): ``dv += p^T dO``, ``dk += ds^T q``.

with ``p = exp(s - lse)`` recomputed and ``ds = p (dO v^T - D) * scale``, ``D = rowsum(dO * O)``.
Tiles are in the grouped layout ``[B, K, block * G, E]`` (the ``G`` query heads of a kv head as
extra rows), so every matmul is one batched matmul over ``B x K`` and dk/dv sum over the group for
free. Full blocks skip in-block masking (``lax.cond``); partial blocks mask with
``block_common.visible``, exactly as the kernels do.
"""

import jax
import jax.numpy as jnp
import numpy as np

from flaxseed.kernels.attention import block_common
from flaxseed.kernels.attention import masks
from flaxseed.kernels.attention import reference
from flaxseed.kernels.attention.reference import MASK_VALUE

_F32 = jnp.float32


BlockSizes = block_common.BlockSizes


def default_block(length: int) -> int:
  """64-tiles up to L = 512, 128 beyond (so walks up to L = 1024 have at most 8 blocks and are
  unrolled). On a 2-core CPU (causal fwd+bwd, B=16, H=4, E=64, unrolled) 64-tiles beat 128 and
  256 by 10-30% at L = 128, 256 and 512; as lax loops, 128-tiles beat 64, 256 and 512 at 1024."""
  return 64 if length <= 512 else 128


def attention(
  q_BLHE,
  k_BLKE,
  v_BLKE,
  *,
  causal: bool = False,
  segment_ids=None,
  sm_scale: float | None = None,
  logit_soft_cap: float | None = None,
  block_sizes: BlockSizes | None = None,
  mask: masks.Mask | None = None,
):
  """Same contract as ``reference.attention`` for self-attention (``Lq == Lk``)."""
  b, length, h, e = q_BLHE.shape
  kv_heads = k_BLKE.shape[2]
  segment_ids = reference.as_segment_ids(segment_ids)
  if causal:
    mask = masks.causal() if mask is None else mask & masks.causal()
  block_q, block_kv = (block_sizes or BlockSizes()).resolve(length, default_block(length))
  static = block_common.Static(
    pattern=masks.full() if mask is None else mask,
    length=length,
    block_q=block_q,
    block_kv=block_kv,
    sm_scale=e**-0.5 if sm_scale is None else float(sm_scale),
    logit_soft_cap=None if logit_soft_cap is None else float(logit_soft_cap),
    has_segments=segment_ids is not None,
    interpret=False,
  )
  padded = static.layout.padded_length
  pad = lambda x: block_common.pad_length(x, 1, padded)  # noqa: E731
  seg_q = seg_kv = None
  if segment_ids is not None:
    seg_q, seg_kv = (pad(s.astype(jnp.int32)) for s in segment_ids)
  out = _attention(
    reference.to_grouped(pad(q_BLHE), kv_heads),
    pad(k_BLKE).transpose(0, 2, 1, 3),
    pad(v_BLKE).transpose(0, 2, 1, 3),
    seg_q,
    seg_kv,
    static,
  )
  return reference.from_grouped(out, padded)[:, :length]


# ------------------------------------------------------------------------------- one tile


def _rows(x, block: int, size: int, groups: int = 1):
  """Rows ``[block * size * groups, +size * groups)`` of a ``[B, K, rows, ...]`` array."""
  return jax.lax.dynamic_slice_in_dim(x, block * size * groups, size * groups, axis=2)


def _tile(static, q, k):
  """Scores ``[B, K, block_q * G, block_kv]`` (float32, soft-capped) of one tile, and the
  ``tanh`` of the cap (``None`` without one). Masking is the caller's (see ``_visible``)."""
  s = jnp.einsum("BKQE,BKME->BKQM", q, k, preferred_element_type=_F32) * static.sm_scale
  tanh = None
  if static.logit_soft_cap is not None:
    tanh = jnp.tanh(s / static.logit_soft_cap)
    s = static.logit_soft_cap * tanh
  return s, tanh


def _visible(static, groups, seg_q, seg_kv, qb, kb, code):
  """``[B or 1, 1, block_q * G, block_kv]`` visibility of a partial tile."""
  bq, bk = static.block_q, static.block_kv
  stored = None
  if static.stores_blocks:
    stored = jnp.asarray(static.layout.partial_blocks)[jnp.maximum(code - 1, 0)]
  sq = skv = None
  if static.has_segments:
    sq = jax.lax.dynamic_slice_in_dim(seg_q, qb * bq, bq, axis=1)[:, :, None]
    skv = jax.lax.dynamic_slice_in_dim(seg_kv, kb * bk, bk, axis=1)[:, None, :]
  vis = block_common.visible(
    static, qb * bq, kb * bk, (bq, bk), code=code, stored_block=stored, seg_q=sq, seg_kv=skv
  )
  if vis.ndim == 2:  # no segment ids: the same for every batch row
    vis = vis[None]
  # Each position's G query heads are G consecutive rows of the grouped layout.
  return jnp.repeat(vis, groups, axis=1)[:, None]


def _masked_or_full(static, code, full_step, partial_step, carry):
  if static.has_segments:
    return partial_step(carry)
  if isinstance(code, (int, np.integer)):  # unrolled walk: known on the host
    return partial_step(carry) if code else full_step(carry)
  return jax.lax.cond(code != 0, partial_step, full_step, carry)


# Walks over at most this many blocks per side are unrolled into straight-line code (static
# slices, no loop or cond overhead: 10-25% faster on CPU for L <= 1024 with 128-tiles); longer
# ones run as lax loops, whose memory stays O(L) whatever XLA's scheduler does.
MAX_UNROLLED_BLOCKS = 8


def _unrolled(layout) -> bool:
  return max(layout.kv_blocks.shape[0], layout.q_blocks.shape[0]) <= MAX_UNROLLED_BLOCKS


def _tables(layout, which: str, unrolled: bool):
  """(blocks, counts, codes) of the ``"kv"`` (forward, dq) or ``"q"`` (dk/dv) walk."""
  tables = [getattr(layout, f"{which}_{name}") for name in ("blocks", "counts", "codes")]
  return tables if unrolled else [jnp.asarray(t) for t in tables]


def _map(fn, n: int, unrolled: bool):
  """``fn`` over blocks ``0..n-1``, outputs stacked on a new leading axis."""
  if unrolled:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *[fn(i) for i in range(n)])
  return jax.lax.map(fn, jnp.arange(n))


def _fori(count, body, carry, unrolled: bool):
  if unrolled:
    for t in range(int(count)):
      carry = body(t, carry)
    return carry
  return jax.lax.fori_loop(0, count, body, carry)


# ------------------------------------------------------------------------------- walks


def _forward(q, k, v, seg_q, seg_kv, static):
  """``q [B, K, Lp * G, E]``, ``k, v [B, K, Lp, E]`` -> out like q, ``lse [B, K, Lp * G]``."""
  layout = static.layout
  groups = q.shape[2] // layout.padded_length
  bq, bk = static.block_q, static.block_kv
  unrolled = _unrolled(layout)
  blocks, counts, codes = _tables(layout, "kv", unrolled)

  def one_query_block(qb):
    q_t = _rows(q, qb, bq, groups)

    def body(t, carry):
      kb, code = blocks[qb, t], codes[qb, t]
      k_t, v_t = _rows(k, kb, bk), _rows(v, kb, bk)
      s, _ = _tile(static, q_t, k_t)

      def step(carry, vis=None):
        m, l, acc = carry
        s_ = s if vis is None else jnp.where(vis, s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s_, axis=-1))
        p = jnp.exp(s_ - m_new[..., None])
        if vis is not None:
          p = jnp.where(vis, p, 0.0)
        correction = jnp.exp(m - m_new)
        pv = jnp.einsum("BKQM,BKME->BKQE", p.astype(v.dtype), v_t, preferred_element_type=_F32)
        return m_new, correction * l + jnp.sum(p, axis=-1), correction[..., None] * acc + pv

      masked = lambda c: step(c, _visible(static, groups, seg_q, seg_kv, qb, kb, code))  # noqa
      return _masked_or_full(static, code, step, masked, carry)

    rows = q_t.shape[:3]
    init = (jnp.full(rows, MASK_VALUE, _F32), jnp.zeros(rows, _F32), jnp.zeros(q_t.shape, _F32))
    m, l, acc = _fori(counts[qb], body, init, unrolled)
    safe = jnp.where(l == 0.0, 1.0, l)  # rows that saw no key: acc is 0, so out is 0
    return (acc / safe[..., None]).astype(q.dtype), m + jnp.log(safe)

  out, lse = _map(one_query_block, layout.kv_blocks.shape[0], unrolled)
  return _unblock(out), _unblock(lse)


def _unblock(x):
  """``[num_blocks, B, K, rows, ...]`` -> ``[B, K, num_blocks * rows, ...]``."""
  x = jnp.moveaxis(x, 0, 2)
  return x.reshape(x.shape[:2] + (x.shape[2] * x.shape[3],) + x.shape[4:])


def _ds_and_p(static, s, tanh, lse, d_out, v_t, delta, vis):
  p = jnp.exp(s - lse[..., None])
  if vis is not None:
    p = jnp.where(vis, p, 0.0)
  dp = jnp.einsum("BKQE,BKME->BKQM", d_out.astype(v_t.dtype), v_t, preferred_element_type=_F32)
  ds = p * (dp - delta[..., None])
  if tanh is not None:  # d(cap tanh(x / cap)) / dx = 1 - tanh^2
    ds = ds * (1.0 - tanh * tanh)
  return ds * static.sm_scale, p


def _backward(q, k, v, seg_q, seg_kv, out, lse, d_out, static):
  layout = static.layout
  groups = q.shape[2] // layout.padded_length
  bq, bk = static.block_q, static.block_kv
  delta = jnp.sum(d_out.astype(_F32) * out.astype(_F32), axis=-1)  # D = rowsum(dO * O)

  def tiles(qb, kb):
    q_t, k_t, v_t = _rows(q, qb, bq, groups), _rows(k, kb, bk), _rows(v, kb, bk)
    s, tanh = _tile(static, q_t, k_t)
    rows = lambda x: _rows(x, qb, bq, groups)  # noqa: E731
    return q_t, k_t, v_t, s, tanh, rows(lse), rows(d_out), rows(delta)

  unrolled = _unrolled(layout)
  kv_tables = _tables(layout, "kv", unrolled)

  def dq_block(qb):
    blocks, counts, codes = kv_tables

    def body(t, dq):
      kb, code = blocks[qb, t], codes[qb, t]
      q_t, k_t, v_t, s, tanh, lse_t, do_t, delta_t = tiles(qb, kb)

      def step(dq, vis=None):
        ds, _ = _ds_and_p(static, s, tanh, lse_t, do_t, v_t, delta_t, vis)
        return dq + jnp.einsum(
          "BKQM,BKME->BKQE", ds.astype(k.dtype), k_t, preferred_element_type=_F32
        )

      masked = lambda c: step(c, _visible(static, groups, seg_q, seg_kv, qb, kb, code))  # noqa
      return _masked_or_full(static, code, step, masked, dq)

    zeros = jnp.zeros(q.shape[:2] + (bq * groups, q.shape[3]), _F32)
    return _fori(kv_tables[1][qb], body, zeros, unrolled).astype(q.dtype)

  q_tables = _tables(layout, "q", unrolled)

  def dkv_block(kb):
    blocks, counts, codes = q_tables

    def body(t, carry):
      qb, code = blocks[kb, t], codes[kb, t]
      q_t, k_t, v_t, s, tanh, lse_t, do_t, delta_t = tiles(qb, kb)

      def step(carry, vis=None):
        dk, dv = carry
        ds, p = _ds_and_p(static, s, tanh, lse_t, do_t, v_t, delta_t, vis)
        dv = dv + jnp.einsum(
          "BKQM,BKQE->BKME", p.astype(v.dtype), do_t.astype(v.dtype), preferred_element_type=_F32
        )
        dk = dk + jnp.einsum(
          "BKQM,BKQE->BKME", ds.astype(q.dtype), q_t, preferred_element_type=_F32
        )
        return dk, dv

      masked = lambda c: step(c, _visible(static, groups, seg_q, seg_kv, qb, kb, code))  # noqa
      return _masked_or_full(static, code, step, masked, carry)

    zeros = jnp.zeros(k.shape[:2] + (bk, k.shape[3]), _F32)
    dk, dv = _fori(counts[kb], body, (zeros, zeros), unrolled)
    return dk.astype(k.dtype), dv.astype(v.dtype)

  dq = _unblock(_map(dq_block, layout.kv_blocks.shape[0], unrolled))
  dk, dv = _map(dkv_block, layout.q_blocks.shape[0], unrolled)
  return dq, _unblock(dk), _unblock(dv)


_attention = block_common.flash_vjp(_forward, _backward)
