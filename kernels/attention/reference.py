"""Reference attention in plain XLA: the ground truth every other implementation is tested against.

It materializes the full ``[B, K, G, Lq, Lk]`` score tensor, so its memory grows with ``Lq * Lk``;
``xla_chunked`` and the Pallas kernels compute the same function blockwise.

Masking semantics shared by every implementation:

* ``causal``: query ``i`` sees key ``j`` iff ``j <= i + q_offset`` (``q_offset`` is where the
  queries start along the key axis: 0 in training, the cache index when decoding).
* ``segment_ids``: query and key see each other iff their segment ids are equal (packed documents;
  padding usually carries segment 0).
* A query row that sees no key at all returns zeros (never NaN), and gets zero gradient.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp


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

  ``kv_start`` is the absolute index of the first key given (used by chunked callers that pass a
  slice of the keys).
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


def masked_softmax_weights(scores, mask):
  """Softmax over the last axis restricted to ``mask``; all-masked rows give all-zero weights."""
  if mask is not None:
    scores = jnp.where(mask, scores, -jnp.inf)
  row_max = jnp.max(scores, axis=-1, keepdims=True)
  # An all-masked row has max -inf; shift it by 0 instead so exp() gives exact zeros, not NaN.
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  weights = jnp.exp(scores - jax.lax.stop_gradient(row_max))
  total = jnp.sum(weights, axis=-1, keepdims=True)
  return weights / jnp.where(total == 0.0, 1.0, total)


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
  b, lq, h, e = q_BLHE.shape
  kv_heads = k_BMKE.shape[2]
  scale = e**-0.5 if sm_scale is None else sm_scale
  q_BLKGE = q_BLHE.reshape(b, lq, kv_heads, h // kv_heads, e)
  scores = jnp.einsum("BLKGE,BMKE->BKGLM", q_BLKGE, k_BMKE,
                      preferred_element_type=jnp.float32) * scale
  if logit_soft_cap is not None:
    scores = logit_soft_cap * jnp.tanh(scores / logit_soft_cap)
  mask = make_mask(lq, k_BMKE.shape[1], causal=causal, segment_ids=as_segment_ids(segment_ids),
                   q_offset=q_offset, kv_start=kv_start)
  if mask is not None:
    mask = mask[:, None, None]  # broadcast over K and G
  weights = masked_softmax_weights(scores, mask)
  out = jnp.einsum("BKGLM,BMKE->BLKGE", weights.astype(v_BMKE.dtype), v_BMKE,
                   preferred_element_type=jnp.float32)
  return out.reshape(b, lq, h, e).astype(q_BLHE.dtype)
