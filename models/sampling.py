"""Autoregressive sampling with a KV cache: one jitted function, prefill then a scan of steps.

Works for any zoo model that keeps a ``cache`` collection under ``decode=True`` (the transformer).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np


def init_cache(model, batch_size: int, max_len: int):
  """An empty decoding cache for ``batch_size`` rows of up to ``max_len`` tokens (no compute)."""
  tokens = jnp.zeros((batch_size, max_len), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, decode=True))["cache"]
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def sample_logits(logits_BV, rng, *, temperature: float, top_k: int | None):
  """Greedy when ``temperature == 0``; otherwise softmax(logits / T), restricted to the top k."""
  if temperature == 0.0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV / temperature
  if top_k is not None:
    kth = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth, -jnp.inf, logits_BV)
  return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


def generate(model, params, prompt_BP, *, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, rng=None):
  """Continues every row of ``prompt_BP`` (int ``[B, P]``) by ``max_new_tokens`` tokens.

  Returns ``[B, P + max_new_tokens]`` int32: the prompt followed by the samples. Token ids outside
  the model's vocabulary raise a ``ValueError`` (never clamped).
  """
  prompt_BP = np.asarray(prompt_BP)
  vocab = model.config.vocab_size
  if prompt_BP.ndim != 2 or prompt_BP.shape[1] == 0:
    raise ValueError(f"prompt_BP must be a non-empty [B, P] array, got shape {prompt_BP.shape}")
  if prompt_BP.min() < 0 or prompt_BP.max() >= vocab:
    raise ValueError(f"prompt_BP has token ids outside [0, {vocab}) (vocab_size={vocab})")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if top_k is not None and not 0 < top_k <= vocab:
    raise ValueError(f"top_k must be in [1, {vocab}], got {top_k}")
  rng = jax.random.key(0) if rng is None else rng
  return _generate(model, params, jnp.asarray(prompt_BP, jnp.int32), rng, float(temperature),
                   max_new_tokens=max_new_tokens, top_k=top_k)


@functools.partial(jax.jit, static_argnames=("model", "temperature", "max_new_tokens", "top_k"))
def _generate(model, params, prompt_BP, rng, temperature, *, max_new_tokens, top_k):
  batch, prompt_len = prompt_BP.shape
  cache = init_cache(model, batch, prompt_len + max_new_tokens)
  sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k)
  logits, variables = model.apply({"params": params, "cache": cache}, prompt_BP, decode=True,
                                  mutable=["cache"])
  first = sample(logits[:, -1], jax.random.fold_in(rng, 0))

  def step(carry, i):
    token_B, cache = carry
    logits, variables = model.apply({"params": params, "cache": cache}, token_B[:, None],
                                    decode=True, mutable=["cache"])
    next_B = sample(logits[:, -1], jax.random.fold_in(rng, i))
    return (next_B, variables["cache"]), next_B

  _, rest = jax.lax.scan(step, (first, variables["cache"]), jnp.arange(1, max_new_tokens))
  return jnp.concatenate([prompt_BP, first[:, None], rest.T], axis=1)
