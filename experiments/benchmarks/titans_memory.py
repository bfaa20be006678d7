"""Titans memory benchmark: the chunked update against the per-token recurrence, and Titans
against the transformer of about the same size.

    python experiments/benchmarks/titans_memory.py \
        --json=experiments/benchmarks/titans_memory_cpu.json

``memory``: training throughput (forward + backward) of the memory recurrence alone,
``titans.scan_chunks`` at the tiny presets' memory shape (4 heads of width 32, a 2-layer MLP of
hidden width 64, gradient clipping on, batch 2), for chunk sizes C in ``--chunks``; C = 1 is the
per-token recurrence (the same function, tested equal to a plain token-by-token loop) and
``plain`` a hand-written
per-token ``lax.scan`` without the chunk machinery. The ratio is tokens/s over the faster of the
two per-token forms, measured in the same process. Goal on CPU: >= 3x at C = 64.

``model``: training throughput (forward + backward of the next-token loss, batch 1) of the tiny
Titans LMM and MAC against ``transformer-tiny``; parameter counts are reported beside.

Times are medians of ``--repeats`` calls after a compile-and-warm-up call.
"""

import json

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxseed import models
from flaxseed.models import titans
from flaxseed.training import metrics

_JSON = flags.DEFINE_string("json", None, "Write the results here.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per measurement.")
_LENGTHS = flags.DEFINE_list(
  "lengths", ["1024", "2048", "4096", "8192", "16384"], "Sequence lengths."
)
_CHUNKS = flags.DEFINE_list("chunks", ["1", "16", "64"], "Memory chunk sizes (1: per token).")
_SECTIONS = flags.DEFINE_list("sections", ["memory", "model"], "What to measure.")
_MODELS = flags.DEFINE_list(
  "models",
  ["transformer-tiny", "titans-lmm-tiny", "titans-mac-tiny"],
  "Zoo presets for the model section.",
)


def _median_s(fn, *args):
  jax.block_until_ready(fn(*args))
  return metrics.median_seconds(lambda: jax.block_until_ready(fn(*args)), _REPEATS.value)


def per_token_scan(weights, momentum, inputs: titans.Chunk, grad_clip):
  """The plain recurrence as a ``lax.scan`` over tokens: (clipped) gradient at the current
  weights, momentum, forgetting, read (no chunk machinery)."""

  def step(carry, x):
    weights, momentum = carry
    k, v, q, log_eta, log_keep, theta = (a[:, :, None] for a in x)  # one token: [B, H, 1, ...]
    a, d = titans.associative_grads(weights, k, v)
    grads = [jnp.einsum("bhti,bhto->bhio", ai, di) for ai, di in zip(a, d)]
    if grad_clip is not None:
      grads = [
        g * jnp.minimum(1.0, grad_clip / jnp.linalg.norm(g, axis=(-2, -1), keepdims=True))
        for g in grads
      ]
    scale = lambda g: g[:, :, 0, None, None]
    momentum = tuple(
      scale(jnp.exp(log_eta)) * m - scale(theta) * g for m, g in zip(momentum, grads)
    )
    weights = tuple(scale(jnp.exp(log_keep)) * w + m for w, m in zip(weights, momentum))
    return (weights, momentum), titans.memory_mlp(weights, q)[:, :, 0]

  xs = titans.Chunk(*(jnp.moveaxis(a, 2, 0) for a in inputs))
  (weights, momentum), ys = jax.lax.scan(step, (weights, momentum), xs)
  return jnp.moveaxis(ys, 0, 2), weights, momentum


def memory_section(lengths):
  cfg = titans.TitansConfig.tiny()
  batch, heads, e = 2, cfg.mem_heads, cfg.mem_head_size
  widths = cfg.memory_widths
  rows = []
  for length in lengths:
    keys = jax.random.split(jax.random.key(length), 8)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    shape = (batch, heads, length)
    inputs = titans.Chunk(
      k=unit(jax.random.normal(keys[0], shape + (e,))),
      v=jax.random.normal(keys[1], shape + (e,)),
      q=unit(jax.random.normal(keys[2], shape + (e,))),
      log_eta=jax.nn.log_sigmoid(jax.random.normal(keys[3], shape) + 2.0),
      log_keep=jax.nn.log_sigmoid(jax.random.normal(keys[4], shape) + 4.0),
      theta=cfg.memory_max_lr * jax.nn.sigmoid(jax.random.normal(keys[5], shape)),
    )
    weights = tuple(
      jax.random.normal(keys[6], (batch, heads, a, b)) * a**-0.5
      for a, b in zip(widths[:-1], widths[1:])
    )
    momentum = tuple(jnp.zeros_like(w) for w in weights)
    times = {}
    for chunk in ["plain"] + [int(c) for c in _CHUNKS.value]:

      def loss(weights, inputs, chunk=chunk, momentum=momentum):
        if chunk == "plain":
          y, w, _ = per_token_scan(weights, momentum, inputs, cfg.memory_grad_clip)
        else:
          y, w, _ = titans.scan_chunks(weights, momentum, inputs, chunk, cfg.memory_grad_clip)
        return jnp.mean(jnp.square(y)) + sum(jnp.mean(jnp.square(x)) for x in w)

      step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
      times[chunk] = _median_s(step, weights, inputs)
    per_token = min(times["plain"], times.get(1, float("inf")))
    for chunk, seconds in times.items():
      row = {
        "section": "memory",
        "length": length,
        "chunk": chunk,
        "tokens_per_s": batch * length / seconds,
        "ms": 1e3 * seconds,
        "speedup_vs_per_token": per_token / seconds,
      }
      rows.append(row)
      print(json.dumps(row), flush=True)
  return rows


def model_section(lengths):
  rows = []
  for length in lengths:
    for name in _MODELS.value:
      model = models.get(name)
      tokens = jax.random.randint(jax.random.key(0), (1, length + 1), 0, 256)
      params = nn.unbox(jax.jit(model.init)(jax.random.key(0), tokens[:, :-1])["params"])
      num_params = sum(x.size for x in jax.tree.leaves(params))

      def loss(params, tokens, model=model):
        logits = model.apply({"params": params}, tokens[:, :-1])
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

      seconds = _median_s(jax.jit(jax.value_and_grad(loss)), params, tokens)
      row = {
        "section": "model",
        "length": length,
        "model": name,
        "params": num_params,
        "tokens_per_s": length / seconds,
        "ms": 1e3 * seconds,
      }
      rows.append(row)
      print(json.dumps(row), flush=True)
  return rows


def main(argv):
  del argv
  device = jax.devices()[0].device_kind
  print(f"device: {device} ({jax.default_backend()}), jax {jax.__version__}", flush=True)
  lengths = [int(x) for x in _LENGTHS.value]
  rows = []
  if "memory" in _SECTIONS.value:
    rows += memory_section(lengths)
  if "model" in _SECTIONS.value:
    rows += model_section(lengths)
  if _JSON.value:
    with open(_JSON.value, "w", encoding="utf-8") as f:
      json.dump(
        {
          "device": device,
          "backend": jax.default_backend(),
          "jax": jax.__version__,
          "repeats": _REPEATS.value,
          "rows": rows,
        },
        f,
        indent=1,
      )


if __name__ == "__main__":
  app.run(main)
