"""Pruning study: how much of a byte LM survives one-shot pruning, by method, sparsity and pattern?

    python experiments/pruning/run.py [--quick] [--workdir=/tmp/pruning_study]

1. **Models.** ``configs/lm.py:tiny`` (0.9M parameters) and ``configs/lm.py:small`` (5.2M),
   trained ``STEPS`` steps of 16 x 128 bytes on the embedded corpus.
2. **Pruning** (``models/prune.py``) of every attention and MLP projection, one shot, from
   ``CALIBRATION_ROWS`` training rows of 128 bytes (Wanda's default count): magnitude (per
   matrix, Wanda's baseline), Wanda and SparseGPT (damping 0.01, blocks of 128), at sparsity 0.3,
   0.5 and 0.7 unstructured, and at 4:8 and 2:4 (50%).
3. **Measure.** Held-out bits per byte and next-byte accuracy on ``EVAL_ROWS`` validation rows
   of 128 bytes, and the fraction of the dense model's accuracy each pruned model keeps.

Goal (issue 22): at 50% unstructured the best one-shot method keeps >= 95% of the dense next-byte
accuracy and beats magnitude. Wanda's premise is the outlier features of large models, which a
1-5M byte LM may not have: the report says whether its advantage over magnitude survives here.
Writes ``results.json``, ``pruning.png`` and the generated section of ``report.md`` next to this
file (``*_quick.*`` with ``--quick``, a smoke run of a few steps).
"""

import functools
import math
import os
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from flaxseed import training
from flaxseed.configs import common
from flaxseed.configs import lm as lm_configs
from flaxseed.experiments import studies
from flaxseed.models import prune

_QUICK = flags.DEFINE_bool("quick", False, "A smoke run: a few steps per model.")
_FRESH = flags.DEFINE_bool("fresh", False, "Recompute cached results.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/pruning_study", "Checkpoints and logs.")

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS = {"tiny": 1500, "small": 1000}
METHODS = ("magnitude", "wanda", "sparsegpt")
SETTINGS = [("0.3", 0.3, None), ("0.5", 0.5, None), ("0.7", 0.7, None)]
SETTINGS += [("4:8", 0.0, "4:8"), ("2:4", 0.0, "2:4")]
CALIBRATION_ROWS, EVAL_ROWS, ROW = 128, 256, 128


def config(size, quick):
  steps = studies.steps(STEPS[size], quick=quick)
  return common.override(
    lm_configs.get_config(size),
    **{
      "steps": steps,
      "batch_size": 16,
      "seq_len": ROW,
      "eval_every": 0,
      "checkpoint_every": 0,
      "sample_tokens": 0,
      "optim.warmup_steps": min(100, steps),
    },
  )


def rows(tokens, count, rng):
  starts = rng.integers(0, len(tokens) - ROW - 1, count)
  return np.stack([tokens[s : s + ROW + 1] for s in starts]).astype(np.int32)


def evaluator(model, eval_rows, bytes_per_token):
  @jax.jit
  def sums(params):
    logits = model.apply({"params": params}, eval_rows[:, :-1])
    targets = eval_rows[:, 1:]
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
    return nll.mean(), (jnp.argmax(logits, -1) == targets).mean()

  def evaluate(params):
    nll, acc = sums(params)
    return {"bpb": float(nll) / math.log(2) / bytes_per_token, "accuracy": float(acc)}

  return evaluate


def study_model(size, root, quick, cached):
  workdir = os.path.join(root, size)
  cfg = config(size, quick)

  def train():
    _, seconds = studies.train(cfg, workdir)
    return {"seconds": seconds}

  trained = cached(f"{size}_train", train)
  restored = training.restore(cfg, workdir)
  model, params = restored.setup.task.model, restored.params
  corpus = restored.setup.task.corpus
  rng = np.random.default_rng(0)
  calibration = rows(corpus.train.tokens, 8 if quick else CALIBRATION_ROWS, rng)[:, :-1]
  evaluate = evaluator(
    model, jnp.asarray(rows(corpus.validation.tokens, EVAL_ROWS, rng)), corpus.bytes_per_token
  )
  n_params = sum(x.size for x in jax.tree.leaves(params))
  out = {"params": int(n_params), "train_seconds": trained["seconds"], "dense": evaluate(params)}
  out["pruned"] = {}
  for name, sparsity, nm in SETTINGS:
    for method in METHODS:

      def run(method=method, sparsity=sparsity, nm=nm):
        start = time.perf_counter()
        pruned, masks = prune.prune(
          model, params, calibration, method=method, sparsity=sparsity, nm=nm
        )
        seconds = time.perf_counter() - start
        kept = sum(int(m.sum()) for m in masks.values())
        total = sum(m.size for m in masks.values())
        return {**evaluate(pruned), "sparsity": 1 - kept / total, "seconds": seconds}

      result = cached(f"{size}_{method}_{name.replace(':', 'of')}", run)
      result["accuracy_retained"] = result["accuracy"] / out["dense"]["accuracy"]
      out["pruned"][f"{method} {name}"] = result
      print(
        f"{size} {method} {name}: bpb {result['bpb']:.4f} acc retained "
        f"{result['accuracy_retained']:.3f}",
        flush=True,
      )
  return out


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  quick = _QUICK.value
  root = os.path.join(_WORKDIR.value, "quick" if quick else "full")
  cached = functools.partial(studies.cached, root, fresh=_FRESH.value)
  results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "quick": quick}
  results["models"] = {size: study_model(size, root, quick, cached) for size in STEPS}
  results["goal"] = goal(results)
  studies.publish(HERE, results, quick=quick, plot=plot, report=report, name="pruning")


def goal(results) -> dict:
  out = {}
  for size, m in results["models"].items():
    at_half = {method: m["pruned"][f"{method} 0.5"] for method in METHODS}
    best = max(("wanda", "sparsegpt"), key=lambda k: at_half[k]["accuracy_retained"])
    out[size] = {
      "best_method": best,
      "best_retained": at_half[best]["accuracy_retained"],
      "magnitude_retained": at_half["magnitude"]["accuracy_retained"],
      "wanda_beats_magnitude": bool(
        at_half["wanda"]["accuracy_retained"] > at_half["magnitude"]["accuracy_retained"]
      ),
    }
    out[size]["met"] = bool(
      out[size]["best_retained"] >= 0.95
      and out[size]["best_retained"] > out[size]["magnitude_retained"]
    )
  out["met"] = all(v["met"] for v in out.values() if isinstance(v, dict))
  return out


def plot(results, path):
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  sizes = list(results["models"])
  fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), squeeze=False)
  for ax, size in zip(axes[0], sizes):
    m = results["models"][size]
    for method in METHODS:
      xs = [s for _, s, nm in SETTINGS if nm is None]
      ys = [m["pruned"][f"{method} {name}"]["bpb"] for name, _, nm in SETTINGS if nm is None]
      ax.plot(xs, ys, marker="o", label=method)
    ax.axhline(m["dense"]["bpb"], color="gray", ls="--", label="dense")
    ax.set_title(f"{size} ({m['params'] / 1e6:.1f}M params), unstructured")
    ax.set_xlabel("sparsity of the projections")
    ax.set_ylabel("held-out bits per byte")
    ax.set_yscale("log")
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def report(results, *, quick: bool) -> str:
  suffix = studies.suffix(quick)
  tables = []
  for size, m in results["models"].items():
    steps, dense = studies.steps(STEPS[size], quick=quick), m["dense"]
    lines = [
      f"**{size}** ({m['params'] / 1e6:.2f}M parameters, {steps} steps): dense bpb "
      f"{dense['bpb']:.4f}, next-byte accuracy {dense['accuracy']:.4f}",
      "",
      "| pattern | " + " | ".join(f"{k} bpb | {k} acc kept" for k in METHODS) + " |",
      "| --- |" + " --- | --- |" * len(METHODS),
    ]
    for name, _, _ in SETTINGS:
      cells = []
      for k in METHODS:
        r = m["pruned"][f"{k} {name}"]
        cells.append(f"{r['bpb']:.4f} | {r['accuracy_retained']:.3f}")
      lines.append(f"| {name} | " + " | ".join(cells) + " |")
    tables.append("\n".join(lines))
  g = results["goal"]
  verdicts = "; ".join(
    f"{size}: {v['best_method']} keeps {v['best_retained']:.3f} of the dense accuracy, magnitude "
    f"{v['magnitude_retained']:.3f} ({'met' if v['met'] else 'NOT met'}; Wanda "
    f"{'beats' if v['wanda_beats_magnitude'] else 'does not beat'} magnitude)"
    for size, v in g.items()
    if isinstance(v, dict)
  )
  return f"""# Pruning study: magnitude, Wanda and SparseGPT on 0.9M and 5.2M byte LMs

Generated by `experiments/pruning/run.py{' --quick' if quick else ''}` on {results['device']}
(jax {results['jax']}); numbers in `results{suffix}.json`. Every attention and MLP projection
pruned one shot from {CALIBRATION_ROWS} calibration rows of {ROW} training bytes; held-out bits
per byte and next-byte accuracy on {EVAL_ROWS} validation rows; "acc kept" = pruned accuracy /
dense accuracy.

{chr(10).join(t + chr(10) for t in tables)}
![held-out bpb against sparsity](pruning{suffix}.png)

Goal (at 50% unstructured the best one-shot method keeps >= 95% of the dense next-byte accuracy
and beats magnitude): {'met' if g['met'] else 'NOT met'}: {verdicts}."""


if __name__ == "__main__":
  app.run(main)
