"""Multi-token prediction study: what do 2- and 4-byte heads cost a byte LM, and how far do they
let it decode per forward?

    python experiments/mtp/run.py [--quick] [--workdir=/tmp/mtp_study]

1. **Models.** ``configs/lm.py:tiny`` (0.9M trunk: width 128, 4 layers) trained ``STEPS`` steps of
   16 x 128 bytes on the embedded corpus with 0, 1 and 3 parallel heads (next-byte, 2-byte and
   4-byte prediction) and 3 sequential (DeepSeek-V3) heads, equal steps and data. Gloeckle et
   al.'s loss, every head weighted as the main one (``mtp_weight = K``: main + sum over heads).
2. **Quality.** Held-out bits per byte of the main head and each head's accuracy (the LM task's
   evaluation, 16 x 16 rows), and an induction (copy) probe: ``PROBES`` random strings of
   ``PROBE_LEN`` lowercase letters written twice; the main head's next-byte accuracy on the second
   copy (an induction head copies it) minus that on the first (which only guesses letters).
3. **Decoding.** For the models with heads, self-speculative greedy decoding
   (``models/speculative.py``, the heads drafting) of ``NEW`` bytes after ``PROMPTS`` held-out
   prompts of ``PROMPT_LEN`` bytes, one prompt at a time: tokens per forward of the model (the
   accepted length per verify step, the prompt's forward counted), whether every output equals
   plain greedy decoding, and the wall-clock ratio to ``sampling.generate`` (median of
   ``REPEATS`` timed runs of each, after a compile run, in one process); the same for the whole
   batch of prompts at once.

Goal (issue 22): tokens per forward >= 1.8 with output identical to greedy decoding. Writes
``results.json``, ``mtp.png`` and the generated section of ``report.md`` next to this file
(``*_quick.*`` with ``--quick``, a smoke run of a few steps).
"""

import functools
import os
import statistics
import time

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from flaxseed import training
from flaxseed.configs import common
from flaxseed.configs import lm as lm_configs
from flaxseed.experiments import studies
from flaxseed.models import sampling
from flaxseed.models import speculative

_QUICK = flags.DEFINE_bool("quick", False, "A smoke run: a few steps per model.")
_FRESH = flags.DEFINE_bool("fresh", False, "Recompute cached results.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/mtp_study", "Checkpoints and logs.")

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS = 1500
# name -> (extra heads, style): next-byte, 2-byte and 4-byte parallel, 4-byte sequential
MODELS = {"0": (0, "parallel"), "1": (1, "parallel"), "3": (3, "parallel"), "3s": (3, "sequential")}
PROBES, PROBE_LEN = 64, 24
PROMPTS, PROMPT_LEN, NEW, REPEATS = 16, 64, 128, 5


def config(heads, style, quick):
  steps = studies.steps(STEPS, quick=quick)
  return common.override(
    lm_configs.get_config("tiny"),
    **{
      "model.mtp_heads": heads,
      "model.mtp_style": style,
      "mtp_weight": float(heads),
      "steps": steps,
      "eval_every": 0,
      "eval_batches": 16,
      "checkpoint_every": 0,
      "sample_tokens": 0,
      "optim.warmup_steps": min(100, steps),
    },
  )


def induction(model, params, rng):
  """Next-byte accuracy of the main head on the first and second copy of random strings."""
  letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", np.uint8)
  strings = rng.choice(letters, (PROBES, PROBE_LEN)).astype(np.int32)
  rows = np.concatenate([strings, strings], axis=1)
  logits = model.apply({"params": params}, rows)
  correct = np.asarray(np.argmax(logits[:, :-1], -1) == rows[:, 1:])
  # position i predicts byte i + 1: the first copy's bytes 1..n-1, the second's 1..n-1
  first = correct[:, : PROBE_LEN - 1].mean()
  second = correct[:, PROBE_LEN : 2 * PROBE_LEN - 1].mean()
  return {"first_copy": float(first), "second_copy": float(second), "gain": float(second - first)}


def _median_seconds(fn, repeats):
  jax.block_until_ready(fn())  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def decoding(model, params, prompts, quick):
  """Self-speculative vs plain greedy decoding, one prompt at a time and as one batch."""
  new, repeats = (16, 1) if quick else (NEW, REPEATS)
  per_prompt = []
  for prompt in prompts:
    row = [list(prompt)]
    plain = functools.partial(
      sampling.generate, model, params, row, max_new_tokens=new, temperature=0.0
    )
    spec = functools.partial(speculative.generate, model, params, row, max_new_tokens=new)
    out = spec()
    per_prompt.append(
      {
        "tokens_per_forward": out.tokens_per_forward,
        "identical": bool(np.array_equal(out.tokens, plain())),
        "plain_seconds": _median_seconds(plain, repeats),
        "speculative_seconds": _median_seconds(lambda spec=spec: spec().tokens, repeats),
      }
    )
  batch = [list(p) for p in prompts]
  plain = functools.partial(
    sampling.generate, model, params, batch, max_new_tokens=new, temperature=0.0
  )
  spec = functools.partial(speculative.generate, model, params, batch, max_new_tokens=new)
  out = spec()
  batched = {
    "tokens_per_forward": out.tokens_per_forward,
    "identical": bool(np.array_equal(out.tokens, plain())),
    "plain_seconds": _median_seconds(plain, repeats),
    "speculative_seconds": _median_seconds(lambda: spec().tokens, repeats),
  }
  ratio = [p["plain_seconds"] / p["speculative_seconds"] for p in per_prompt]
  return {
    "tokens_per_forward": statistics.mean(p["tokens_per_forward"] for p in per_prompt),
    "tokens_per_forward_min": min(p["tokens_per_forward"] for p in per_prompt),
    "all_identical": all(p["identical"] for p in per_prompt),
    "speedup_median": statistics.median(ratio),
    "per_prompt": per_prompt,
    "batched": {**batched, "speedup": batched["plain_seconds"] / batched["speculative_seconds"]},
  }


def _restore(cfg, workdir):
  """(model, params, validation tokens) of a trained run."""
  restored = training.restore(cfg, workdir)
  task = restored.setup.task
  return task.model, restored.params, task.corpus.validation.tokens


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  quick = _QUICK.value
  root = os.path.join(_WORKDIR.value, "quick" if quick else "full")
  cached = functools.partial(studies.cached, root, fresh=_FRESH.value)
  results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "quick": quick}
  results["models"] = {}
  for name, (heads, style) in MODELS.items():
    workdir = os.path.join(root, f"heads{name}")
    cfg = config(heads, style, quick)

    def run(cfg=cfg, heads=heads, workdir=workdir):
      summary, seconds = studies.train(cfg, workdir)
      model, params, _ = _restore(cfg, workdir)
      return {
        "bpb": summary["eval/bpb"],
        "accuracy": summary["eval/accuracy"],
        "head_accuracy": [summary[f"eval/mtp_{k}/accuracy"] for k in range(1, heads + 1)],
        "train_seconds": seconds,
        "induction": induction(model, params, np.random.default_rng(1)),
      }

    def decode(cfg=cfg, workdir=workdir):
      # timed on its own (cached apart from training, so it can be re-measured on a quiet machine)
      model, params, val = _restore(cfg, workdir)
      rng = np.random.default_rng(0)
      starts = rng.integers(0, len(val) - PROMPT_LEN, PROMPTS)
      prompts = [val[s : s + PROMPT_LEN].astype(np.int32) for s in starts]
      return decoding(model, params, prompts, quick)

    m = {k: v for k, v in cached(f"heads{name}", run).items() if k != "decoding"}
    if heads:
      m["decoding"] = cached(f"heads{name}_decoding", decode)
    results["models"][name] = m
    print(
      f"heads {name}: bpb {m['bpb']:.4f} heads acc {m['head_accuracy']} "
      f"induction {m['induction']['gain']:.3f} "
      f"tokens/forward {m.get('decoding', {}).get('tokens_per_forward')}",
      flush=True,
    )
  results["goal"] = goal(results)
  studies.publish(HERE, results, quick=quick, plot=plot, report=report, name="mtp")


def goal(results) -> dict:
  decoded = {k: m["decoding"] for k, m in results["models"].items() if "decoding" in m}
  best = max(decoded, key=lambda k: decoded[k]["tokens_per_forward"])
  d = decoded[best]
  return {
    "model": best,
    "tokens_per_forward": d["tokens_per_forward"],
    "all_identical": d["all_identical"] and all(v["all_identical"] for v in decoded.values()),
    "met": bool(d["tokens_per_forward"] >= 1.8 and d["all_identical"]),
  }


def plot(results, path):
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(6, 4))
  for heads, m in results["models"].items():
    accs = [m["accuracy"], *m["head_accuracy"]]
    count, style = MODELS[heads]
    label = f"{count} {style} head{'s' if count > 1 else ''}" if count else "next byte"
    if style == "sequential" and count:
      label += " (teacher-forced)"
    ax.plot(range(1, len(accs) + 1), accs, marker="o", label=label)
  ax.set_xlabel("bytes ahead")
  ax.set_ylabel("held-out top-1 accuracy")
  ax.set_xticks(range(1, 5))
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def report(results, *, quick: bool) -> str:
  suffix = studies.suffix(quick)
  steps = studies.steps(STEPS, quick=quick)
  rows = []
  for heads, m in results["models"].items():
    d = m.get("decoding")
    heads_acc = ", ".join(f"{a:.3f}" for a in m["head_accuracy"]) or "-"
    spec = "- | - | - | - | -"
    if d:
      # a speculative step's time over a plain step's (speed-up = tokens per forward / this)
      steps = [
        p["speculative_seconds"] * p["tokens_per_forward"] / p["plain_seconds"]
        for p in d["per_prompt"]
      ]
      spec = (
        f"{d['tokens_per_forward']:.2f} (min {d['tokens_per_forward_min']:.2f}) | "
        f"{'yes' if d['all_identical'] else 'NO'} | {statistics.median(steps):.1f}x | "
        f"{d['speedup_median']:.2f}x | "
        f"{d['batched']['tokens_per_forward']:.2f}, {d['batched']['speedup']:.2f}x"
      )
    ind = m["induction"]
    rows.append(
      f"| {heads} | {m['bpb']:.4f} | {m['accuracy']:.3f} | {heads_acc} | "
      f"{ind['first_copy']:.3f} -> {ind['second_copy']:.3f} ({ind['gain']:+.3f}) | "
      f"{m['train_seconds']:.0f} | {spec} |"
    )
  g = results["goal"]
  met = "met" if g["met"] else "NOT met"
  return f"""# Multi-token prediction study: 2- and 4-byte heads on a 0.9M byte LM

Generated by `experiments/mtp/run.py{' --quick' if quick else ''}` on {results['device']}
(jax {results['jax']}); numbers in `results{suffix}.json`. `configs/lm.py:tiny` trained {steps}
steps of 16 x 128 bytes on the embedded corpus with 0, 1 and 3 parallel heads and 3 sequential
heads ("3s"; loss: main + sum over heads). Decoding: greedy, {NEW} bytes after {PROMPTS}
held-out prompts of {PROMPT_LEN} bytes, batch 1 (and all {PROMPTS} as one batch); speed-up =
plain greedy seconds / speculative seconds, medians of {REPEATS} runs in one process; step cost =
a speculative step's time over a plain decoding step's (so speed-up = tokens per forward / step
cost).

| extra heads | bpb | next-byte acc | head acc (2, 3, 4 ahead) | induction: copy 1 -> 2 \
| train s | tokens / forward | = greedy | step cost | speed-up | batch: tokens / forward, speed-up |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |
{chr(10).join(rows)}

![accuracy by bytes ahead](mtp{suffix}.png)

Goal (tokens per forward >= 1.8 with output identical to greedy decoding): {met}: the
{g['model']} model emits {g['tokens_per_forward']:.2f} tokens per forward; every output
identical to greedy: {g['all_identical']}."""


if __name__ == "__main__":
  app.run(main)
