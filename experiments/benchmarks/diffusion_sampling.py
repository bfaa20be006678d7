"""Diffusion LM sampling: wall time against the number of steps, next to AR decoding with a KV
cache of the same network.

    python experiments/benchmarks/diffusion_sampling.py \
        --json=experiments/benchmarks/diffusion_sampling_cpu.json

``diffusion_lm.generate`` of ``--gen_length`` tokens after a ``--prompt_len`` prompt, batch
``--batch``, one block, low-confidence remasking, for each of ``--steps``; every step is one
forward pass over the whole canvas, so time should grow linearly with steps. ``compiles`` counts
the sampler's compilations for that setting (1: the first call; the timed calls must add none).
``ar``: ``sampling.generate`` of the same number of tokens with the causal transformer of the same
size (one prefill, then one cached single-token step per token). Times are medians of
``--repeats`` calls after a compile-and-warm-up call; ratios are to AR, measured in this process.
"""

import json

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from flaxseed import models
from flaxseed.models import diffusion_lm
from flaxseed.models import sampling
from flaxseed.training import metrics

_JSON = flags.DEFINE_string("json", None, "Write the results here.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per measurement.")
_SIZE = flags.DEFINE_string("size", "tiny", "Preset size: diffusion-lm-<size>, transformer-<size>.")
_GEN = flags.DEFINE_integer("gen_length", 256, "Generated tokens.")
_PROMPT = flags.DEFINE_integer("prompt_len", 32, "Prompt tokens.")
_BATCH = flags.DEFINE_integer("batch", 1, "Rows sampled at once.")
_STEPS = flags.DEFINE_list("steps", ["256", "128", "64", "32"], "Diffusion steps.")


def _median_s(fn):
  jax.block_until_ready(fn())
  return metrics.median_seconds(lambda: jax.block_until_ready(fn()), _REPEATS.value)


def main(argv):
  del argv
  size, gen, batch = _SIZE.value, _GEN.value, _BATCH.value
  prompt = jax.random.randint(jax.random.key(0), (batch, _PROMPT.value), 0, 256)
  dlm = models.get(f"diffusion-lm-{size}")
  dlm_params = dlm.init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))["params"]
  ar = models.get(f"transformer-{size}")
  ar_params = ar.init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))["params"]

  ar_s = _median_s(
    lambda: sampling.generate(ar, ar_params, prompt, max_new_tokens=gen, temperature=0.0)
  )
  rows = []
  for steps in map(int, _STEPS.value):
    before = diffusion_lm._denoise._cache_size()  # pylint: disable=protected-access
    seconds = _median_s(
      lambda steps=steps: diffusion_lm.generate(
        dlm,
        dlm_params,
        prompt,
        gen_length=gen,
        steps=steps,
        block_length=gen,
        rng=jax.random.key(2),
      )
    )
    compiles = diffusion_lm._denoise._cache_size() - before  # pylint: disable=protected-access
    rows.append(
      {
        "steps": steps,
        "seconds": seconds,
        "ms_per_step": 1e3 * seconds / steps,
        "vs_ar": seconds / ar_s,
        "compiles": compiles,
      }
    )
    print(
      f"diffusion steps={steps}: {seconds:.3f} s ({1e3 * seconds / steps:.2f} ms/step, "
      f"{seconds / ar_s:.2f}x AR), compiles {compiles}",
      flush=True,
    )
  print(f"AR with KV cache: {ar_s:.3f} s for {gen} tokens ({1e3 * ar_s / gen:.2f} ms/token)")
  result = {
    "device": f"{jax.devices()[0].device_kind} x{jax.device_count()}",
    "jax": jax.__version__,
    "size": size,
    "gen_length": gen,
    "prompt_len": _PROMPT.value,
    "batch": batch,
    "ar_seconds": ar_s,
    "diffusion": rows,
  }
  if _JSON.value:
    with open(_JSON.value, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  app.run(main)
