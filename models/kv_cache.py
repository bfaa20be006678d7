"""KV-cache compression for decoding: which cached keys a query may read.

A policy is a config string (``TransformerConfig.kv_cache``), applied by every attention layer
when it decodes (``decode=True``: ``sampling.generate``, ``speculative.generate``, teacher-forced
decoding); full forwards (training, scoring) are unchanged.

  ``"window:recent=W,sinks=S"``  StreamingLLM (Xiao et al. 2023): the first ``S`` tokens (the
      attention sinks) and the last ``W`` (the current one included); ``sinks=0`` is a plain
      sliding window. Positions are assigned inside the cache, as StreamingLLM's ``pos_shift``
      does: the window keeps its distances and the sinks sit just before it (``S + W - 1`` back
      at most), so no distance grows past what the cache holds (RoPE models; a learned position
      table cannot be reassigned).
  ``"h2o:heavy=H,recent=R"``  H2O (Zhang et al. 2023): per KV head, after each decode call, keep
      the ``R`` most recent tokens and the ``H`` others with the largest attention received so far
      (summed over queries and the head's query heads); evicted tokens never return.
  ``"quest:budget=B,page=P"``  Quest (Tang et al. 2024): the cache is read in pages of ``P``
      slots; per query head, each page's upper bound ``sum_e max(q_e kmin_e, q_e kmax_e)`` (its
      keys' elementwise min and max) ranks the pages and the top ``max(1, B // P)`` are read,
      the query's own page always among them. Nothing is evicted: Quest saves reads, not memory.

``TransformerConfig.kv_cache_dtype="int8"`` stores keys and values as int8 codes with a float32
absmax scale per token and head (each element within half a step of its value: half the bytes
of bfloat16 at head_dim 128, plus 3%), dequantized when read; it combines with any policy.

These policies run as masks over the full-size cache, so they measure what each policy keeps and
loses (perplexity, recall) at any budget on any backend, not its memory or speed: a serving engine
would store only the kept slots (window, H2O) or read only the selected pages (Quest; the
block-sparse attention kernel takes such page masks). With a budget covering the whole sequence
every policy reads every key and equals full attention (tested). Rows of a batch keep their own
sets; the H2O state lives in the ``cache`` collection (``h2o_score``, ``h2o_kept``).
"""

import dataclasses

import jax
import jax.numpy as jnp

KINDS = {"window": ("recent", "sinks"), "h2o": ("heavy", "recent"), "quest": ("budget", "page")}
DEFAULTS = {"sinks": 0, "page": 16}


@dataclasses.dataclass(frozen=True)
class Policy:
  kind: str
  recent: int = 0
  sinks: int = 0
  heavy: int = 0
  budget: int = 0
  page: int = 16


def parse(spec: str | None) -> Policy | None:
  """``"h2o:heavy=32,recent=32"`` -> ``Policy``; ``None`` -> ``None`` (full attention). A bad spec
  is a ``ValueError`` naming it and the kinds with their keys."""
  if spec is None:
    return None
  usage = "; ".join(f"{k}:{'=..,'.join(keys)}=.." for k, keys in KINDS.items())
  kind, _, rest = spec.partition(":")
  if kind not in KINDS:
    raise ValueError(f"kv_cache={spec!r}: unknown kind {kind!r} (kinds: {usage})")
  values = dict(DEFAULTS)
  for item in filter(None, rest.split(",")):
    key, _, value = item.partition("=")
    if key not in KINDS[kind]:
      raise ValueError(f"kv_cache={spec!r}: {kind} takes {KINDS[kind]}, not {key!r}")
    try:
      values[key] = int(value)
    except ValueError:
      raise ValueError(f"kv_cache={spec!r}: {key}={value!r} is not an integer") from None
  for key in KINDS[kind]:
    if key not in values:
      raise ValueError(f"kv_cache={spec!r}: {kind} needs {key}= (usage: {usage})")
  need_positive = {"window": ("recent",), "h2o": ("recent",), "quest": ("budget", "page")}[kind]
  for key in KINDS[kind]:
    low = 1 if key in need_positive else 0
    if values[key] < low:
      raise ValueError(f"kv_cache={spec!r}: {key} must be >= {low}, got {values[key]}")
  return Policy(kind=kind, **{k: v for k, v in values.items() if k in KINDS[kind]})


def quantize_int8(x_BLKE):
  """``(int8 codes, float32 scales [B, L, K, 1])``: absmax per token and head (the int8 cache)."""
  scale = jnp.max(jnp.abs(x_BLKE.astype(jnp.float32)), axis=-1, keepdims=True) / 127.0
  scale = jnp.maximum(scale, 1e-12)
  codes = jnp.clip(jnp.round(x_BLKE.astype(jnp.float32) / scale), -127, 127).astype(jnp.int8)
  return codes, scale


def real_slots(cached_segments_BS):
  """Slots holding a token (segment id 0 marks pads and holes)."""
  return cached_segments_BS != 0


def window_visible(policy: Policy, query_slots_L, cached_segments_BS):
  """``[B, L, S]``: the sinks (the first ``sinks`` real tokens) and the last ``recent`` slots up
  to each query's; and ``[B, S]``: which slots are sinks."""
  real = real_slots(cached_segments_BS)
  rank = jnp.cumsum(real, axis=1)  # 1-based count of real tokens up to each slot
  sink_BS = real & (rank <= policy.sinks)
  slot = jnp.arange(cached_segments_BS.shape[1])
  recent_LS = (slot[None, :] > query_slots_L[:, None] - policy.recent) & (
    slot[None, :] <= query_slots_L[:, None]
  )
  return recent_LS[None] | sink_BS[:, None, :], sink_BS


def sink_position_shift(policy: Policy, positions_BL):
  """How far back a query's RoPE position moves for its sink scores: the sinks sit just before
  the window, so a query at position ``p`` sees them from ``min(p, sinks + recent - 1)``."""
  return jnp.minimum(positions_BL, policy.sinks + policy.recent - 1) - positions_BL


def quest_pages(policy: Policy, q_BKQE, k_BSKE, visible_BLS, query_slots_L):
  """``[B, K, Q, S]``: the slots of the pages each grouped query row reads."""
  b, s, kv, e = k_BSKE.shape
  page, length = policy.page, query_slots_L.shape[0]
  n_pages = -(-s // page)
  pad = n_pages * page - s
  keys = jnp.pad(k_BSKE.astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0)))
  keys = keys.reshape(b, n_pages, page, kv, e).transpose(0, 3, 1, 2, 4)  # [B, K, NP, P, E]
  # which keys a page's bound may use: those some query of this call can see at all
  usable = jnp.pad(visible_BLS.any(axis=1), ((0, 0), (0, pad))).reshape(b, 1, n_pages, page, 1)
  kmax = jnp.max(jnp.where(usable, keys, -jnp.inf), axis=3)  # [B, K, NP, E]
  kmin = jnp.min(jnp.where(usable, keys, jnp.inf), axis=3)
  empty = ~usable[..., 0].any(axis=3)  # [B, 1, NP]
  kmax, kmin = jnp.where(empty[..., None], 0.0, kmax), jnp.where(empty[..., None], 0.0, kmin)
  q = q_BKQE.astype(jnp.float32)
  bound = jnp.einsum("BKQE,BKPE->BKQP", jnp.maximum(q, 0.0), kmax) + jnp.einsum(
    "BKQE,BKPE->BKQP", jnp.minimum(q, 0.0), kmin
  )
  groups = q.shape[2] // length
  own_page = jnp.repeat(query_slots_L // page, groups)  # [Q]
  pages = jnp.arange(n_pages)
  future = pages[None, :] > own_page[:, None]  # [Q, NP]
  bound = jnp.where(future[None, None] | empty[:, :, None, :], -jnp.inf, bound)
  bound = jnp.where((pages[None, :] == own_page[:, None])[None, None], jnp.inf, bound)
  chosen = min(n_pages, max(1, policy.budget // page))
  _, top = jax.lax.top_k(bound, chosen)  # [B, K, Q, chosen]
  selected = jnp.any(top[..., None] == pages.reshape((1,) * top.ndim + (-1,)), axis=-2)
  return jnp.repeat(selected, page, axis=-1)[..., :s]


def h2o_keep(policy: Policy, score_BKS, kept_BKS, chunk_end, cached_segments_BS):
  """The kept set after a decode call: per KV head, the ``recent`` last real slots before
  ``chunk_end`` and the ``heavy`` others with the largest accumulated score."""
  real = real_slots(cached_segments_BS)[:, None, :]  # [B, 1, S]
  slot = jnp.arange(score_BKS.shape[-1])
  written = real & (slot < chunk_end)[None, None, :]
  # the last `recent` real slots: count real slots from the end of the chunk backwards
  from_end = jnp.cumsum(written[..., ::-1], axis=-1)[..., ::-1]
  recent = written & (from_end <= policy.recent)
  candidates = written & kept_BKS & ~recent
  heavy = min(policy.heavy, score_BKS.shape[-1])
  if heavy == 0:
    return recent
  masked = jnp.where(candidates, score_BKS, -jnp.inf)
  values, top = jax.lax.top_k(masked, heavy)
  hits = top[..., None] == slot.reshape((1,) * top.ndim + (-1,))
  chosen = jnp.any(hits & (values[..., None] > -jnp.inf), axis=-2)
  return recent | (chosen & candidates)


def attend(
  policy: Policy,
  q_BLHE,
  k_BSKE,
  v_BSKE,
  *,
  cached_segments_BS,
  query_segments_BL,
  start,
  positions_BL,
  pattern,
  sm_scale: float,
  logit_soft_cap: float | None,
  rope,
  state: dict,
):
  """Decode attention of the queries (at cache slots ``start + i``) over the whole cache under
  ``policy``; returns ``(out [B, L, H, E], new state)``. ``pattern`` is the layer's own mask
  (causal, sliding window) at absolute slots; ``rope(x, positions)`` re-rotates queries (sinks);
  ``state``: the H2O arrays (``{}`` for the other kinds)."""
  from flaxseed.kernels.attention import reference  # pylint: disable=g-import-not-at-top

  b, length, _, _ = q_BLHE.shape
  s, kv = k_BSKE.shape[1], k_BSKE.shape[2]
  query_slots = start + jnp.arange(length)
  segments = reference.SegmentIds(query_segments_BL, cached_segments_BS)
  base = reference.make_mask(length, s, segment_ids=segments, q_offset=start, pattern=pattern)
  base_BLS = jnp.broadcast_to(base, (b, length, s))
  q_BKQE, k_BKSE = reference.to_grouped(q_BLHE, kv), k_BSKE.transpose(0, 2, 1, 3)
  groups = q_BKQE.shape[2] // length

  def scores(q):
    out = jnp.einsum("BKQE,BKSE->BKQS", q, k_BKSE, preferred_element_type=jnp.float32) * sm_scale
    if logit_soft_cap is not None:
      out = logit_soft_cap * jnp.tanh(out / logit_soft_cap)
    return out

  s_BKQS = scores(q_BKQE)
  visible = jnp.repeat(base_BLS, groups, axis=1)[:, None]  # [B, 1, Q, S]
  new_state = state
  if policy.kind == "window":
    window_BLS, sink_BS = window_visible(policy, query_slots, cached_segments_BS)
    visible = visible & jnp.repeat(window_BLS, groups, axis=1)[:, None]
    if policy.sinks and rope is not None:
      shifted = rope(q_BLHE, sink_position_shift(policy, positions_BL))
      s_BKQS = jnp.where(
        sink_BS[:, None, None, :], scores(reference.to_grouped(shifted, kv)), s_BKQS
      )
  elif policy.kind == "quest":
    visible = visible & quest_pages(policy, q_BKQE, k_BSKE, base_BLS, query_slots)
  else:  # h2o: what survived earlier calls, and this call's own tokens
    slot = jnp.arange(s)
    in_chunk = (slot >= start) & (slot < start + length)
    kept_BKS = state["h2o_kept"] | in_chunk[None, None, :]
    visible = visible & kept_BKS[:, :, None, :]
  s_BKQS = jnp.where(visible, s_BKQS, -jnp.inf)
  any_BKQ1 = visible.any(axis=-1, keepdims=True)
  weights = jnp.where(any_BKQ1, jax.nn.softmax(jnp.where(any_BKQ1, s_BKQS, 0.0), axis=-1), 0.0)
  if policy.kind == "h2o":
    score = state["h2o_score"] + weights.sum(axis=2)
    kept = h2o_keep(policy, score, kept_BKS, start + length, cached_segments_BS)
    new_state = {"h2o_score": score, "h2o_kept": kept}
  out = jnp.einsum(
    "BKQS,BKSE->BKQE",
    weights.astype(v_BSKE.dtype),
    v_BSKE.transpose(0, 2, 1, 3),
    preferred_element_type=jnp.float32,
  )
  return reference.from_grouped(out.astype(q_BLHE.dtype), length), new_state
