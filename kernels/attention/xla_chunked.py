"""Memory-efficient attention in pure XLA: flash attention's math, one query chunk at a time.

The sequence is cut into query chunks of ``block_q`` rows; a chunk attends only to the key range
its mask can reach (from the mask's block layout, on the host): ``[0, end of chunk)`` when causal
(the masked upper triangle is never computed: with ``n`` chunks the work is ``(n + 1) / 2n`` of
the full square), a band for a sliding window, all keys without a mask.

Forward, per chunk: scores, row max ``m``, ``p = exp(s - m)``, ``l = sum(p)``, ``o = p v / l``;
only ``o`` and the log-sum-exp ``lse = m + log l`` are kept (``O(L)`` memory, no ``L x L``
probabilities). Backward (``jax.custom_vjp``), per chunk, as in FlashAttention-2:

    p  = exp(s - lse)                  (recomputed scores, no max/sum reductions needed)
    dv += p^T do         dp = do v^T
    ds = p * (dp - D),   D = rowsum(do * o)
    dq = ds k * scale    dk += ds^T q * scale

so peak memory is ``O(block_q * L)`` scores in both passes, and the backward does two elementwise
passes over the scores instead of the six or so that autodiff of the reference does. The chunks
form a static Python loop (static shapes, plain batched matmuls); ``block_q=None`` picks
``max(64, L / 16)`` rounded up to a multiple of 64, so there are at most 16 chunks.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from flaxseed.kernels.attention import masks
from flaxseed.kernels.attention import reference


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Query chunk length of the chunked XLA path (``None``: chosen from the sequence length)."""

  block_q: int | None = None

  def __post_init__(self):
    if self.block_q is not None and self.block_q <= 0:
      raise ValueError(f"block_sizes.block_q must be positive, got {self.block_q}")

  def resolve(self, length: int) -> int:
    if self.block_q is not None:
      return self.block_q
    return max(64, -(-length // (16 * 64)) * 64)


@dataclasses.dataclass(frozen=True)
class _Static:
  """Non-array arguments of the custom-VJP core (hashable)."""

  pattern: masks.Mask | None
  sm_scale: float
  logit_soft_cap: float | None
  block_q: int
  has_segments: bool

  @property
  def rows_may_be_empty(self) -> bool:
    return self.has_segments or (self.pattern is not None and not self.pattern.sees_self)

  def chunks(self, length: int):
    """(start, end, first key, end of keys) of each query chunk."""
    if self.pattern is None:
      kinds = np.full((-(-length // self.block_q),) * 2, masks.FULL)
    else:
      kinds = masks.block_layout(self.pattern, length, self.block_q, self.block_q).kinds
    for i, start in enumerate(range(0, length, self.block_q)):
      seen = np.nonzero(kinds[i] != masks.EMPTY)[0]
      lo, hi = (seen[0], seen[-1] + 1) if seen.size else (0, 1)  # nothing seen: one dummy block
      yield (start, min(start + self.block_q, length), int(lo) * self.block_q,
             min(int(hi) * self.block_q, length))


def attention(q_BLHE, k_BLKE, v_BLKE, *, causal: bool = False, segment_ids=None,
              sm_scale: float | None = None, logit_soft_cap: float | None = None,
              block_sizes: BlockSizes | None = None, mask: masks.Mask | None = None):
  """Same contract as ``reference.attention`` for self-attention (``Lq == Lk``)."""
  b, length, h, e = q_BLHE.shape
  kv_heads = k_BLKE.shape[2]
  segment_ids = reference.as_segment_ids(segment_ids)
  if causal:
    mask = masks.causal() if mask is None else mask & masks.causal()
  static = _Static(pattern=mask, sm_scale=e**-0.5 if sm_scale is None else float(sm_scale),
                   logit_soft_cap=logit_soft_cap,
                   block_q=(block_sizes or BlockSizes()).resolve(length),
                   has_segments=segment_ids is not None)
  if segment_ids is None:  # dummies keep the custom_vjp signature fixed; never read
    segment_ids = reference.SegmentIds(jnp.zeros((b, length), jnp.int32),
                                       jnp.zeros((b, length), jnp.int32))
  # Grouped layout [B, K, L * G, E]: a chunk of positions is a contiguous block of rows.
  out = _flash(reference.to_grouped(q_BLHE, kv_heads), k_BLKE.transpose(0, 2, 1, 3),
               v_BLKE.transpose(0, 2, 1, 3), segment_ids.q, segment_ids.kv, static)
  return reference.from_grouped(out, length)


def _scores(q_BKQE, k_BKME, seg_q, seg_kv, start, kv_lo, static: _Static):
  """``reference.masked_scores`` of one chunk: queries from ``start``, keys from ``kv_lo``."""
  segments = reference.SegmentIds(seg_q, seg_kv) if static.has_segments else None
  mask = reference.make_mask(seg_q.shape[1], k_BKME.shape[2], pattern=static.pattern,
                             segment_ids=segments, q_offset=start, kv_start=kv_lo)
  return reference.masked_scores(q_BKQE, k_BKME, mask, sm_scale=static.sm_scale,
                                 logit_soft_cap=static.logit_soft_cap,
                                 rows_may_be_empty=static.rows_may_be_empty)


def _chunk_args(q, k, v, seg_q, seg_kv, start, end, kv_lo, kv_hi, groups):
  rows, keys = slice(start * groups, end * groups), slice(kv_lo, kv_hi)
  return (q[:, :, rows], k[:, :, keys], v[:, :, keys], seg_q[:, start:end], seg_kv[:, keys])


def _forward(q, k, v, seg_q, seg_kv, static: _Static):
  """Output ``[B, K, L * G, E]`` and log-sum-exp ``[B, K, L * G]``."""
  length = seg_q.shape[1]
  groups = q.shape[2] // length
  outs, lses = [], []
  for start, end, kv_lo, kv_hi in static.chunks(length):
    q_c, k_c, v_c, sq, skv = _chunk_args(q, k, v, seg_q, seg_kv, start, end, kv_lo, kv_hi, groups)
    s, _, visible = _scores(q_c, k_c, sq, skv, start, kv_lo, static)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - m)
    total = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("BKQM,BKME->BKQE", p.astype(v.dtype), v_c,
                   preferred_element_type=jnp.float32) / total
    if visible is not None:
      o = o * visible
    outs.append(o.astype(q.dtype))
    lses.append((m + jnp.log(total))[..., 0])
  return jnp.concatenate(outs, axis=2), jnp.concatenate(lses, axis=2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q_BKQE, k_BKLE, v_BKLE, seg_q, seg_kv, static: _Static):
  return _forward(q_BKQE, k_BKLE, v_BKLE, seg_q, seg_kv, static)[0]


def _flash_fwd(q, k, v, seg_q, seg_kv, static):
  out, lse = _forward(q, k, v, seg_q, seg_kv, static)
  return out, (q, k, v, seg_q, seg_kv, out, lse)


def _flash_bwd(static: _Static, residuals, d_out):
  q, k, v, seg_q, seg_kv, out, lse = residuals
  length = seg_q.shape[1]
  groups = q.shape[2] // length
  d_out = d_out.astype(jnp.float32)
  delta = jnp.sum(d_out * out.astype(jnp.float32), axis=-1)  # D = rowsum(do * o)
  dq_chunks = []
  dk = jnp.zeros(k.shape, jnp.float32)
  dv = jnp.zeros(v.shape, jnp.float32)
  for start, end, kv_lo, kv_hi in static.chunks(length):
    q_c, k_c, v_c, sq, skv = _chunk_args(q, k, v, seg_q, seg_kv, start, end, kv_lo, kv_hi, groups)
    rows = slice(start * groups, end * groups)
    s, tanh, visible = _scores(q_c, k_c, sq, skv, start, kv_lo, static)
    do_c = d_out[:, :, rows]
    if visible is not None:  # the forward zeroed these rows: no gradient flows through them
      do_c = do_c * visible
    p = jnp.exp(s - lse[:, :, rows, None])
    dv = dv.at[:, :, kv_lo:kv_hi].add(
        jnp.einsum("BKQM,BKQE->BKME", p.astype(v.dtype), do_c.astype(v.dtype),
                   preferred_element_type=jnp.float32))
    dp = jnp.einsum("BKQE,BKME->BKQM", do_c.astype(v.dtype), v_c,
                    preferred_element_type=jnp.float32)
    ds = p * (dp - delta[:, :, rows, None])
    if tanh is not None:  # d(cap * tanh(x / cap)) / dx = 1 - tanh^2
      ds = ds * (1.0 - tanh * tanh)
    ds = (ds * static.sm_scale).astype(q.dtype)
    dq_chunks.append(jnp.einsum("BKQM,BKME->BKQE", ds, k_c, preferred_element_type=jnp.float32))
    dk = dk.at[:, :, kv_lo:kv_hi].add(
        jnp.einsum("BKQM,BKQE->BKME", ds, q_c, preferred_element_type=jnp.float32))
  dq = jnp.concatenate(dq_chunks, axis=2)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)
