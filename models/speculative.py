"""Speculative decoding: draft a few tokens cheaply, verify them all in one forward of the model.

    out = speculative.generate(model, params, prompts, max_new_tokens=64, draft="mtp")
    out = speculative.generate(model, params, prompts, max_new_tokens=64,
                               draft=(small_model, small_params), num_draft=4, temperature=0.8)
    out.tokens              # [B, P + max_new_tokens], as sampling.generate returns
    out.tokens_per_forward  # new tokens per forward of the model, 1.0 for plain decoding

Drafts come from the model's own multi-token heads (``draft="mtp"``: self-speculative decoding
with ``TransformerConfig.mtp_heads`` heads), or from a smaller zoo model with the same vocabulary
(Leviathan et al. 2023; Chen et al. 2023). Parallel heads (Gloeckle et al. 2024, Medusa) draft
from the verify forward itself, free. Sequential heads (DeepSeek-V3) draft one after another at
the last kept position, head k reading the token head k - 1 drafted and its hidden state (one
small forward each; the model's ``mtp_draft``); their caches hold each depth's entries at the
slot of the token it reads (``Transformer`` docstring), so the verify forward rewrites them.

Each step the model reads the pending token and the ``num_draft`` drafts in one forward of
``num_draft + 1`` positions and keeps the longest run of drafts it agrees with, plus one token of
its own, so a step emits between 1 and ``num_draft + 1`` tokens.

- Greedy (``temperature=0``): a draft is kept while it equals the model's argmax, so the output is
  plain greedy decoding's, token for token.
- Sampled: a draft ``x`` is kept with probability ``min(1, p(x) / q(x))``; at the first rejection
  the token is drawn from ``norm(max(0, p - q))``, and after a fully kept run from ``p``. Then every
  emitted token is distributed exactly as sampling from ``p`` (the model's distribution after the
  logits processors, temperature, top-k and top-p), whatever the drafter proposes.

Caches: rows of a batch keep different numbers of drafts. Every row writes the step's positions at
one cache slot; a row's rejected slots become holes (segment id 0, which no token attends to) and
the next step starts past the longest kept run, while RoPE positions count per row, so each row
continues exactly as it would alone. One row never leaves holes and needs ``P + N + num_draft + 1``
slots; a batch may leave ``num_draft`` holes a step and gets ``P + N * (num_draft + 1)`` slots (the
decode attention reads every slot, so batch 1 is the fast case). Sliding-window layers would count
holes as distance: they decode one row at a time.

The hooks of ``sampling.generate`` work here too: interventions apply to every forward of the
model (never to a draft model), and logits processors shape ``p`` at every verified position.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from flaxseed.models import sampling
from flaxseed.models import transformer


@dataclasses.dataclass(frozen=True)
class Output:
  """What ``generate`` returns: the tokens and how many forwards of the model they took."""

  tokens: jax.Array  # [B, P + N] int32, as sampling.generate
  emitted: jax.Array  # [B] new tokens per row (N, or fewer after a stop token)
  forwards: jax.Array  # [B] forwards of the model per row, the prompt's included

  @property
  def tokens_per_forward(self) -> float:
    """Mean over rows of new tokens per forward of the model (plain decoding: 1.0); the
    unambiguous form of "mean accepted length per verify step"."""
    return float(np.mean(np.asarray(self.emitted) / np.asarray(self.forwards)))


def generate(
  model,
  params,
  prompt_tokens,
  *,
  max_new_tokens: int,
  draft="mtp",
  num_draft: int | None = None,
  temperature: float = 0.0,
  top_k: int | None = None,
  top_p: float | None = None,
  stop_tokens=(),
  pad_token: int = 0,
  rng=None,
  logits_processors=(),
  interventions=(),
) -> Output:
  """Continues every prompt by up to ``max_new_tokens`` tokens, drafting with ``draft``.

  Args:
    model: a causal ``Transformer``.
    draft: ``"mtp"`` (the model's multi-token heads draft) or ``(draft_model,
      draft_params)``, a causal ``Transformer`` with the model's vocabulary.
    num_draft: drafts per step; default (and at most) ``mtp_heads`` for ``"mtp"``, else 4.
    The other arguments are ``sampling.generate``'s (greedy by default here).
  """
  if not isinstance(model, transformer.Transformer) or not model.config.causal:
    raise ValueError(f"speculative decoding needs a causal Transformer, got {type(model).__name__}")
  o = sampling.prepare(
    model,
    prompt_tokens,
    max_new_tokens=max_new_tokens,
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
    stop_tokens=stop_tokens,
    pad_token=pad_token,
    logits_processors=logits_processors,
    interventions=interventions,
  )
  cfg = model.config
  if isinstance(draft, str):
    if draft != "mtp":
      raise ValueError(f"draft={draft!r}: 'mtp' or a (draft_model, draft_params) pair")
    if not cfg.mtp_heads:
      raise ValueError("draft='mtp' needs a model with multi-token heads (config.mtp_heads > 0)")
    num_draft = cfg.mtp_heads if num_draft is None else num_draft
    if not 1 <= sampling.check_integer("num_draft", num_draft) <= cfg.mtp_heads:
      raise ValueError(f"num_draft={num_draft} must be in [1, mtp_heads={cfg.mtp_heads}]")
    draft_model = draft_params = None
  else:
    if not (isinstance(draft, tuple) and len(draft) == 2):
      raise ValueError(f"draft must be 'mtp' or a (draft_model, draft_params) pair, got {draft!r}")
    draft_model, draft_params = draft
    if not isinstance(draft_model, transformer.Transformer) or not draft_model.config.causal:
      raise ValueError(f"the draft model must be a causal Transformer, got {draft_model!r}")
    if draft_model.config.vocab_size != cfg.vocab_size:
      raise ValueError(
        f"the draft model's vocab_size={draft_model.config.vocab_size} differs from the model's "
        f"vocab_size={cfg.vocab_size}: drafts must be the model's tokens"
      )
    num_draft = 4 if num_draft is None else num_draft
    if sampling.check_integer("num_draft", num_draft) < 1:
      raise ValueError(f"num_draft must be >= 1, got {num_draft}")
  batch, prompt_len = o["prompt_BP"].shape
  for m in (model, draft_model):
    if m is not None and (m.config.kv_cache or "").startswith("h2o"):
      raise ValueError(
        f"kv_cache={m.config.kv_cache!r}: H2O's scores would keep the attention of rejected "
        "drafts; decode with sampling.generate"
      )
  windowed = [
    m
    for m in (model, draft_model)
    if m
    and (
      set(m.config.attention_pattern) - {"global"} or (m.config.kv_cache or "").startswith("window")
    )
  ]
  if batch > 1 and windowed:
    raise ValueError(
      f"{batch} rows: holes in the cache would count as distance in sliding-window layers "
      f"({windowed[0].config.attention_pattern}, kv_cache={windowed[0].config.kv_cache!r}); "
      "decode one row at a time"
    )
  width, n = num_draft + 1, o["max_new_tokens"]
  slots = prompt_len + n + width if batch == 1 else prompt_len + n * width
  rng = jax.random.key(0) if rng is None else rng
  tokens, emitted, forwards = _speculative(
    model,
    params,
    draft_model,
    draft_params,
    o.pop("prompt_BP"),
    o.pop("pads_B"),
    rng,
    num_draft=int(num_draft),
    slots=slots,
    **o,
  )
  return Output(tokens, emitted, forwards)


def acceptance(p_logp_BWV, q_logp_BGV, drafts_BG):
  """The speculative rule's two pieces: ``(keep_BG, residual_BWV)``.

  ``p_logp_BWV``: the model's log-probs at the pending token and after each draft (``W = G + 1``
  positions); ``q_logp_BGV``: the drafter's log-probs each draft was drawn from. Draft ``j`` is
  kept with probability ``keep_BG[:, j] = min(1, p_j(x_j) / q_j(x_j))``; rejected at ``j``, the
  token is drawn from ``residual_BWV[:, j] = norm(max(0, p_j - q_j))``, and after ``G`` kept
  drafts from ``residual_BWV[:, G] = p_G``.
  """
  g = drafts_BG.shape[1]
  p_BGV, q_BGV = jnp.exp(p_logp_BWV[:, :g]), jnp.exp(q_logp_BGV)
  p_x = jnp.take_along_axis(p_BGV, drafts_BG[..., None], -1)[..., 0]
  q_x = jnp.take_along_axis(q_BGV, drafts_BG[..., None], -1)[..., 0]
  keep_BG = jnp.minimum(1.0, p_x / q_x)
  diff_BGV = jnp.maximum(p_BGV - q_BGV, 0.0)
  total_BG1 = diff_BGV.sum(-1, keepdims=True)
  # p == q leaves nothing to resample, and then a rejection has probability 0: any distribution.
  residual_BGV = jnp.where(total_BG1 > 0, diff_BGV / jnp.maximum(total_BG1, 1e-30), p_BGV)
  return keep_BG, jnp.concatenate([residual_BGV, jnp.exp(p_logp_BWV[:, g:])], axis=1)


def accept(p_logp_BWV, q_logp_BGV, drafts_BG, rng):
  """``(kept_B, next_B)``: how many drafts the rule keeps and the token drawn after them."""
  keep_BG, residual_BWV = acceptance(p_logp_BWV, q_logp_BGV, drafts_BG)
  u_rng, draw_rng = jax.random.split(rng)
  ok_BG = jax.random.uniform(u_rng, keep_BG.shape) < keep_BG
  kept_B = jnp.cumprod(ok_BG, axis=1).sum(axis=1)
  residual_BV = jnp.take_along_axis(residual_BWV, kept_B[:, None, None], axis=1)[:, 0]
  return kept_B, jax.random.categorical(draw_rng, jnp.log(residual_BV), axis=-1).astype(jnp.int32)


def _holes(cache, start, keep_B, width: int, new_index):
  """The cache after a step wrote ``width`` slots at ``start``: row b keeps the first
  ``keep_B[b]``, the rest become holes (segment id 0); the write index moves to ``new_index``."""

  def fix(path, leaf):
    name = path[-1].key
    if name == "index":
      return jnp.full_like(leaf, new_index)
    if name == "segment_ids":
      slot = jnp.arange(leaf.shape[-1])[None, :]
      hole_BS = (slot >= start + keep_B[:, None]) & (slot < start + width)
      return jnp.where(jnp.broadcast_to(hole_BS, leaf.shape), 0, leaf)
    return leaf

  return jax.tree_util.tree_map_with_path(fix, cache)


def _set_index(cache, name: str, index):
  """The cache with the write index of submodule ``name``'s attention set to ``index``."""
  sub = jax.tree_util.tree_map_with_path(
    lambda path, leaf: jnp.full_like(leaf, index) if path[-1].key == "index" else leaf,
    cache[name],
  )
  return {**cache, name: sub}


@functools.partial(
  jax.jit,
  static_argnames=(
    "model",
    "draft_model",
    "num_draft",
    "slots",
    "temperature",
    "max_new_tokens",
    "top_k",
    "top_p",
    "stop",
    "pad_token",
    "padded",
    "processors",
    "hooks",
  ),
)
def _speculative(
  model,
  params,
  draft_model,
  draft_params,
  prompt_BP,
  pads_B,
  rng,
  *,
  num_draft,
  slots,
  temperature,
  max_new_tokens,
  top_k,
  top_p,
  stop,
  pad_token,
  padded,
  processors,
  hooks,
  hook_args,
):
  del padded  # segment ids and positions are always passed here
  batch, prompt_len = prompt_BP.shape
  g, w, n = num_draft, num_draft + 1, max_new_tokens
  greedy, self_draft = temperature == 0.0, draft_model is None
  sequential = self_draft and model.config.mtp_style == "sequential"
  interventions = sampling.intervention_map(hooks, hook_args)
  lengths_B = prompt_len - pads_B  # real prompt tokens per row
  idx_BP = jnp.arange(prompt_len)[None, :]
  prompt_kw = {
    "segment_ids": (idx_BP >= pads_B[:, None]).astype(jnp.int32),
    "positions": jnp.maximum(idx_BP - pads_B[:, None], 0),
  }
  ones_BW = jnp.ones((batch, w), jnp.int32)
  stop_arr = jnp.asarray(stop if stop else (-1,), jnp.int32)

  def target(cache, tokens, carry_KBD=None, **kw):
    """Logits [B, L, V], the heads' [B, K, L, V] (self-drafting; sequential heads: their depths'
    hidden states [K, B, L, D] instead) and the cache."""
    if sequential:
      kw["mtp_carry"] = carry_KBD
    out, cache = sampling.decode_forward(
      model, params, cache, tokens, interventions, mtp=self_draft, **kw
    )
    if sequential:
      return out[0], out[2], cache
    logits, heads = out if self_draft else (out, None)
    return logits, None if heads is None else jnp.moveaxis(heads[:g], 0, 1), cache

  def distribution(logits_BV):
    """Greedy: the logits; sampled: the log-probs tokens are drawn from."""
    if greedy:
      return logits_BV
    return jax.nn.log_softmax(
      sampling.filter_logits(logits_BV, temperature=temperature, top_k=top_k, top_p=top_p)
    )

  def choose(dist_BV, key):
    if greedy:
      return jnp.argmax(dist_BV, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, dist_BV, axis=-1).astype(jnp.int32)

  def processed(logits_BWV, out_BN, n_B, drafts_BG, done_B):
    """The model's distribution at each verified position, after the logits processors (which
    see each row's context right-aligned, so ``length`` is one number for the batch)."""
    if not processors:
      return jax.vmap(distribution, in_axes=1, out_axes=1)(logits_BWV)
    buffer_BT = jnp.full((batch, n + w), pad_token, jnp.int32).at[:, :n].set(out_BN)
    cols_BG = n_B[:, None] + jnp.arange(g)[None, :]
    buffer_BT = buffer_BT.at[jnp.arange(batch)[:, None], cols_BG].set(drafts_BG)
    context_BT = jnp.concatenate([prompt_BP, buffer_BT], axis=1)
    longest = jnp.max(jnp.where(done_B, 0, n_B))
    context_BT = jax.vmap(jnp.roll)(context_BT, longest - n_B)
    dists = []
    for j in range(logits_BWV.shape[1]):
      logits_BV = logits_BWV[:, j]
      for fn in processors:
        logits_BV = fn(logits_BV, context_BT, prompt_len + longest + j)
      dists.append(distribution(logits_BV))
    return jnp.stack(dists, axis=1)

  def emit(out_BN, n_B, done_B, tokens_BW, count_B):
    """Writes each live row's first ``count_B`` tokens after its ``n_B``; a stop token or
    ``max_new_tokens`` ends the row."""
    j_W = jnp.arange(tokens_BW.shape[1])[None, :]
    is_stop_BW = jnp.isin(tokens_BW, stop_arr) & (j_W < count_B[:, None])
    first_stop_B = jnp.where(is_stop_BW.any(1), jnp.argmax(is_stop_BW, axis=1), w)
    count_B = jnp.where(done_B, 0, jnp.minimum(jnp.minimum(count_B, first_stop_B + 1), n - n_B))
    cols_BW = jnp.where(j_W < count_B[:, None], n_B[:, None] + j_W, n)  # n: dropped
    out_BN = out_BN.at[jnp.arange(batch)[:, None], cols_BW].set(tokens_BW, mode="drop")
    stopped_B = is_stop_BW.any(1) & (first_stop_B < count_B)
    n_B = n_B + count_B
    return out_BN, n_B, done_B | stopped_B | (n_B >= n), count_B

  def draft_with_model(dcache, pending_B, positions_B, key):
    """``num_draft`` tokens from the draft model, one forward each, then one more forward so
    its cache holds every drafted token (all of them may be kept)."""
    drafts, logps, token_B = [], [], pending_B
    for j in range(w):
      logits, dcache = sampling.decode_forward(
        draft_model,
        draft_params,
        dcache,
        token_B[:, None],
        {},
        segment_ids=ones_BW[:, :1],
        positions=(positions_B + j)[:, None],
      )
      if j < g:
        dist_BV = distribution(logits[:, -1])
        token_B = choose(dist_BV, jax.random.fold_in(key, j))
        drafts.append(token_B)
        logps.append(dist_BV)
    return jnp.stack(drafts, 1), jnp.stack(logps, 1), dcache

  def draft_with_heads(heads_BKWV, at_B, key):
    dist_BKV = jax.vmap(distribution, in_axes=1, out_axes=1)(
      jnp.take_along_axis(heads_BKWV, at_B[:, None, None, None], axis=2)[:, :, 0]
    )
    keys = jax.random.split(key, g)
    drafts = jnp.stack([choose(dist_BKV[:, k], keys[k]) for k in range(g)], 1)
    return drafts, dist_BKV

  def draft_with_sequential(cache, pending_B, hiddens_KBD, position_B, start, key):
    """Sequential heads draft one after another at the last kept position: head k reads the
    token drafted before it and head k - 1's hidden state (the trunk's for head 1), and writes
    its cache at the slot the next step gives that token (which the step then overwrites)."""
    drafts, logps, token_B, hidden_BD = [], [], pending_B, hiddens_KBD[0]
    for k in range(1, g + 1):
      cache = _set_index(cache, f"mtp_{k - 1}", start + k - 1)
      (logits, h), cache = sampling.decode_forward(
        model,
        params,
        cache,
        token_B[:, None],
        {},
        mtp_draft=(k, hidden_BD[:, None]),
        segment_ids=ones_BW[:, :1],
        positions=position_B[:, None],
      )
      dist_BV = distribution(logits[:, -1])
      token_B = choose(dist_BV, jax.random.fold_in(key, k))
      drafts.append(token_B)
      logps.append(dist_BV)
      hidden_BD = h[:, 0]
    for k in range(1, g + 1):  # the step writes every depth from its start
      cache = _set_index(cache, f"mtp_{k - 1}", start)
    return jnp.stack(drafts, 1), jnp.stack(logps, 1), cache

  # The prompt: its last position gives the first token (and the heads' first drafts).
  cache = sampling.init_cache(model, batch, slots)
  logits, heads, cache = target(cache, prompt_BP, **prompt_kw)
  carry_KBD = heads[:, :, -1] if sequential else None
  out_BN = jnp.full((batch, n), pad_token, jnp.int32)
  no_context = jnp.zeros((batch, g), jnp.int32)
  zero_B, none_B = jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), bool)
  first_dist = processed(logits[:, -1:], out_BN, zero_B, no_context, none_B)
  first_B = choose(first_dist[:, 0], jax.random.fold_in(rng, 0))
  out_BN, n_B, done_B, _ = emit(out_BN, zero_B, none_B, first_B[:, None], zero_B + 1)
  if sequential:
    drafts_BG, q_BGV, cache = draft_with_sequential(
      cache, first_B, carry_KBD, lengths_B - 1, prompt_len, jax.random.fold_in(rng, 1)
    )
    dcache = None
  elif self_draft:
    drafts_BG, q_BGV = draft_with_heads(heads, zero_B + prompt_len - 1, jax.random.fold_in(rng, 1))
    dcache = None
  else:
    drafts_BG, q_BGV = jnp.zeros((batch, g), jnp.int32), jnp.zeros((batch, g, logits.shape[-1]))
    dcache = sampling.init_cache(draft_model, batch, slots)
    _, dcache = sampling.decode_forward(
      draft_model, draft_params, dcache, prompt_BP, {}, **prompt_kw
    )
  forwards_B = jnp.ones((batch,), jnp.int32)

  def cond(carry):
    return ~jnp.all(carry["done"])

  def body(carry):
    step_rng = jax.random.fold_in(rng, carry["step"] + 2)
    draft_rng, accept_rng, head_rng = jax.random.split(step_rng, 3)
    n_B, done_B, out_BN = carry["n"], carry["done"], carry["out"]
    pending_B = jnp.take_along_axis(out_BN, (n_B - 1)[:, None], axis=1)[:, 0]
    positions_B = lengths_B + n_B - 1  # the pending token's position
    start, dcache = carry["start"], carry["dcache"]
    if self_draft:
      drafts_BG, q_BGV = carry["drafts"], carry["q"]
    else:
      drafts_BG, q_BGV, dcache = draft_with_model(dcache, pending_B, positions_B, draft_rng)
    chunk_BW = jnp.concatenate([pending_B[:, None], drafts_BG], axis=1)
    logits, heads, cache = target(
      carry["cache"],
      chunk_BW,
      carry["hidden"],
      segment_ids=ones_BW,
      positions=positions_B[:, None] + jnp.arange(w)[None, :],
    )
    p_BWV = processed(logits, out_BN, n_B, drafts_BG, done_B)
    if greedy:
      best_BW = jnp.argmax(p_BWV, axis=-1).astype(jnp.int32)
      kept_B = jnp.cumprod(drafts_BG == best_BW[:, :g], axis=1).sum(axis=1)
      next_B = jnp.take_along_axis(best_BW, kept_B[:, None], axis=1)[:, 0]
    else:
      kept_B, next_B = accept(p_BWV, q_BGV, drafts_BG, accept_rng)
    new_BW = jnp.concatenate([drafts_BG, jnp.zeros((batch, 1), jnp.int32)], axis=1)
    new_BW = jnp.where(jnp.arange(w)[None, :] == kept_B[:, None], next_B[:, None], new_BW)
    live_B = ~done_B
    out_BN, n_B, done_B, _ = emit(out_BN, n_B, done_B, new_BW, kept_B + 1)
    # The cache keeps the pending token and the kept drafts of each live row.
    keep_B = jnp.where(live_B, kept_B + 1, 0)
    new_start = start + jnp.max(keep_B)
    cache = _holes(cache, start, keep_B, w, new_start)
    hidden_KBD = carry["hidden"]
    if not self_draft:
      dcache = _holes(dcache, start, keep_B, w, new_start)
    elif sequential:  # each depth's input at the last kept position carries into the next step
      hidden_KBD = jnp.take_along_axis(heads, kept_B[None, :, None, None], axis=2)[:, :, 0]
      drafts_BG, q_BGV, cache = draft_with_sequential(
        cache, next_B, hidden_KBD, positions_B + kept_B, new_start, head_rng
      )
    else:
      drafts_BG, q_BGV = draft_with_heads(heads, kept_B, head_rng)
    return {
      "step": carry["step"] + 1,
      "start": new_start,
      "n": n_B,
      "done": done_B,
      "out": out_BN,
      "drafts": drafts_BG,
      "q": q_BGV,
      "cache": cache,
      "dcache": dcache,
      "hidden": hidden_KBD,
      "forwards": carry["forwards"] + live_B.astype(jnp.int32),
    }

  carry = {
    "step": jnp.int32(0),
    "start": jnp.int32(prompt_len),
    "n": n_B,
    "done": done_B,
    "out": out_BN,
    "drafts": drafts_BG,
    "q": q_BGV,
    "cache": cache,
    "dcache": dcache,
    "hidden": carry_KBD,
    "forwards": forwards_B,
  }
  carry = jax.lax.while_loop(cond, body, carry)
  return jnp.concatenate([prompt_BP, carry["out"]], axis=1), carry["n"], carry["forwards"]
