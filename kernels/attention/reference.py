"""Reference attention in plain XLA: the ground truth every other implementation is tested against.

It materializes the full score tensor, so its memory grows with ``Lq * Lk``; ``xla_chunked`` and
the Pallas kernels compute the same function blockwise.

Masking semantics shared by every implementation:

* ``causal``: query ``i`` sees key ``j`` iff ``j <= i + q_offset`` (``q_offset`` is where the
  queries start along the key axis: 0 in training, the cache index when decoding).
* ``segment_ids``: query and key see each other iff their segment ids are equal (packed documents;
  padding usually carries segment 0).
* A query row that sees no key at all returns zeros (never NaN), and gets zero gradient.

Layout: the math runs in ``[B, K, Lq * G, E]`` (kv heads outermost, the ``G = H / K`` query heads
of a group folded into the query axis), so every matmul is a plain batched matmul over ``B x K``;
on CPU this is 2-3x faster than contracting ``[B, L, H, E]`` directly. ``xla_chunked`` uses the
same layout and the same ``masked_scores``.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from flaxseed.kernels.attention import masks

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


def make_mask(
  q_len: int,
  kv_len: int,
  *,
  causal: bool = False,
  segment_ids: SegmentIds | None = None,
  q_offset=0,
  kv_start: int = 0,
  pattern: masks.Mask | None = None,
) -> jax.Array | None:
  """Boolean visibility mask ``[B or 1, Lq, Lk]``; ``None`` when everything is visible.

  ``pattern`` is a ``masks.Mask`` over absolute positions (``causal=True`` adds
  ``masks.causal()``); ``kv_start`` is the absolute index of the first key given (for callers
  passing a key slice).
  """
  if causal:
    pattern = masks.causal() if pattern is None else pattern & masks.causal()
  mask = None
  if pattern is not None:
    if pattern.computable:
      q_pos = jnp.arange(q_len)[:, None] + q_offset
      kv_pos = jnp.arange(kv_len)[None, :] + kv_start
    else:  # a table lookup: host indices (a traced q_offset cannot index a numpy table)
      if not isinstance(q_offset, int):
        raise ValueError("a from_dense mask needs a static q_offset (it cannot be used to decode)")
      q_pos = np.arange(q_len)[:, None] + q_offset
      kv_pos = np.arange(kv_len)[None, :] + kv_start
    mask = jnp.asarray(pattern(q_pos, kv_pos))[None]
  if segment_ids is not None:
    same = segment_ids.q[:, :, None] == segment_ids.kv[:, None, :]
    mask = same if mask is None else mask & same
  return mask


def to_grouped(x_BLHE, kv_heads: int):
  """``[B, L, H, E] -> [B, K, L * G, E]``: kv heads outermost, each position's ``G = H / K``
  query heads side by side, so a block of positions is a contiguous block of rows."""
  b, length, h, e = x_BLHE.shape
  x = x_BLHE.reshape(b, length, kv_heads, h // kv_heads, e).transpose(0, 2, 1, 3, 4)
  return x.reshape(b, kv_heads, length * (h // kv_heads), e)


def from_grouped(x_BKQE, length: int):
  """``[B, K, L * G, E] -> [B, L, H, E]``."""
  b, k, q, e = x_BKQE.shape
  return (
    x_BKQE.reshape(b, k, length, q // length, e)
    .transpose(0, 2, 1, 3, 4)
    .reshape(b, length, k * (q // length), e)
  )


def masked_scores(
  q_BKQE,
  k_BKME,
  mask_BLM,
  *,
  sm_scale: float,
  logit_soft_cap: float | None,
  rows_may_be_empty: bool,
):
  """Scores ``[B, K, Q, M]`` (``Q = L * G`` grouped rows) with cap and mask applied.

  Returns ``(scores, tanh, visible)``: ``tanh`` is the capped ``tanh`` (for a backward pass) or
  ``None``; ``visible`` ``[B or 1, 1, Q, 1]`` marks rows that see any key, or is ``None`` when
  ``rows_may_be_empty`` is false (causal rows without segments always see key 0).
  """
  s = jnp.einsum("BKQE,BKME->BKQM", q_BKQE, k_BKME, preferred_element_type=jnp.float32) * sm_scale
  tanh = None
  if logit_soft_cap is not None:
    tanh = jnp.tanh(s / logit_soft_cap)
    s = logit_soft_cap * tanh
  if mask_BLM is None:
    return s, tanh, None
  b, k, q_rows, m = s.shape
  length = mask_BLM.shape[1]
  bias = jnp.where(mask_BLM, 0.0, MASK_VALUE)[:, None, :, None, :]  # [B|1, 1, L, 1, M]
  s = (s.reshape(b, k, length, q_rows // length, m) + bias).reshape(s.shape)
  visible = None
  if rows_may_be_empty:
    rows = jnp.broadcast_to(
      jnp.any(mask_BLM, axis=-1)[:, None, :, None], (mask_BLM.shape[0], 1, length, q_rows // length)
    )
    visible = rows.reshape(mask_BLM.shape[0], 1, q_rows, 1)
  return s, tanh, visible


def _may_leave_rows_empty(pattern: masks.Mask | None) -> bool:
  """False only for patterns whose every query sees at least itself (so no row is empty)."""
  return pattern is not None and not pattern.sees_self


def attention(
  q_BLHE,
  k_BMKE,
  v_BMKE,
  *,
  causal: bool = False,
  segment_ids=None,
  q_offset=0,
  sm_scale: float | None = None,
  logit_soft_cap: float | None = None,
  kv_start: int = 0,
  mask: masks.Mask | None = None,
):
  """Softmax attention with grouped heads.

  Args:
    q_BLHE: queries ``[B, Lq, H, E]``.
    k_BMKE, v_BMKE: keys and values ``[B, Lk, K, E]`` with ``H % K == 0`` (MHA, GQA, MQA).
    causal: mask keys after each query (see module docstring; ``q_offset`` shifts the queries).
    segment_ids: ``None``, ``[B, L]`` or ``SegmentIds(q=[B, Lq], kv=[B, Lk])``.
    sm_scale: score scale; defaults to ``E ** -0.5``.
    logit_soft_cap: if set, scores become ``cap * tanh(scores / cap)`` before masking.
    kv_start: absolute position of the first key along the key axis (for causal masking).
    mask: a ``masks.Mask`` pattern over absolute positions, combined (``&``) with ``causal``.

  Returns:
    ``[B, Lq, H, E]`` in the dtype of ``q``.
  """
  length, kv_heads, e = q_BLHE.shape[1], k_BMKE.shape[2], q_BLHE.shape[3]
  segment_ids = as_segment_ids(segment_ids)
  pattern = mask
  mask = make_mask(
    length,
    k_BMKE.shape[1],
    causal=causal,
    segment_ids=segment_ids,
    q_offset=q_offset,
    kv_start=kv_start,
    pattern=pattern,
  )
  v_BKME = v_BMKE.transpose(0, 2, 1, 3)
  scores, _, visible = masked_scores(
    to_grouped(q_BLHE, kv_heads),
    k_BMKE.transpose(0, 2, 1, 3),
    mask,
    sm_scale=e**-0.5 if sm_scale is None else sm_scale,
    logit_soft_cap=logit_soft_cap,
    rows_may_be_empty=segment_ids is not None or _may_leave_rows_empty(pattern),
  )
  weights = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum(
    "BKQM,BKME->BKQE", weights.astype(v_BKME.dtype), v_BKME, preferred_element_type=jnp.float32
  )
  if visible is not None:  # rows that see nothing: zeros, not the uniform average
    out = out * visible
  return from_grouped(out.astype(q_BLHE.dtype), length)
