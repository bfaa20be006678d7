"""Watermarks for generated text: bias sampling by a keyed pseudo-random rule, detect it by a test.

**KGW** (Kirchenbauer et al. 2023, "A Watermark for Large Language Models"): before each token,
a keyed hash of the last ``context_width`` tokens splits the vocabulary into a green fraction
``gamma`` and the rest; generation adds ``delta`` to the green logits. Text written without the
key is green at rate ``gamma``; watermarked text more often, and the one-sided z test

    z = (G - gamma T) / sqrt(T gamma (1 - gamma))

on ``T`` scored tokens of which ``G`` are green detects it with a known false-positive rate under
the null (``p = P(N(0, 1) > z)``). Repeated ``(context, token)`` n-grams are scored once (a
repeated phrase is not fresh evidence; without it the test's errors do not vanish with length).

    wm = watermark.KGW(vocab_size=256, key=42)
    out = models.generate(model, params, prompts, max_new_tokens=256, logits_processors=[wm])
    wm.detect(out[0], start=prompt_len)     # {"z", "p_value", "green", "scored"}

One frozen config object is the generator (``wm`` as a logits processor) and the detector
(``wm.detect``), so the two cannot disagree (a mismatched gamma or delta between them is a known
failure elsewhere); ``detect(..., generated_with=wm.to_dict())`` refuses a config that differs
from the one recorded with the text.

The green rule is this module's own, with lm-watermarking's defaults (``gamma=0.25``, ``delta=2``,
``context_width=4``), not bit-compatible with it. Candidate ``v`` after the context
``c_1..c_h`` is green when ``H(key, seed, v) / 2^32 < gamma``, with ``seeding``:

- ``"ngram"`` (the default): ``seed = H(key, c_1, ..., c_h, v)``, the whole (context, token)
  n-gram. Distinct n-grams get independent decisions, so after the repeated-n-gram correction
  a text independent of the key has exactly Binomial(T, gamma) greens, whatever the text.
- ``"minhash"`` (lm-watermarking's ``selfhash`` idea): ``seed = min_j H(key, c_j, v)``, a
  min-hash of the context anchored at the candidate, so an edit of one context token changes the
  decision for only about one candidate in ``h``. The price: n-grams that share the minimizing
  pair ``(c_j, v)`` share their decision, so a fixed key's null is wider than N(0, 1) and
  shifted on natural text (a small vocabulary, such as bytes, makes this severe); calibrate its
  thresholds on human text (``experiments/watermark/`` measures both).

Each token is green with probability ``gamma`` (a keyed hash, not a permutation of exactly
``gamma V`` tokens). The context before the first token is a sentinel (-1), the same at
generation and detection.

**SynthID-style tournament sampling** (Dathathri et al. 2024, "Scalable watermarking for
identifying large language model outputs"): each candidate ``v`` after the context (the last
``ngram_len - 1`` tokens) has ``depth`` keyed g-values ``g_m(v)``, each a Bernoulli(1/2) bit of a
hash. Sampling runs a tournament: at layer ``m`` two candidates drawn from the current
distribution meet and the one with the higher ``g_m`` wins (a tie: either). Its closed form,
applied layer by layer to ``p = softmax(logits / temperature)`` (after ``top_k``),

    p(v) <- p(v) (1 + g_m(v) - sum_u g_m(u) p(u)),

is the winner's distribution; the processor returns its log. A context already seen within the
last ``context_history_size`` positions is sampled from ``p`` unchanged (a repeated context would
repeat its bias) and masked at detection. Detection scores the mean g-value over the unmasked
tokens and layers (``weighted=True``: layer weights ``linspace(10, 1, depth)`` normalized to sum
to ``depth``, so early layers, which the tournament biases most, count more); under the null
each g is an independent fair bit, so ``z = (score - 1/2) / sd`` with the exact null ``sd``.
Expected watermarked g at layer 1 under a uniform model: ``1/2 + (1 - 1/V) / 4`` (tested).

    wm = watermark.SynthID(vocab_size=256, key=42, temperature=0.7)
    out = models.generate(model, params, prompts, max_new_tokens=256, logits_processors=[wm])
    wm.detect(out[0], start=prompt_len)     # {"score", "z", "p_value", "scored"}

The processor applies its own ``temperature`` and ``top_k``, so ``generate`` must sample plainly
(``temperature=1``, no ``top_k``/``top_p``: it refuses otherwise).
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

_NONE = -1  # the token before the start of a sequence


def _fmix(h):
  """MurmurHash3's 32-bit finalizer: every input bit affects every output bit."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def hash_u32(*values):
  """A keyed-hash building block: ``values`` (int arrays, broadcast together) -> uint32."""
  h = jnp.uint32(0x9E3779B9)
  for v in values:
    v = np.uint32(v) if isinstance(v, int) else jnp.asarray(v).astype(jnp.uint32)
    h = _fmix(h ^ (v * jnp.uint32(0xCC9E2D51)))
  return h


@dataclasses.dataclass(frozen=True)
class KGW:
  """The KGW green-list watermark (module docstring): a logits processor and its detector."""

  vocab_size: int
  key: int = 15485863
  gamma: float = 0.25
  delta: float = 2.0
  context_width: int = 4
  seeding: str = "ngram"  # or "minhash" (module docstring)

  def __post_init__(self):
    if not (isinstance(self.vocab_size, int) and self.vocab_size >= 2):
      raise ValueError(f"KGW vocab_size={self.vocab_size!r} must be an integer >= 2")
    if not (isinstance(self.key, int) and 0 <= self.key < 2**32):
      raise ValueError(f"KGW key={self.key!r} must be an integer in [0, 2^32)")
    if not 0 < self.gamma < 1:  # NaN fails too
      raise ValueError(f"KGW gamma={self.gamma} must be in (0, 1)")
    if not (math.isfinite(self.delta) and self.delta >= 0):
      raise ValueError(f"KGW delta={self.delta} must be >= 0 and finite")
    if not (isinstance(self.context_width, int) and self.context_width >= 1):
      raise ValueError(f"KGW context_width={self.context_width!r} must be an integer >= 1")
    if self.seeding not in ("ngram", "minhash"):
      raise ValueError(f"KGW seeding={self.seeding!r} is not one of 'ngram', 'minhash'")

  # --- The green rule. ---

  def green(self, context_BH, candidates_BV, key=None):
    """Whether each candidate is green after its row's context: ``context_BH`` (the last
    ``context_width`` tokens, -1 before the start) and candidates ``[B, N]`` -> bool ``[B, N]``
    (``key``: a traced key in place of ``self.key``, so a detector compiles once for all keys)."""
    key = self.key if key is None else key
    if self.seeding == "ngram":
      columns = (context_BH[:, j, None] for j in range(self.context_width))
      seed = hash_u32(key, *columns, candidates_BV)  # [B, N]
    else:  # minhash, anchored at the candidate
      seed = jnp.min(hash_u32(key, context_BH[:, :, None], candidates_BV[:, None, :]), axis=1)
    threshold = jnp.uint32(min(int(self.gamma * 2**32), 2**32 - 1))
    return hash_u32(key, seed, candidates_BV) < threshold

  # --- Generation: a logits processor (models/sampling.py). ---

  def __call__(self, logits_BV, tokens_BT, length):
    if logits_BV.shape[-1] != self.vocab_size:
      raise ValueError(
        f"KGW vocab_size={self.vocab_size} but the model's logits have {logits_BV.shape[-1]}"
      )
    batch = tokens_BT.shape[0]
    context = contexts(tokens_BT, jnp.full((batch, 1), length), self.context_width)[:, 0]
    vocab = jnp.broadcast_to(jnp.arange(self.vocab_size), (batch, self.vocab_size))
    bias = self.delta * self.green(context, vocab).astype(logits_BV.dtype)
    return logits_BV + bias

  # --- Detection. ---

  def to_dict(self) -> dict:
    """The config as a dict, to record with generated text (``detect(generated_with=...)``)."""
    return dataclasses.asdict(self)

  def greens(self, tokens, start: int = 0) -> np.ndarray:
    """Whether each token of ``tokens[start:]`` is green given what precedes it (bool ``[T]``)."""
    tokens = _check_tokens(tokens, self.vocab_size)
    positions = np.arange(start, len(tokens))
    rule = dataclasses.replace(self, key=0)  # the key is an argument: one compile for all keys
    tokens = jnp.asarray(tokens, jnp.int32)[None]
    return np.asarray(_greens(rule, jnp.uint32(self.key), tokens, positions[None]))[0]

  def detect(self, tokens, *, start: int = 0, generated_with: dict | None = None) -> dict:
    """The z test on ``tokens[start:]`` (``tokens[:start]``, e.g. the prompt, serve only as
    context): ``{"z", "p_value", "green", "scored"}``, each distinct ``(context, token)`` n-gram
    scored once. ``generated_with``: the generator's ``to_dict()``, checked against this one."""
    _check_same(self, generated_with)
    tokens = _check_tokens(tokens, self.vocab_size)
    if not 0 <= start <= len(tokens):
      raise ValueError(f"start={start} is outside [0, {len(tokens)}]")
    greens = self.greens(tokens, start)
    padded = np.concatenate([np.full(self.context_width, _NONE), tokens])
    grams = np.stack(
      [padded[i : i + self.context_width + 1] for i in range(start, len(tokens))]
    ).reshape(-1, self.context_width + 1)
    _, first = np.unique(grams, axis=0, return_index=True)
    scored, green = len(first), int(greens[first].sum())
    if scored == 0:
      return {"z": 0.0, "p_value": 1.0, "green": 0, "scored": 0}
    z = (green - self.gamma * scored) / math.sqrt(scored * self.gamma * (1 - self.gamma))
    return {"z": z, "p_value": 0.5 * math.erfc(z / math.sqrt(2)), "green": green, "scored": scored}


@functools.partial(jax.jit, static_argnums=0)
def _greens(wm: KGW, key, tokens_BT, positions_BN):
  """Whether the token at each position is green given its context (``key``: traced)."""
  context = contexts(tokens_BT, positions_BN, wm.context_width)
  b, n, h = context.shape
  chosen = jnp.take_along_axis(tokens_BT, positions_BN, axis=1)
  return wm.green(context.reshape(b * n, h), chosen.reshape(b * n, 1), key).reshape(b, n)


def _check_same(config, generated_with: dict | None) -> None:
  """A ``ValueError`` listing the fields where ``config`` differs from ``generated_with``."""
  if generated_with is None or generated_with == config.to_dict():
    return
  diffs = [
    f"{k}: generated with {generated_with.get(k)!r}, detecting with {v!r}"
    for k, v in config.to_dict().items()
    if generated_with.get(k) != v
  ]
  raise ValueError(
    f"the detector's {type(config).__name__} config differs from the generator's: {diffs}"
  )


def contexts(tokens_BT, positions_BN, width: int):
  """The ``width`` tokens before each position: ``[B, N, width]`` (-1 before the start)."""
  idx = positions_BN[..., None] - width + jnp.arange(width)[None, None]
  taken = jnp.take_along_axis(tokens_BT[:, None, :], jnp.clip(idx, 0, tokens_BT.shape[1] - 1), 2)
  return jnp.where(idx >= 0, taken, _NONE)


@dataclasses.dataclass(frozen=True)
class SynthID:
  """SynthID-style tournament sampling (module docstring): a logits processor and its
  detector."""

  vocab_size: int
  key: int = 0
  depth: int = 30
  ngram_len: int = 5
  context_history_size: int = 1024
  temperature: float = 1.0
  top_k: int | None = None

  owns_sampling = True  # generate must not re-temper or truncate what this returns

  def __post_init__(self):
    if not (isinstance(self.vocab_size, int) and self.vocab_size >= 2):
      raise ValueError(f"SynthID vocab_size={self.vocab_size!r} must be an integer >= 2")
    if not (isinstance(self.key, int) and 0 <= self.key < 2**32):
      raise ValueError(f"SynthID key={self.key!r} must be an integer in [0, 2^32)")
    for name in ("depth", "context_history_size"):
      value = getattr(self, name)
      if not (isinstance(value, int) and value >= 1):
        raise ValueError(f"SynthID {name}={value!r} must be an integer >= 1")
    if not (isinstance(self.ngram_len, int) and self.ngram_len >= 2):
      raise ValueError(f"SynthID ngram_len={self.ngram_len!r} must be an integer >= 2")
    if not 0 < self.temperature <= 1:  # NaN fails too
      raise ValueError(f"SynthID temperature={self.temperature} must be in (0, 1]")
    if self.top_k is not None and not (
      isinstance(self.top_k, int) and 1 < self.top_k <= self.vocab_size
    ):
      raise ValueError(f"SynthID top_k={self.top_k!r} must be None or in [2, {self.vocab_size}]")

  @property
  def width(self) -> int:
    return self.ngram_len - 1

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def context_hash(self, context_BNH):
    return hash_u32(self.key, *(context_BNH[..., j] for j in range(self.width)))

  def g_values(self, context_hash_B, candidates_BN):
    """``[B, N, depth]`` int32 bits: ``g_m`` of each candidate after its row's context."""
    layers = jnp.arange(self.depth, dtype=jnp.uint32)[None, None, :]
    h = hash_u32(context_hash_B[:, None, None], candidates_BN[:, :, None], layers)
    return (h >> 31).astype(jnp.int32)

  def _repeated(self, tokens_BT, length):
    """Whether each row's context at ``length`` was seen at an earlier position of the last
    ``context_history_size``."""
    batch, total = tokens_BT.shape
    every = self.context_hash(
      contexts(tokens_BT, jnp.tile(jnp.arange(total), (batch, 1)), self.width)
    )
    now = jax.lax.dynamic_slice_in_dim(every, length, 1, axis=1)  # [B, 1]
    t = jnp.arange(total)[None, :]
    window = (t < length) & (t >= length - self.context_history_size)
    return jnp.any((every == now) & window, axis=1), now[:, 0]

  def __call__(self, logits_BV, tokens_BT, length):
    if logits_BV.shape[-1] != self.vocab_size:
      raise ValueError(
        f"SynthID vocab_size={self.vocab_size} but the model's logits have {logits_BV.shape[-1]}"
      )
    logits = logits_BV.astype(jnp.float32) / self.temperature
    if self.top_k is not None:
      kth = jax.lax.top_k(logits, self.top_k)[0][:, -1:]
      logits = jnp.where(logits < kth, -jnp.inf, logits)
    p = jax.nn.softmax(logits, axis=-1)
    repeated, context_hash = self._repeated(tokens_BT, length)
    batch = logits.shape[0]
    g = self.g_values(context_hash, jnp.tile(jnp.arange(self.vocab_size), (batch, 1)))
    marked = p
    for m in range(self.depth):
      gm = g[..., m].astype(jnp.float32)
      marked = marked * (1 + gm - jnp.sum(gm * marked, axis=-1, keepdims=True))
    out = jnp.where(repeated[:, None], p, marked)
    return jnp.where(out > 0, jnp.log(out), -jnp.inf)

  def scores(self, tokens, start: int = 0):
    """``(g [T', depth], mask [T'])`` of ``tokens[start:]``: each token's g-values after its
    context, and whether it counts (its context is not a repeat)."""
    tokens = _check_tokens(tokens, self.vocab_size)
    if not 0 <= start <= len(tokens):
      raise ValueError(f"start={start} is outside [0, {len(tokens)}]")
    g, repeated = _synthid_scores(self, jnp.asarray(tokens, jnp.int32)[None])
    return np.asarray(g[0, start:]), ~np.asarray(repeated[0, start:])

  def detect(
    self, tokens, *, start: int = 0, weighted: bool = False, generated_with: dict | None = None
  ) -> dict:
    """The mean (or weighted-mean) detector on ``tokens[start:]``: ``{"score", "z", "p_value",
    "scored"}`` (module docstring)."""
    _check_same(self, generated_with)
    g, mask = self.scores(tokens, start)
    scored = int(mask.sum())
    if scored == 0:
      return {"score": 0.5, "z": 0.0, "p_value": 1.0, "scored": 0}
    w = np.ones(self.depth)
    if weighted:
      w = np.linspace(10, 1, self.depth)
      w = w * self.depth / w.sum()
    score = float((g[mask] * w).sum() / (scored * self.depth))
    sd = 0.5 * math.sqrt((w**2).sum()) / (self.depth * math.sqrt(scored))
    z = (score - 0.5) / sd
    return {"score": score, "z": z, "p_value": 0.5 * math.erfc(z / math.sqrt(2)), "scored": scored}


@functools.partial(jax.jit, static_argnums=0)
def _synthid_scores(wm: SynthID, tokens_BT):
  batch, total = tokens_BT.shape
  positions = jnp.tile(jnp.arange(total), (batch, 1))
  every = wm.context_hash(contexts(tokens_BT, positions, wm.width))  # [B, T]
  g = jax.vmap(lambda h, v: wm.g_values(h, v[:, None])[:, 0], in_axes=1, out_axes=1)(
    every, tokens_BT
  )  # [B, T, depth]
  t = jnp.arange(total)
  earlier = (t[None, :] < t[:, None]) & (t[None, :] >= t[:, None] - wm.context_history_size)
  repeated = jnp.any((every[:, :, None] == every[:, None, :]) & earlier[None], axis=2)
  return g, repeated


def _check_tokens(tokens, vocab_size: int) -> np.ndarray:
  tokens = np.asarray(tokens)
  if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(
      f"tokens must be a 1-D array of integer ids, got {tokens.dtype} {tokens.shape}"
    )
  if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
    raise ValueError(f"tokens has ids outside [0, {vocab_size})")
  return tokens
