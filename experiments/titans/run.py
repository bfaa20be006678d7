"""Titans study: needle retrieval beyond the attention window, chunk size, and LM bpb.

    python experiments/titans/run.py [--quick] [--workdir=/tmp/titans_study] [--fresh]

1. Needle (``configs/needle.py``: ``task="needle"``, ``training/tasks/needle.py``, rows from
   ``data/needle.py``): rows of random filler with key-value pairs in their first half and a
   query for every key at the end. Six models of about the same parameter count, trained through
   the shared loop at one length and evaluated at 1x, 2x and 4x of it: a sliding-window
   transformer (window much shorter than the needle distance; it cannot see the pairs), a
   full-attention transformer (the upper bound at the training length), and the Titans LMM, MAC,
   MAG and MAL (window = the same short window).
2. Ablations of the best Titans variant at 4x: other memory chunk sizes C (Titans Revisited
   reports that chunking hurts), and the memory's depth (the study's memory is linear,
   ``memory_depth=1``; the depth-2 MLP memory of the paper's default is retrained at the same
   budget). Then the gates the LMM's memory learned, by kind of token.
3. LM: eval bits per byte on the default corpus (``configs/needle.py:<model>-lm``), the
   transformer against the four Titans at the same parameter budget and steps.

Writes ``results.json``, ``accuracy_vs_length.svg`` and the generated section of ``report.md``
(the reading below it is written by hand and kept) next to this file; ``--quick`` (a smoke run
of a few steps, ``configs/needle.py:<model>-quick``) writes ``*_quick.*`` instead. Each run's
result is kept in the workdir, so an interrupted study resumes (``--fresh`` retrains).
"""

import functools
import json
import os

from absl import app
from absl import flags
from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxseed import models
from flaxseed import training
from flaxseed.configs import common
from flaxseed.configs import needle as needle_configs
from flaxseed.data import needle
from flaxseed.experiments import studies

_QUICK = flags.DEFINE_bool("quick", False, "A smoke run: a few steps per model.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/titans_study", "Checkpoints and logs.")
_FRESH = flags.DEFINE_bool("fresh", False, "Retrain models whose results are in the workdir.")

HERE = os.path.dirname(os.path.abspath(__file__))
WINDOW, CHUNK, TRAIN_LEN = needle_configs.WINDOW, needle_configs.CHUNK, needle_configs.TRAIN_LEN
MEMORY_DEPTH, NEEDLE = needle_configs.MEMORY_DEPTH, needle_configs.NEEDLE
SCALES, EVAL_ROWS = (1, 2, 4), 512
TITANS = ("lmm", "mac", "mag", "mal")


def run_config(name: str, *, lm: bool = False):
  """``configs/needle.py:<name>[-lm][-quick]``: the needle (or LM) run of model ``name``."""
  return needle_configs.get_config(f"{name}{'-lm' if lm else ''}{'-quick' if _QUICK.value else ''}")


def count_params(config) -> int:
  return needle_configs.num_params(models.build(config.model_family, config.model.to_dict()))


def needle_accuracy(config, workdir) -> dict[str, float]:
  """Accuracy of the restored model on fresh rows at each multiple of the training length."""
  restored = training.restore(config, workdir)
  task = restored.setup.task
  predict = jax.jit(lambda p, t: task.predictions(p, t)[1])
  out = {}
  for scale in SCALES:
    rng = np.random.default_rng([7, scale])
    rows = needle.rows(rng, EVAL_ROWS, scale * TRAIN_LEN + 1, **NEEDLE)
    correct = [predict(restored.params, rows[i : i + 64]) for i in range(0, EVAL_ROWS, 64)]
    out[f"acc@{scale}x"] = float(np.mean(np.concatenate(correct)))
  return out


TOKEN_KINDS = {
  "filler": (needle.FILLER, 256),  # token ids [lo, hi) of each kind
  "key": (needle.KEYS, needle.VALUES),
  "value": (needle.VALUES, needle.FILLER),
}


def memory_gates(config, workdir) -> dict[str, dict[str, float]]:
  """The first memory layer's mean gates (``theta``, ``alpha``, ``eta``) by kind of token
  (filler, key, value) on rows of 4x the training length, over heads: what the memory learned
  to write and to keep."""
  restored = training.restore(config, workdir)
  rows = needle.rows(np.random.default_rng(0), 16, SCALES[-1] * TRAIN_LEN, **NEEDLE)
  found = []

  def grab(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "_inputs" and not found:
      found.append(out[0])  # the Chunk of the first memory layer
    return out

  with nn.intercept_methods(grab):
    restored.setup.task.model.apply({"params": restored.params}, jnp.asarray(rows))
  chunk = found[0]
  gates = {
    "theta": chunk.theta,
    "alpha": 1 - jnp.exp(chunk.log_keep),
    "eta": jnp.exp(chunk.log_eta),
  }  # [B, H, T]
  out = {}
  for kind, (lo, hi) in TOKEN_KINDS.items():
    where = jnp.asarray((rows >= lo) & (rows < hi))[:, None, :]
    out[kind] = {
      g: float(jnp.sum(v * where) / (jnp.sum(where) * v.shape[1])) for g, v in gates.items()
    }
  return out


def svg_plot(accuracies: dict[str, dict[str, float]], path: str):
  """Accuracy against evaluation length, one line per model (a small hand-written SVG)."""
  w, h, pad = 520, 320, 50
  colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
  x = lambda i: pad + i * (w - 2 * pad) / (len(SCALES) - 1)
  y = lambda acc: h - pad - acc * (h - 2 * pad)
  parts = [
    f'<svg xmlns="http://www.w3.org/2000/svg" width="{w + 130}" height="{h}" '
    'font-family="sans-serif" font-size="12">',
    f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="black"/>',
    f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>',
    f'<text x="{w / 2 - 60}" y="{h - 12}">eval length (x {TRAIN_LEN} tokens)</text>',
    f'<text x="8" y="{pad - 15}">needle accuracy</text>',
  ]
  for i, s in enumerate(SCALES):
    parts.append(f'<text x="{x(i) - 8}" y="{h - pad + 18}">{s}x</text>')
  for acc in (0.0, 0.25, 0.5, 0.75, 1.0):
    parts.append(f'<text x="{pad - 34}" y="{y(acc) + 4}">{acc:.2f}</text>')
    parts.append(f'<line x1="{pad}" y1="{y(acc)}" x2="{w - pad}" y2="{y(acc)}" stroke="#ddd"/>')
  for j, (name, accs) in enumerate(accuracies.items()):
    if accs["acc@1x"] is None:
      continue
    points = " ".join(f"{x(i)},{y(accs[f'acc@{s}x'])}" for i, s in enumerate(SCALES))
    color = colors[j % len(colors)]
    parts.append(f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="2"/>')
    parts.append(f'<text x="{w - pad + 15}" y="{pad + 18 * j}" fill="{color}">{name}</text>')
  parts.append("</svg>")
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(parts))


def _acc(m, scale):
  acc = m[f"acc@{scale}x"]
  return "diverged" if acc is None else f"{acc:.3f}"


def report(results) -> str:
  """The generated part of ``report.md``: every table of ``results`` (the reading is written by
  hand in ``report.md``, below the generated section)."""
  n = results["needle"]
  suffix = studies.suffix(results["quick"])
  lines = [
    "# Titans study",
    "",
    f"Device: {results['device']}; jax {results['jax']}. Generated by "
    f"`experiments/titans/run.py{' --quick' if results['quick'] else ''}`.",
    "",
    f"## Needle retrieval (train length {n['train_len']}, window {WINDOW}, "
    f"{NEEDLE['num_pairs']} pairs in the first half, chance {1 / NEEDLE['num_values']:.3f})",
    "",
    f"{n['steps']} steps of batch {n['batch_size']}, about "
    f"{n['models']['mac']['params']:,} parameters each.",
    "",
    "| model | params | acc@1x | acc@2x | acc@4x | train s |",
    "|---|---|---|---|---|---|",
  ]
  for name, m in n["models"].items():
    lines.append(
      f"| {name} | {m['params']:,} | {_acc(m, 1)} | {_acc(m, 2)} | {_acc(m, 4)} | "
      f"{m['train_s']:.0f} |"
    )
  lines += ["", f"![accuracy against length](accuracy_vs_length{suffix}.svg)", ""]
  ab = results["chunk_ablation"]
  lines += [
    f"## Memory chunk size ({ab['variant']})",
    "",
    "| C | acc@1x | acc@2x | acc@4x |",
    "|---|---|---|---|",
  ]
  for chunk, m in sorted(ab["chunks"].items(), key=lambda kv: int(kv[0])):
    lines.append(f"| {chunk} | {_acc(m, 1)} | {_acc(m, 2)} | {_acc(m, 4)} |")
  ab = results["depth_ablation"]
  lines += [
    "",
    f"## Memory depth ({ab['variant']})",
    "",
    "| depth | params | acc@1x | acc@2x | acc@4x | train s |",
    "|---|---|---|---|---|---|",
  ]
  for d, m in sorted(ab["depths"].items(), key=lambda kv: int(kv[0])):
    lines.append(
      f"| {d} | {m['params']:,} | {_acc(m, 1)} | {_acc(m, 2)} | {_acc(m, 4)} | {m['train_s']:.0f} |"
    )
  gates = results["gates"]
  lines += [
    "",
    f"## What the memory learned ({gates['variant']}, first memory layer)",
    "",
    f"Mean gates by kind of token on rows of {SCALES[-1]}x the training length.",
    "",
    "| token | theta (write) | alpha (forget) | eta (momentum) |",
    "|---|---|---|---|",
  ]
  for kind, g in gates["by_token"].items():
    lines.append(f"| {kind} | {g['theta']:.4f} | {g['alpha']:.5f} | {g['eta']:.3f} |")
  setup = results["lm_setup"]
  lines += [
    "",
    f"## Language modeling (default corpus, {setup['steps']} steps, batch "
    f"{setup['batch_size']} x {setup['seq_len']} bytes)",
    "",
    "| model | params | eval bpb |",
    "|---|---|---|",
  ]
  for name, m in results["lm"].items():
    bpb = "diverged" if m["bpb"] is None else f"{m['bpb']:.3f}"
    lines.append(f"| {name} | {m['params']:,} | {bpb} |")
  return "\n".join(lines)


def goal(results) -> dict:
  """The study's goal: the best Titans variant at 4x the training length reaches 0.9 accuracy,
  while the sliding-window transformer stays near chance (within 0.05 of it)."""
  models = results["needle"]["models"]
  best = max(TITANS, key=lambda v: models[v]["acc@4x"] or 0.0)
  chance = 1 / NEEDLE["num_values"]
  swa = models["swa"]["acc@4x"]
  return {
    "best_titans": best,
    "best_titans_acc@4x": models[best]["acc@4x"],
    "swa_acc@4x": swa,
    "chance": chance,
    "met": bool(
      (models[best]["acc@4x"] or 0.0) >= 0.9 and swa is not None and swa <= chance + 0.05
    ),
  }


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  quick = _QUICK.value
  suffix = studies.suffix(quick)
  cached = functools.partial(studies.cached, _WORKDIR.value, fresh=_FRESH.value)
  results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "quick": quick}

  first = run_config("mac")
  needle_setup = {"train_len": first.seq_len, "steps": first.steps, "batch_size": first.batch_size}
  needle_results = {**needle_setup, "models": {}}

  def needle_run(name, config):
    summary, seconds = studies.train(
      config, os.path.join(_WORKDIR.value, name), allow_nonfinite=True
    )
    if summary is None:  # diverged: no final checkpoint to evaluate
      out = {f"acc@{s}x": None for s in SCALES}
      out["diverged"] = True
    else:
      out = needle_accuracy(config, os.path.join(_WORKDIR.value, name))
    out.update(params=count_params(config), train_s=seconds)
    print(name, out, flush=True)
    return out

  for name in needle_configs.MODELS:
    needle_results["models"][name] = cached(
      f"needle_{name}{suffix}", lambda name=name: needle_run(f"needle_{name}", run_config(name))
    )
  results["needle"] = needle_results

  at_4x = lambda v: needle_results["models"][v]["acc@4x"] or 0.0
  best = max(TITANS, key=at_4x)
  ablation = {"variant": best, "chunks": {str(CHUNK): needle_results["models"][best]}}
  for chunk in (4, 16):
    config = common.override(run_config(best), **{"model.memory_chunk": chunk})
    name = f"needle_{best}_c{chunk}"
    ablation["chunks"][str(chunk)] = cached(
      name + suffix, lambda name=name, config=config: needle_run(name, config)
    )
  results["chunk_ablation"] = ablation
  depth = {"variant": best, "depths": {str(MEMORY_DEPTH): needle_results["models"][best]}}
  for d in (2,):
    config = common.override(run_config(best), **{"model.memory_depth": d})
    name = f"needle_{best}_depth{d}"
    depth["depths"][str(d)] = cached(
      name + suffix, lambda name=name, config=config: needle_run(name, config)
    )
  results["depth_ablation"] = depth
  results["gates"] = {
    "variant": "lmm",
    "by_token": memory_gates(run_config("lmm"), os.path.join(_WORKDIR.value, "needle_lmm")),
  }

  def lm_run(name, config):
    summary, seconds = studies.train(
      config, os.path.join(_WORKDIR.value, name), allow_nonfinite=True
    )
    out = {
      "bpb": None if summary is None else float(summary["eval/bpb"]),
      "params": count_params(config),
      "train_s": seconds,
    }
    print(name, out, flush=True)
    return out

  lm_first = run_config("full_attention", lm=True)
  results["lm_setup"] = {
    "steps": lm_first.steps,
    "batch_size": lm_first.batch_size,
    "seq_len": lm_first.seq_len,
  }
  results["lm"] = {}
  for name in ("full_attention",) + TITANS:
    label = "transformer" if name == "full_attention" else name
    results["lm"][label] = cached(
      f"lm_{name}{suffix}", lambda name=name: lm_run(f"lm_{name}", run_config(name, lm=True))
    )

  results["goal"] = goal(results)
  with open(os.path.join(HERE, f"results{suffix}.json"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=1)
  svg_plot(needle_results["models"], os.path.join(HERE, f"accuracy_vs_length{suffix}.svg"))
  studies.write_report(
    os.path.join(HERE, f"report{suffix}.md"), report(results), script="experiments/titans/run.py"
  )


if __name__ == "__main__":
  app.run(main)
