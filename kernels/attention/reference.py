"""Reference attention in plain XLA: the ground truth every other implementation is tested against.

It materializes the full score tensor, so its memory grows with ``Lq * Lk``; ``xla_chunked`` and
the Pallas kernels compute the same function blockwise.

Masking semantics shared by every implementation:

* ``causal``: query ``i`` sees key ``j`` iff ``j <= i + q_offset`` (``q_offset`` is where the
  queries start along the key axis: 0 in training, the cache index when decoding).
* ``segment_ids``: query and key see each other iff their segment ids are equal (packed documents;
  padding usually carries segment 0).
* A query row that sees no key at all returns zeros (never NaN), and gets zero gradient.

Layout: the math runs in ``[B, K, G * Lq, E]`` (kv heads outermost, the ``G = H / K`` query heads
of a group folded into the query axis), so every matmul is a plain batched matmul over ``B x K``;
on CPU this is 2-3x faster than contracting ``[B, L, H, E]`` directly.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

# Added to the scores of masked pairs. Finite, so a fully masked row gives a uniform softmax
# (zeroed afterwards) instead of NaN; -1e30 absorbs any finite score in float32.
MASK_VALUE = -1e30


class SegmentIds(NamedTuple):
  """Segment ids of queries ``[B, Lq]`` and keys ``[B, Lk]`` (int)."""

  q: jax.Array
  kv: jax.Array


def as_segment_ids(segment_ids) -> SegmentIds | None:
  """Accepts ``None``, one ``[B, L]`` array (self-attention) or a ``SegmentIds`` pair."""
  if segment_ids is None or isinstance(segment_ids, SegmentIds):
    return segment_ids
  return SegmentIds(segment_ids, segment_ids)


def make_mask(q_len: int, kv_len: int, *, causal: bool, segment_ids: SegmentIds | None,
              q_offset=0, kv_start: int = 0) -> jax.Array | None:
  """Boolean visibility mask ``[B or 1, Lq, Lk]``; ``None`` when everything is visible.

  ``kv_start`` is the absolute index of the first key given (for callers passing a key slice).
  """
  mask = None
  if causal:
    q_pos = jnp.arange(q_len)[:, None] + q_offset
    kv_pos = jnp.arange(kv_len)[None, :] + kv_start
    mask = (kv_pos <= q_pos)[None]
  if segment_ids is not None:
    same = segment_ids.q[:, :, None] == segment_ids.kv[:, None, :]
    mask = same if mask is None else mask & same
  return mask


def to_grouped(q_BLHE, kv_heads: int):
  """``[B, L, H, E] -> [B, K, G * L, E]``."""
  b, length, h, e = q_BLHE.shape
  g = h // kv_heads
  q = q_BLHE.reshape(b, length, kv_heads, g, e).transpose(0, 2, 3, 1, 4)
  return q.reshape(b, kv_heads, g * length, e)


def from_grouped(o_BKQE, length: int):
  """``[B, K, G * L, E] -> [B, L, H, E]``."""
  b, k, q, e = o_BKQE.shape
  return o_BKQE.reshape(b, k, q // length, length, e).transpose(0, 3, 1, 2, 4).reshape(
      b, length, k * (q // length), e)


def attend_grouped(q_BKQE, k_BKME, v_BKME, mask_BLM, *, sm_scale: float,
                   logit_soft_cap: float | None, out_dtype):
  """The core on grouped layouts; ``mask_BLM`` is ``[B or 1, L, M]`` with ``Q = G * L``."""
  b, kv_heads, q_len, _ = q_BKQE.shape
  scores = jnp.einsum("BKQE,BKME->BKQM", q_BKQE, k_BKME,
                      preferred_element_type=jnp.float32) * sm_scale
  if logit_soft_cap is not None:
    scores = logit_soft_cap * jnp.tanh(scores / logit_soft_cap)
  visible = None
  if mask_BLM is not None:
    length, m = mask_BLM.shape[1:]
    groups = q_len // length
    bias = jnp.where(mask_BLM, 0.0, MASK_VALUE).astype(jnp.float32)[:, None, None]
    scores = (scores.reshape(b, kv_heads, groups, length, m) + bias).reshape(scores.shape)
    visible = jnp.any(mask_BLM, axis=-1)  # [B or 1, L]
  weights = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("BKQM,BKME->BKQE", weights.astype(v_BKME.dtype), v_BKME,
                   preferred_element_type=jnp.float32)
  if visible is not None:  # rows that see nothing: zeros, not the uniform average
    length = visible.shape[-1]
    keep = jnp.broadcast_to(visible[:, None, None, :, None], (b, 1, q_len // length, length, 1))
    out = out * keep.reshape(b, 1, q_len, 1).astype(out.dtype)
  return out.astype(out_dtype)


def attention(q_BLHE, k_BMKE, v_BMKE, *, causal: bool = False, segment_ids=None, q_offset=0,
              sm_scale: float | None = None, logit_soft_cap: float | None = None,
              kv_start: int = 0):
  """Softmax attention with grouped heads.

  Args:
    q_BLHE: queries ``[B, Lq, H, E]``.
    k_BMKE, v_BMKE: keys and values ``[B, Lk, K, E]`` with ``H % K == 0`` (MHA, GQA, MQA).
    causal: mask keys after each query (see module docstring; ``q_offset`` shifts the queries).
    segment_ids: ``None``, ``[B, L]`` or ``SegmentIds(q=[B, Lq], kv=[B, Lk])``.
    sm_scale: score scale; defaults to ``E ** -0.5``.
    logit_soft_cap: if set, scores become ``cap * tanh(scores / cap)`` before masking.
    kv_start: absolute position of the first key along the key axis (for causal masking).

  Returns:
    ``[B, Lq, H, E]`` in the dtype of ``q``.
  """
  length, kv_heads, e = q_BLHE.shape[1], k_BMKE.shape[2], q_BLHE.shape[3]
  mask = make_mask(length, k_BMKE.shape[1], causal=causal,
                   segment_ids=as_segment_ids(segment_ids), q_offset=q_offset,
                   kv_start=kv_start)
  out = attend_grouped(to_grouped(q_BLHE, kv_heads), k_BMKE.transpose(0, 2, 1, 3),
                       v_BMKE.transpose(0, 2, 1, 3), mask,
                       sm_scale=e**-0.5 if sm_scale is None else sm_scale,
                       logit_soft_cap=logit_soft_cap, out_dtype=q_BLHE.dtype)
  return from_grouped(out, length)
