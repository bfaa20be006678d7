"""A masked-diffusion language model (LLaDA, MDLM): the transformer, bidirectional, plus a mask
token.

The forward process masks each token independently with probability ``p = (1 - eps) t + eps`` for a
per-sequence time ``t ~ U(0, 1)``; the network (``DiffusionLM``, the zoo's transformer with
``causal=False``, no time input) predicts the original tokens at the masked places. Its ``[MASK]``
logit is ``-inf`` (MDLM's SUBS parameterization: the model never predicts a mask).

    from flaxseed.models import diffusion_lm
    model = diffusion_lm.DiffusionLM(diffusion_lm.DiffusionLMConfig.tiny())
    out = diffusion_lm.generate(model, params, prompt, gen_length=128, steps=128,
                                block_length=32, remasking="low_confidence", rng=rng)
    nll = diffusion_lm.elbo(model, params, tokens, num_samples=128, rng=rng)  # nats, an upper bound

Pieces, top to bottom:

* **Objective** (pure functions on logits): ``noise`` draws ``t`` (optionally antithetic: the
  batch's times are ``u + i / B`` mod 1, MDLM's low-discrepancy sampler) and the mask;
  ``pretrain_loss`` is ``sum_masked CE / p`` over ``B * L`` tokens (the 1/t-weighted ELBO of LLaDA
  and MDLM); ``sft_loss`` noises only response tokens and normalizes each row by its answer length
  (LLaDA SFT). ``training/tasks/diffusion.py`` puts them in the shared loop.
* **Sampling** (``generate``, ``infill``): start from masks, and at every step predict all masked
  tokens and commit a fixed number of them (the ``k`` most confident for ``"low_confidence"``, ``k``
  random ones for ``"random"``); the count per step is the remaining masks divided by the remaining
  steps, rounded up, which is LLaDA's schedule (``count // steps`` per step, the remainder spread
  over the first steps). ``block_length < gen_length`` makes it semi-autoregressive: blocks are
  filled left to right, each with ``steps / num_blocks`` steps. Unsupervised classifier-free
  guidance (``cfg_scale > 0``) runs a second pass with the prompt masked:
  ``logits = un + (cfg_scale + 1) (cond - un)``. The whole sampler is one jitted ``lax.scan`` with
  fixed shapes: the same shapes never recompile.
* **Likelihood** (``elbo``): the stratified Monte Carlo ELBO of LLaDA: for sample ``j`` of ``n`` the
  number of masked answer tokens is ``1 + floor(L v_j)`` with ``v_j = (u + j / n) mod 1`` (every
  count of 1..L equally likely, the counts spread evenly over the samples), the positions random,
  and the estimate ``(L / count) sum_masked -log p(x_i | unmasked)``. Its expectation is the
  any-order autoregressive NLL averaged over orders, which bounds ``-log p_model(x)`` from above
  (Jensen); ``tests/models/test_diffusion_lm.py`` checks this by enumeration.

**Gumbel noise precision.** Sampling with ``temperature > 0`` is ``argmax(logits / T + g)`` with
Gumbel noise ``g = -log(-log u)``. LLaDA computes it in float64 (citing arXiv:2409.02908): in
float32 ``u`` has 24 bits, so ``g`` is capped near 16.6 and its upper tail is coarse, which in
practice lowers the effective temperature and the diversity of samples. Here the noise is float64
when ``jax_enable_x64`` is on and the backend has float64 (CPU, GPU); otherwise float32, the
highest precision available. TPUs have no float64 arithmetic (XLA:TPU rejects or emulates it
slowly), so on TPU the noise is always float32 with the effect above.
"""

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from flaxseed.models import sampling
from flaxseed.models import transformer

REMASKING = ("low_confidence", "random")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DiffusionLMConfig(transformer.TransformerConfig):
  """``TransformerConfig`` with ``causal=False`` and the special tokens of the diffusion LM.

  The default vocabulary is the 256 bytes, ``[MASK]`` (256), ``[EOS]`` (257, which pads SFT
  answers) and 6 unused ids (264, a multiple of 8 so the vocabulary splits over tensor axes).
  """

  vocab_size: int = 264
  causal: bool = False
  mask_token_id: int = 256
  eos_token_id: int = 257

  def __post_init__(self):
    super().__post_init__()
    if self.causal:
      raise ValueError("causal must be False for a masked-diffusion LM (it reads both ways)")
    for name in ("mask_token_id", "eos_token_id"):
      if not 0 <= getattr(self, name) < self.vocab_size:
        raise ValueError(
          f"{name}={getattr(self, name)} is outside [0, vocab_size={self.vocab_size})"
        )
    if self.mask_token_id == self.eos_token_id:
      raise ValueError(f"mask_token_id and eos_token_id are both {self.mask_token_id}")


class DiffusionLM(transformer.Transformer):
  """Tokens ``[B, L]`` (some of them ``mask_token_id``) -> float32 logits ``[B, L, V]`` of the
  clean tokens, with the ``[MASK]`` logit at ``-inf``."""

  config: DiffusionLMConfig

  def __call__(self, tokens_BL, *, segment_ids=None, positions=None):
    logits = super().__call__(tokens_BL, segment_ids=segment_ids, positions=positions)
    is_mask = jnp.arange(logits.shape[-1]) == self.config.mask_token_id
    return jnp.where(is_mask[None, None], -jnp.inf, logits)


PRESETS = {
  "diffusion-lm-tiny": DiffusionLMConfig.tiny,
  "diffusion-lm-small": DiffusionLMConfig.small,
  "diffusion-lm-base": DiffusionLMConfig.base,
  "diffusion-lm-large": DiffusionLMConfig.large,
}


# ----------------------------------------------------------------------------------------------
# Objective


def noise(
  rng, tokens_BL, noisable_BL, *, mask_token_id: int, eps: float = 1e-3, antithetic: bool = False
):
  """The forward process: ``(noisy tokens, masked [B, L] bool, p_mask [B])``.

  ``t ~ U(0, 1)`` per row (antithetic: ``(u + i / B) mod 1``), ``p = (1 - eps) t + eps``, and each
  ``noisable`` token is replaced by ``mask_token_id`` with probability ``p``.
  """
  batch = tokens_BL.shape[0]
  t_rng, mask_rng = jax.random.split(rng)
  if antithetic:
    t_B = jnp.mod(jax.random.uniform(t_rng, ()) + jnp.arange(batch) / batch, 1.0)
  else:
    t_B = jax.random.uniform(t_rng, (batch,))
  p_B = (1.0 - eps) * t_B + eps
  masked = (jax.random.uniform(mask_rng, tokens_BL.shape) < p_B[:, None]) & noisable_BL
  return jnp.where(masked, mask_token_id, tokens_BL), masked, p_B


def token_nll(logits_BLV, tokens_BL):
  """``-log softmax(logits)[token]`` per position, float32 ``[B, L]``."""
  logits_BLV = logits_BLV.astype(jnp.float32)
  target = jnp.take_along_axis(logits_BLV, tokens_BL[..., None], axis=-1)[..., 0]
  return jax.nn.logsumexp(logits_BLV, axis=-1) - target


def pretrain_loss(logits_BLV, tokens_BL, masked_BL, p_B, num_tokens=None):
  """LLaDA pre-training: ``sum_masked CE / p_mask`` over ``num_tokens`` (default ``B * L``)."""
  num_tokens = tokens_BL.size if num_tokens is None else num_tokens
  weighted = jnp.where(masked_BL, token_nll(logits_BLV, tokens_BL), 0.0) / p_B[:, None]
  return weighted.sum() / num_tokens


def sft_loss(logits_BLV, tokens_BL, masked_BL, p_B, answer_BL):
  """LLaDA SFT: per row ``sum_masked CE / p_mask / answer_len``, averaged over rows. Only answer
  tokens (``answer_BL``, padding EOS included) may be masked."""
  weighted = jnp.where(masked_BL & answer_BL, token_nll(logits_BLV, tokens_BL), 0.0)
  answer_len = jnp.maximum(answer_BL.sum(axis=-1), 1)
  return (weighted.sum(axis=-1) / p_B / answer_len).mean()


# ----------------------------------------------------------------------------------------------
# Sampling


def generate(
  model,
  params,
  prompt_BP,
  *,
  gen_length: int = 128,
  steps: int = 128,
  block_length: int = 128,
  temperature: float = 0.0,
  remasking: str = "low_confidence",
  cfg_scale: float = 0.0,
  rng=None,
  return_trace: bool = False,
):
  """Appends ``gen_length`` tokens to every row of ``prompt_BP`` (int ``[B, P]``) by iterative
  unmasking; returns ``[B, P + gen_length]`` int32. See the module docstring.

  ``gen_length`` must be a multiple of ``block_length``, and ``steps`` a multiple of the number
  of blocks with ``1 <= steps / num_blocks <= block_length``. The prompt is never changed.
  ``return_trace=True`` also returns the canvas after every step, ``[steps, B, P + gen_length]``.
  """
  config = model.config
  prompt_BP = np.asarray(prompt_BP)
  if prompt_BP.ndim != 2:
    raise ValueError(f"prompt_BP must be a [B, P] array, got shape {prompt_BP.shape}")
  _check_tokens("prompt_BP", prompt_BP, config)
  gen_length, steps, block_length = (
    sampling.check_integer(name, value)
    for name, value in (
      ("gen_length", gen_length),
      ("steps", steps),
      ("block_length", block_length),
    )
  )
  if (prompt_BP == config.mask_token_id).any():
    raise ValueError(
      f"prompt_BP contains mask_token_id={config.mask_token_id}; use infill() to "
      "fill masks inside a sequence"
    )
  if gen_length < 1 or block_length < 1 or gen_length % block_length:
    raise ValueError(
      f"gen_length={gen_length} must be a positive multiple of block_length={block_length}"
    )
  num_blocks = gen_length // block_length
  if steps % num_blocks or not 1 <= steps // num_blocks <= block_length:
    raise ValueError(
      f"steps={steps} must be a multiple of the {num_blocks} blocks with "
      f"1 <= steps per block <= block_length={block_length}"
    )
  _check_sampling(temperature, remasking, cfg_scale)
  masks = np.full((prompt_BP.shape[0], gen_length), config.mask_token_id, np.int32)
  canvas = jnp.asarray(np.concatenate([prompt_BP.astype(np.int32), masks], axis=1))
  return _denoise(
    model,
    params,
    canvas,
    _key(rng),
    jnp.float32(temperature),
    jnp.float32(cfg_scale),
    start=prompt_BP.shape[1],
    block_length=block_length,
    steps_per_block=steps // num_blocks,
    greedy=temperature == 0,
    remasking=remasking,
    guidance=cfg_scale > 0,
    trace=return_trace,
  )


def infill(
  model,
  params,
  tokens_BL,
  *,
  steps: int,
  temperature: float = 0.0,
  remasking: str = "low_confidence",
  cfg_scale: float = 0.0,
  rng=None,
  return_trace: bool = False,
):
  """Fills every ``mask_token_id`` of ``tokens_BL`` in ``steps`` steps (one block over the whole
  row; each row commits ``ceil(remaining / steps left)`` tokens a step). Other tokens are
  kept. ``steps`` must not exceed the fewest masks of any row."""
  config = model.config
  tokens_BL = np.asarray(tokens_BL)
  if tokens_BL.ndim != 2:
    raise ValueError(f"tokens_BL must be a [B, L] array, got shape {tokens_BL.shape}")
  _check_tokens("tokens_BL", tokens_BL, config)
  steps = sampling.check_integer("steps", steps)
  fewest = int((tokens_BL == config.mask_token_id).sum(axis=1).min())
  if not 1 <= steps <= fewest:
    raise ValueError(f"steps={steps} must be in [1, {fewest}] (the fewest masks in a row)")
  _check_sampling(temperature, remasking, cfg_scale)
  return _denoise(
    model,
    params,
    jnp.asarray(tokens_BL, jnp.int32),
    _key(rng),
    jnp.float32(temperature),
    jnp.float32(cfg_scale),
    start=0,
    block_length=tokens_BL.shape[1],
    steps_per_block=steps,
    greedy=temperature == 0,
    remasking=remasking,
    guidance=cfg_scale > 0,
    trace=return_trace,
  )


def _check_tokens(name, tokens, config):
  """Integer ids in ``[0, vocab_size)``: floats are refused, never rounded."""
  sampling.check_token_ids(name, tokens, config.vocab_size)


def _check_sampling(temperature, remasking, cfg_scale):
  # Written so that NaN fails them: every comparison with NaN is False.
  if not (math.isfinite(temperature) and temperature >= 0):
    raise ValueError(f"temperature must be >= 0 and finite, got {temperature}")
  if remasking not in REMASKING:
    raise ValueError(f"remasking={remasking!r} is not one of {REMASKING}")
  if not (math.isfinite(cfg_scale) and cfg_scale >= 0):
    raise ValueError(f"cfg_scale must be >= 0 and finite, got {cfg_scale}")


def _key(rng):
  return jax.random.key(0) if rng is None else rng


def noise_dtype():
  """float64 where it exists and is enabled (``jax_enable_x64`` on CPU/GPU), else float32."""
  if jax.config.jax_enable_x64 and jax.default_backend() != "tpu":
    return jnp.float64
  return jnp.float32


@functools.partial(
  jax.jit,
  static_argnames=(
    "model",
    "start",
    "block_length",
    "steps_per_block",
    "greedy",
    "remasking",
    "guidance",
    "trace",
  ),
)
def _denoise(
  model,
  params,
  canvas_BT,
  rng,
  temperature,
  cfg_scale,
  *,
  start,
  block_length,
  steps_per_block,
  greedy,
  remasking,
  guidance,
  trace,
):
  """Unmasks ``canvas[:, start:]`` block by block; see ``generate``. Shapes and the static
  switches (greedy or not, remasking, guidance, trace) compile; temperature and scale do not."""
  mask_id = model.config.mask_token_id
  length = canvas_BT.shape[1]
  given_BT = canvas_BT != mask_id  # the conditioning: masked out in the unguided pass
  position = jnp.arange(length)[None]
  num_blocks = (length - start) // block_length

  def predict(x_BT):
    if not guidance:
      return model.apply({"params": params}, x_BT)
    both = jnp.concatenate([x_BT, jnp.where(given_BT, mask_id, x_BT)])
    cond, uncond = jnp.split(model.apply({"params": params}, both), 2)
    is_mask = jnp.arange(cond.shape[-1])[None, None] == mask_id  # keep -inf (not inf - inf)
    return jnp.where(is_mask, -jnp.inf, uncond + (cfg_scale + 1.0) * (cond - uncond))

  def step(x_BT, i):
    block, s = i // steps_per_block, i % steps_per_block
    lo = start + block * block_length
    open_BT = (x_BT == mask_id) & (position >= lo) & (position < lo + block_length)
    logits = predict(x_BT).astype(jnp.float32)
    key = jax.random.fold_in(rng, i)
    if greedy:
      x0_BT = jnp.argmax(logits, axis=-1)
    else:
      dtype = noise_dtype()
      gumbel = jax.random.gumbel(key, logits.shape, dtype)
      x0_BT = jnp.argmax(logits.astype(dtype) / temperature + gumbel, axis=-1)
    x0_BT = x0_BT.astype(jnp.int32)
    if remasking == "low_confidence":
      probs = jax.nn.softmax(logits, axis=-1)
      confidence = jnp.take_along_axis(probs, x0_BT[..., None], axis=-1)[..., 0]
    else:
      confidence = jax.random.uniform(jax.random.fold_in(key, 1), x0_BT.shape)
    confidence = jnp.where(open_BT, confidence, -jnp.inf)
    remaining_B = open_BT.sum(axis=-1)
    steps_left = steps_per_block - s
    commit_B = (remaining_B + steps_left - 1) // steps_left  # LLaDA's schedule (module doc)
    rank_BT = jnp.argsort(jnp.argsort(-confidence, axis=-1), axis=-1)
    commit_BT = open_BT & (rank_BT < commit_B[:, None])
    x_BT = jnp.where(commit_BT, x0_BT, x_BT)
    return x_BT, (x_BT if trace else None)

  out, history = jax.lax.scan(step, canvas_BT, jnp.arange(num_blocks * steps_per_block))
  return (out, history) if trace else out


def commit_schedule(count: int, steps: int) -> list[int]:
  """Tokens committed at each of ``steps`` steps for ``count`` masks: ``count // steps`` each,
  plus one on the first ``count % steps`` steps (what ``_denoise`` computes on device)."""
  return [count // steps + (s < count % steps) for s in range(steps)]


# ----------------------------------------------------------------------------------------------
# Likelihood


class Likelihood(NamedTuple):
  """``elbo``'s result: ``nats`` ``[B]``, an upper bound on ``-log p(answer | prompt)`` per row;
  ``num_tokens`` scored per row; ``bits_per_token`` (bits per byte for byte-level models)."""

  nats: jax.Array
  num_tokens: int

  @property
  def bits_per_token(self):
    return self.nats / math.log(2) / self.num_tokens


def elbo(
  model,
  params,
  tokens_BL,
  *,
  num_samples: int = 128,
  prompt_len: int = 0,
  batch_size: int = 16,
  rng=None,
) -> Likelihood:
  """The stratified Monte Carlo ELBO of every row of ``tokens_BL`` (module docstring): only the
  answer ``tokens[:, prompt_len:]`` is masked and scored, ``num_samples`` masks per row, run
  ``batch_size`` samples at a time."""
  tokens_BL = np.asarray(tokens_BL)
  if tokens_BL.ndim != 2:
    raise ValueError(f"tokens_BL must be a [B, L] array, got shape {tokens_BL.shape}")
  _check_tokens("tokens_BL", tokens_BL, model.config)
  num_samples, prompt_len, batch_size = (
    sampling.check_integer(name, value)
    for name, value in (
      ("num_samples", num_samples),
      ("prompt_len", prompt_len),
      ("batch_size", batch_size),
    )
  )
  if not 0 <= prompt_len < tokens_BL.shape[1]:
    raise ValueError(f"prompt_len={prompt_len} must be in [0, {tokens_BL.shape[1]})")
  if num_samples < 1 or batch_size < 1 or num_samples % min(batch_size, num_samples):
    raise ValueError(
      f"num_samples={num_samples} must be a positive multiple of "
      f"batch_size={batch_size} (or smaller than it)"
    )
  nats = _elbo(
    model,
    params,
    jnp.asarray(tokens_BL, jnp.int32),
    _key(rng),
    num_samples=num_samples,
    prompt_len=prompt_len,
    batch_size=min(batch_size, num_samples),
  )
  return Likelihood(nats, tokens_BL.shape[1] - prompt_len)


def stratified_masks(rng, u_B, sample_ids_S, num_samples: int, answer_BL):
  """Masks ``[S, B, L]`` and mask counts ``[S, B]`` of the stratified estimator: sample ``j`` of
  ``num_samples`` masks ``1 + floor(A v_j)`` of row ``b``'s ``A = answer_BL[b].sum()`` answer
  positions at random, ``v_j = (u_b + j / num_samples) mod 1``. Each count of 1..A is equally
  likely, and a full set of samples spreads the counts evenly over 1..A."""
  num_answer_B = answer_BL.sum(axis=-1)
  v_SB = jnp.mod(u_B[None, :] + sample_ids_S[:, None] / num_samples, 1.0)
  count_SB = 1 + jnp.floor(v_SB * num_answer_B[None]).astype(jnp.int32)
  shape = (len(sample_ids_S),) + answer_BL.shape
  scores = jnp.where(answer_BL[None], jax.random.uniform(rng, shape), jnp.inf)
  rank = jnp.argsort(jnp.argsort(scores, axis=-1), axis=-1)
  return rank < count_SB[..., None], count_SB


def stratified_nats(model, params, tokens_BL, masked_SBL, count_SB, num_answer_B, **model_kw):
  """``[S, B]`` estimates ``(A / count) sum_masked -log p(x_i | unmasked)`` of the ELBO."""
  samples, batch, length = masked_SBL.shape
  noisy = jnp.where(masked_SBL, model.config.mask_token_id, tokens_BL[None])
  model_kw = {k: jnp.tile(v, (samples, 1)) for k, v in model_kw.items()}
  logits = model.apply({"params": params}, noisy.reshape(-1, length), **model_kw)
  nll = token_nll(logits, jnp.tile(tokens_BL, (samples, 1))).reshape(masked_SBL.shape)
  return jnp.where(masked_SBL, nll, 0.0).sum(-1) * num_answer_B[None] / count_SB


@functools.partial(jax.jit, static_argnames=("model", "num_samples", "prompt_len", "batch_size"))
def _elbo(model, params, tokens_BL, rng, *, num_samples, prompt_len, batch_size):
  batch, length = tokens_BL.shape
  answer_BL = jnp.broadcast_to(jnp.arange(length) >= prompt_len, tokens_BL.shape)
  u_rng, pos_rng = jax.random.split(rng)
  u_B = jax.random.uniform(u_rng, (batch,))

  def chunk(total_B, c):
    ids = c * batch_size + jnp.arange(batch_size)
    masked, count = stratified_masks(
      jax.random.fold_in(pos_rng, c), u_B, ids, num_samples, answer_BL
    )
    estimate_SB = stratified_nats(model, params, tokens_BL, masked, count, answer_BL.sum(-1))
    return total_B + estimate_SB.sum(0), None

  total_B, _ = jax.lax.scan(
    chunk, jnp.zeros((batch,), jnp.float32), jnp.arange(num_samples // batch_size)
  )
  return total_B / num_samples
