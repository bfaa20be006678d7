"""Autoregressive sampling with a KV cache: one jitted function, a prefill then a loop of steps.

    out = sampling.generate(model, params, prompts, max_new_tokens=64, temperature=0.8,
                            top_k=40, top_p=0.95, stop_tokens=(eos,), rng=jax.random.key(0))

Works for any zoo model that keeps a ``cache`` collection under ``decode=True``. Prompts of
different lengths (the transformer) are left-padded into one batch: pads get segment id 0, which
no real token attends to, and positions count from each row's first real token, so every row
continues exactly as it would alone. The decode step is one compiled ``lax.while_loop`` body (no
recompilation per token) that stops early once every row has emitted a stop token.

Two hooks change what is generated without touching the model:

- ``logits_processors``: each ``fn(logits_BV, tokens_BT, length) -> logits_BV`` sees the raw
  next-token logits, the token buffer ``[B, P + max_new_tokens]`` (the left-padded
  prompts, the tokens chosen so far, ``pad_token`` after) and ``length``, the index of the token
  being chosen (``tokens_BT[:, :length]`` is each row's context). Processors run in order, before
  temperature, top-k and top-p (a watermark's bias, ``models/watermark.py``). A processor with
  ``owns_sampling = True`` returns the final distribution's log-probs (SynthID's tournament):
  ``generate`` then refuses a temperature other than 1 and a top-k or top-p.
- ``interventions``: ``(site, fn)`` or ``(site, fn, args)``: at every forward (the prompt's and
  each decode step's), the activation ``x`` at ``site`` (``models/sites.py``) becomes ``fn(x)``
  or ``fn(x, args)``; ``args`` is a pytree passed to the compiled loop as data (a steering
  vector and its coefficient), so changing it does not recompile.

Processors and intervention functions are part of the compiled program's key: pass the same
objects (or equal frozen dataclasses) to reuse it.
"""

import functools
import math
import operator
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flaxseed.models import sites as sites_lib


def init_cache(model, batch_size: int, max_len: int):
  """An empty decoding cache for ``batch_size`` rows of up to ``max_len`` tokens (no compute)."""
  tokens = jnp.zeros((batch_size, max_len), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, decode=True))["cache"]
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def sample_logits(
  logits_BV, rng, *, temperature: float, top_k: int | None, top_p: float | None = None
):
  """Greedy when ``temperature == 0``; otherwise softmax(logits / T), restricted to the top k
  and then to the smallest set of tokens whose probability reaches ``top_p`` (nucleus)."""
  if temperature == 0.0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = filter_logits(logits_BV, temperature=temperature, top_k=top_k, top_p=top_p)
  return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


def filter_logits(logits_BV, *, temperature: float, top_k: int | None, top_p: float | None):
  """The logits ``sample_logits`` draws from (``temperature > 0``): divided by the temperature,
  ``-inf`` outside the top k and then outside the nucleus of mass ``top_p``."""
  logits_BV = logits_BV / temperature
  if top_k is not None:
    kth = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth, -jnp.inf, logits_BV)
  if top_p is not None:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    # Keep a token while the mass before it is under top_p (so the first is always kept).
    keep_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV < top_p
    threshold_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    logits_BV = jnp.where(logits_BV < threshold_B1, -jnp.inf, logits_BV)
  return logits_BV


def check_integer(name: str, value) -> int:
  """``value`` as an ``int``, or a ``ValueError`` naming ``name`` (floats and bools are refused,
  never rounded)."""
  if isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{name} must be an integer, got {value!r}")
  try:
    return operator.index(value)
  except TypeError:
    raise ValueError(f"{name} must be an integer, got {value!r}") from None


def check_token_ids(name: str, tokens, vocab_size: int | None = None) -> np.ndarray:
  """``tokens`` as a numpy array, or a ``ValueError`` naming ``name`` unless it holds integer ids
  (floats and bools are refused, never cast) in ``[0, vocab_size)``."""
  tokens = np.asarray(tokens)
  if tokens.size and not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f"{name} must be integer token ids, got {tokens.dtype}")
  if vocab_size is not None and tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
    raise ValueError(f"{name} has token ids outside [0, {vocab_size}) (vocab_size={vocab_size})")
  return tokens


def _left_pad(prompts, pad_token: int):
  """``(tokens [B, P], pads [B])``: rows right-aligned, ``pad_token`` on the left."""
  if isinstance(prompts, (jax.Array, np.ndarray)):
    prompts = check_token_ids("prompt_tokens", prompts)
    if prompts.ndim != 2 or prompts.shape[1] == 0:
      raise ValueError(
        f"prompt_tokens must be a non-empty [B, P] array or a list of token "
        f"sequences, got shape {prompts.shape}"
      )
    return prompts.astype(np.int64), np.zeros(prompts.shape[0], np.int32)
  rows = [np.asarray(p).reshape(-1) for p in prompts]
  if not rows or min(r.size for r in rows) == 0:
    raise ValueError("prompt_tokens: every prompt needs at least one token")
  for b, r in enumerate(rows):
    check_token_ids(f"prompt_tokens[{b}]", r)
  width = max(r.size for r in rows)
  tokens = np.full((len(rows), width), pad_token, np.int64)
  for b, r in enumerate(rows):
    tokens[b, width - r.size :] = r
  return tokens, np.asarray([width - r.size for r in rows], np.int32)


def generate(
  model,
  params,
  prompt_tokens,
  *,
  max_new_tokens: int,
  temperature: float = 1.0,
  top_k: int | None = None,
  top_p: float | None = None,
  stop_tokens: Sequence[int] = (),
  pad_token: int = 0,
  rng=None,
  logits_processors: Sequence = (),
  interventions: Sequence = (),
):
  """Continues every prompt by up to ``max_new_tokens`` tokens.

  Args:
    prompt_tokens: an int ``[B, P]`` array, or a list of token sequences of any lengths (left-
      padded with ``pad_token``; the transformer only).
    temperature: 0 for greedy decoding.
    top_k, top_p: restrict sampling to the k most likely tokens, then to the nucleus of mass p.
    stop_tokens: a row that emits one of these keeps it and is then filled with ``pad_token``.
    logits_processors, interventions: the hooks of the module docstring.

  Returns ``[B, P + max_new_tokens]`` int32: the (left-padded) prompts followed by the samples.
  Token ids that are not integers or lie outside the model's vocabulary, and NaN or infinite
  ``temperature`` / ``top_p``, raise a ``ValueError`` (never rounded or clamped).
  """
  o = prepare(
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
  rng = jax.random.key(0) if rng is None else rng
  return _generate(model, params, o.pop("prompt_BP"), o.pop("pads_B"), rng, **o)


def prepare(
  model,
  prompt_tokens,
  *,
  max_new_tokens,
  temperature,
  top_k,
  top_p,
  stop_tokens,
  pad_token,
  logits_processors,
  interventions,
) -> dict:
  """``generate``'s arguments checked (a ``ValueError`` naming the bad one) and normalized: the
  left-padded ``prompt_BP`` and its ``pads_B``, and the static options of the compiled loop.
  ``models/speculative.py`` shares it."""
  vocab = model.config.vocab_size
  pad_token = check_integer("pad_token", pad_token)
  if not 0 <= pad_token < vocab:
    raise ValueError(f"pad_token={pad_token} is outside [0, {vocab})")
  tokens, pads = _left_pad(prompt_tokens, pad_token)
  check_token_ids("prompt_tokens", tokens, vocab)
  if pads.any():
    from flaxseed.models import transformer  # pylint: disable=g-import-not-at-top

    if not isinstance(model, transformer.Transformer):
      raise ValueError(
        f"prompts of different lengths need segment ids in the cache, which "
        f"{type(model).__name__} does not use; give equal-length prompts"
      )
  if check_integer("max_new_tokens", max_new_tokens) < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  # Written so that NaN fails them: every comparison with NaN is False.
  if not (math.isfinite(temperature) and temperature >= 0):
    raise ValueError(f"temperature must be >= 0 and finite, got {temperature}")
  if top_k is not None and not 0 < check_integer("top_k", top_k) <= vocab:
    raise ValueError(f"top_k must be in [1, {vocab}], got {top_k}")
  if top_p is not None and not (top_p > 0 and top_p <= 1):
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")
  stop = tuple(check_integer("stop_tokens", t) for t in stop_tokens)
  if any(not 0 <= t < vocab for t in stop):
    raise ValueError(f"stop_tokens {stop} has ids outside [0, {vocab})")
  processors = tuple(logits_processors)
  for i, fn in enumerate(processors):
    if not callable(fn):
      raise ValueError(f"logits_processors[{i}] is not callable: {fn!r}")
    if getattr(fn, "owns_sampling", False) and (
      temperature != 1.0 or top_k is not None or top_p is not None
    ):
      raise ValueError(
        f"logits_processors[{i}] ({type(fn).__name__}) applies its own temperature and top_k: "
        f"call generate with temperature=1.0 and no top_k/top_p (got temperature={temperature}, "
        f"top_k={top_k}, top_p={top_p})"
      )
  hooks, hook_args = [], []
  for i, entry in enumerate(interventions):
    if not (isinstance(entry, tuple) and len(entry) in (2, 3) and isinstance(entry[0], str)):
      raise ValueError(f"interventions[{i}] must be (site, fn) or (site, fn, args), got {entry!r}")
    if not callable(entry[1]):
      raise ValueError(f"interventions[{i}]: {entry[1]!r} is not callable")
    hooks.append((entry[0], entry[1], len(entry) == 3))
    hook_args.append(entry[2] if len(entry) == 3 else None)
  if hooks:
    sites_lib.check_unscanned(model, f"interventions at {[h[0] for h in hooks]}")
    if len({sites_lib.resolve(h[0]) for h in hooks}) < len(hooks):
      raise ValueError(f"interventions: two at one site ({[h[0] for h in hooks]})")
  return dict(
    prompt_BP=jnp.asarray(tokens, jnp.int32),
    pads_B=jnp.asarray(pads),
    temperature=float(temperature),
    max_new_tokens=int(max_new_tokens),
    top_k=None if top_k is None else int(top_k),
    top_p=None if top_p is None else float(top_p),
    stop=stop,
    pad_token=int(pad_token),
    padded=bool(pads.any()),
    processors=processors,
    hooks=tuple(hooks),
    hook_args=tuple(hook_args),
  )


def intervention_map(hooks, hook_args) -> dict:
  """``prepare``'s hooks as ``{site: fn(x)}`` (an ``args`` entry bound as data)."""
  return {
    site: (lambda x, fn=fn, a=a: fn(x, a)) if takes_args else fn
    for (site, fn, takes_args), a in zip(hooks, hook_args)
  }


def decode_forward(model, params, cache, tokens, interventions: dict, **kwargs):
  """``(output, cache)`` of one ``decode=True`` forward of ``tokens`` with ``interventions``
  (``intervention_map``) in place; ``kwargs`` go to the model (positions, segment ids, mtp)."""
  run = functools.partial(
    model.apply, {"params": params, "cache": cache}, tokens, decode=True, mutable=["cache"]
  )
  if not interventions:
    out, variables = run(**kwargs)
  else:
    with sites_lib.Interventions(interventions) as record:
      out, variables = run(**kwargs)
    record.check()  # at trace time: a site the model does not have is an error
  return out, variables["cache"]


@functools.partial(
  jax.jit,
  static_argnames=(
    "model",
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
def _generate(
  model,
  params,
  prompt_BP,
  pads_B,
  rng,
  temperature,
  *,
  max_new_tokens,
  top_k,
  top_p,
  stop,
  pad_token,
  padded,
  processors=(),
  hooks=(),
  hook_args=(),
):
  batch, prompt_len = prompt_BP.shape
  cache = init_cache(model, batch, prompt_len + max_new_tokens)
  sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)
  lengths_B = prompt_len - pads_B  # real prompt tokens per row
  extra = {}
  if padded:  # pads are segment 0; positions count from each row's first real token
    idx_BP = jnp.arange(prompt_len)[None, :]
    extra = {
      "segment_ids": (idx_BP >= pads_B[:, None]).astype(jnp.int32),
      "positions": jnp.maximum(idx_BP - pads_B[:, None], 0),
    }
  interventions = intervention_map(hooks, hook_args)

  def apply(cache, tokens, **kwargs):
    """The last position's logits and the cache, with the interventions in place."""
    logits, cache = decode_forward(model, params, cache, tokens, interventions, **kwargs)
    return logits[:, -1], cache

  def process(logits_BV, out_BN, length):
    tokens_BT = jnp.concatenate([prompt_BP, out_BN], axis=1)
    for fn in processors:
      logits_BV = fn(logits_BV, tokens_BT, length)
    return logits_BV

  last, cache = apply(cache, prompt_BP, **extra)
  stop_arr = jnp.asarray(stop if stop else (-1,), jnp.int32)

  def finish(token_B, done_B):
    token_B = jnp.where(done_B, pad_token, token_B)
    return token_B, done_B | jnp.isin(token_B, stop_arr)

  out_BN = jnp.full((batch, max_new_tokens), pad_token, jnp.int32)
  last = process(last, out_BN, prompt_len)
  first, done = finish(sample(last, jax.random.fold_in(rng, 0)), jnp.zeros((batch,), bool))
  out_BN = out_BN.at[:, 0].set(first)

  def cond(carry):
    i, _, done_B, _, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done_B)

  def body(carry):
    i, token_B, done_B, out_BN, cache = carry
    step_extra = {"positions": (lengths_B + i - 1)[:, None]} if padded else {}
    last, cache = apply(cache, token_B[:, None], **step_extra)
    last = process(last, out_BN, prompt_len + i)
    next_B, done_B = finish(sample(last, jax.random.fold_in(rng, i)), done_B)
    out_BN = jax.lax.dynamic_update_slice(out_BN, next_B[:, None], (0, i))
    return i + 1, next_B, done_B, out_BN, cache

  _, _, _, out_BN, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), first, done, out_BN, cache))
  return jnp.concatenate([prompt_BP, out_BN], axis=1)
