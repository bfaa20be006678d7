"""Titans study: needle retrieval beyond the attention window, chunk size, and LM bpb.

    python experiments/titans/run.py [--quick] [--workdir=/tmp/titans_study]

1. Needle (``config.task="needle"``, ``training.tasks.NeedleTask``): rows of random filler with
   key-value pairs in their first half and a query for one key at the end. Six models of about
   the same parameter count, trained through the shared loop at one length and evaluated at 1x,
   2x and 4x of it: a sliding-window transformer (window much shorter than the needle distance;
   it cannot see the pairs), a full-attention transformer (the upper bound at the training
   length), and the Titans LMM, MAC, MAG and MAL (window = the same short window).
2. Chunk size: the best Titans variant at 4x retrained with other memory chunk sizes C (Titans
   Revisited reports that chunking hurts).
3. LM: eval bits per byte on the default corpus, the transformer against the four Titans at the
   same parameter budget and steps.

Writes ``results.json`` (``results_quick.json`` with ``--quick``, a smoke run of a few steps),
``report.md`` and ``accuracy_vs_length.svg`` next to this file.
"""

import dataclasses
import json
import os
import shutil
import time

from absl import app
from absl import flags
from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxseed import training
from flaxseed.configs import common
from flaxseed.models import titans
from flaxseed.models import transformer
from flaxseed.training import tasks
from flaxseed.training import trainer

_QUICK = flags.DEFINE_bool("quick", False, "A smoke run: a few steps per model.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/titans_study", "Checkpoints and logs.")
_FRESH = flags.DEFINE_bool("fresh", False, "Retrain models whose results are in the workdir.")

HERE = os.path.dirname(os.path.abspath(__file__))
D_MODEL, LAYERS, HEADS, WINDOW, CHUNK = 64, 2, 2, 16, 8
TRAIN_LEN, SCALES, EVAL_ROWS = 128, (1, 2, 4), 512
NEEDLE = dict(num_pairs=4, num_keys=16, num_values=16, region=0.5)
TITANS = ("lmm", "mac", "mag", "mal")


def model_configs(mlp_dim=128):
  """The six models; each one's MLP width is chosen to match MAC's parameter count."""
  base = {
      "swa": transformer.TransformerConfig(
          d_model=D_MODEL, num_layers=LAYERS, num_heads=HEADS, mlp_dim=mlp_dim,
          scan_layers=False, attention_pattern=(f"sliding_window:{WINDOW}",)),
      "full_attention": transformer.TransformerConfig(
          d_model=D_MODEL, num_layers=LAYERS, num_heads=HEADS, mlp_dim=mlp_dim, scan_layers=False),
  }
  for variant in TITANS:
    base[variant] = titans.TitansConfig(
        variant=variant, d_model=D_MODEL, num_layers=LAYERS, num_heads=HEADS, mlp_dim=mlp_dim,
        window=WINDOW, memory_chunk=CHUNK)
  target = count_params(base["mac"])
  matched = {}
  for name, cfg in base.items():
    widths = range(16, 1024, 8)
    best = min(widths, key=lambda f: abs(count_params(dataclasses.replace(cfg, mlp_dim=f))
                                         - target))
    matched[name] = dataclasses.replace(cfg, mlp_dim=best)
  return matched


def count_params(cfg) -> int:
  module = (titans.Titans if isinstance(cfg, titans.TitansConfig) else transformer.Transformer)(cfg)
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nn.unbox(shapes["params"]))))


def run_config(cfg, *, task: str, steps: int, batch_size: int, seq_len: int, lr: float):
  c = common.base_config()
  c.task = task
  c.model_family = "titans" if isinstance(cfg, titans.TitansConfig) else "transformer"
  c.model = common.model_section(cfg)
  c.steps, c.batch_size, c.seq_len = steps, batch_size, seq_len
  c.log_every, c.eval_every, c.checkpoint_every = max(steps // 10, 1), 0, 0
  c.eval_batches, c.sample_tokens = 4, 0
  c.optim.lr, c.optim.warmup_steps = lr, max(steps // 20, 1)
  c.mesh.data = 1
  if task == "needle":
    c.needle = dict(NEEDLE)
  return c


def train(name, config):
  """Trains in a fresh workdir; returns (workdir, summary, seconds), the summary ``None`` if the
  run stopped on a non-finite loss or gradient (recorded in the results, never hidden)."""
  workdir = os.path.join(_WORKDIR.value, name)
  shutil.rmtree(workdir, ignore_errors=True)  # a fresh run, never a resumed one
  start = time.perf_counter()
  try:
    summary = training.train(config, workdir)
  except trainer.NonFiniteLossError as e:
    print(f"{name}: {e}", flush=True)
    summary = None
  return workdir, summary, time.perf_counter() - start


def cached(name, fn):
  """``fn()``'s result, kept in the workdir so an interrupted study resumes where it stopped
  (``--fresh`` recomputes)."""
  path = os.path.join(_WORKDIR.value, f"{name}.json")
  if not _FRESH.value and os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  result = fn()
  os.makedirs(_WORKDIR.value, exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(result, f)
  return result


def needle_accuracy(config, workdir) -> dict[str, float]:
  """Accuracy of the restored model on fresh rows at each multiple of the training length."""
  restored = training.restore(config, workdir)
  task = restored.setup.task
  predict = jax.jit(lambda p, t: task.predictions(p, t)[1])
  out = {}
  for scale in SCALES:
    rng = np.random.default_rng([7, scale])
    rows = tasks.needle_rows(rng, EVAL_ROWS, scale * TRAIN_LEN + 1, **NEEDLE)
    correct = [predict(restored.params, rows[i:i + 64]) for i in range(0, EVAL_ROWS, 64)]
    out[f"acc@{scale}x"] = float(np.mean(np.concatenate(correct)))
  return out


def svg_plot(models: dict[str, dict[str, float]], path: str):
  """Accuracy against evaluation length, one line per model (a small hand-written SVG)."""
  w, h, pad = 520, 320, 50
  colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
  x = lambda i: pad + i * (w - 2 * pad) / (len(SCALES) - 1)
  y = lambda acc: h - pad - acc * (h - 2 * pad)
  parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w + 130}" height="{h}" '
           'font-family="sans-serif" font-size="12">',
           f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="black"/>',
           f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>',
           f'<text x="{w / 2 - 60}" y="{h - 12}">eval length (x {TRAIN_LEN} tokens)</text>',
           f'<text x="8" y="{pad - 15}">needle accuracy</text>']
  for i, s in enumerate(SCALES):
    parts.append(f'<text x="{x(i) - 8}" y="{h - pad + 18}">{s}x</text>')
  for acc in (0.0, 0.25, 0.5, 0.75, 1.0):
    parts.append(f'<text x="{pad - 34}" y="{y(acc) + 4}">{acc:.2f}</text>')
    parts.append(f'<line x1="{pad}" y1="{y(acc)}" x2="{w - pad}" y2="{y(acc)}" stroke="#ddd"/>')
  for j, (name, accs) in enumerate(models.items()):
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


def report(results, path):
  n = results["needle"]
  lines = ["# Titans study", "",
           f"Device: {results['device']}; jax {results['jax']}. Generated by "
           f"`experiments/titans/run.py{' --quick' if results['quick'] else ''}`.", "",
           f"## Needle retrieval (train length {n['train_len']}, window {WINDOW}, "
           f"{NEEDLE['num_pairs']} pairs in the first half, chance {1 / NEEDLE['num_values']:.3f})",
           "", f"{n['steps']} steps of batch {n['batch_size']}, about "
           f"{n['models']['mac']['params']:,} parameters each.", "",
           "| model | params | acc@1x | acc@2x | acc@4x | train s |", "|---|---|---|---|---|---|"]
  for name, m in n["models"].items():
    lines.append(f"| {name} | {m['params']:,} | {_acc(m, 1)} | {_acc(m, 2)} | {_acc(m, 4)} | "
                 f"{m['train_s']:.0f} |")
  lines += ["", "![accuracy against length](accuracy_vs_length.svg)", ""]
  ab = results["chunk_ablation"]
  lines += [f"## Memory chunk size ({ab['variant']})", "", "| C | acc@1x | acc@2x | acc@4x |",
            "|---|---|---|---|"]
  for chunk, m in sorted(ab["chunks"].items(), key=lambda kv: int(kv[0])):
    lines.append(f"| {chunk} | {_acc(m, 1)} | {_acc(m, 2)} | {_acc(m, 4)} |")
  setup = results["lm_setup"]
  lines += ["", f"## Language modeling (default corpus, {setup['steps']} steps, batch "
            f"{setup['batch_size']} x {setup['seq_len']} bytes)", "",
            "| model | params | eval bpb |", "|---|---|---|"]
  for name, m in results["lm"].items():
    bpb = "diverged" if m["bpb"] is None else f"{m['bpb']:.3f}"
    lines.append(f"| {name} | {m['params']:,} | {bpb} |")
  lines += ["", READING]
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")


# The reading of the numbers in results.json (written by hand after the run, kept with the code
# that makes the report so a rerun keeps it; revise it when the numbers change).
READING = """## Reading

* **The goal (the best Titans variant >= 0.9 at 4x the training length, the sliding-window
  transformer near chance) is not reached.** The sliding-window transformer is at chance as
  designed (its window of 16 never sees the pairs); the best Titans variant at 4x is LMM at 0.117
  (chance 0.0625); full attention, the upper bound at 1x, reaches 0.44 and falls to 0.31 at 4x.
* What limits it: (1) budget: 800 steps on two CPU cores, where even full attention has not
  learned the task; (2) the Titans runs' outer training is unstable: gradient-norm spikes up to
  7.7e3 (MAG) through the inner loop. A first MAG run (which differentiated through the memory's
  gradient-clip factor) had learned the task, training loss 0.83 against 2.77 at chance by step
  400, then hit a NaN gradient at step 463; that NaN path (0 * (0/0) at a vanishing vector) is
  fixed, and the rerun reported above did not learn within 800 steps. MAC stayed at chance.
* Provenance: the swa, full-attention, LMM and MAC needle runs come from the first pass (the clip
  factor still differentiated); MAG, MAL, the chunk-size and LM runs from the second (results
  are cached per model in the workdir, so the second pass reused the first four).
* Chunk size: LMM learns something at C = 8 and nothing at C = 4 or 16. With one seed of an
  unstable training this is within run-to-run variation; it says nothing yet about chunking.
* LM at 300 steps: every Titans variant is behind the transformer of equal size (MAL closest),
  and 2-4x slower per step on CPU.
* Next: GPU runs with more steps and several seeds; a sweep of the outer learning rate, the
  memory's `memory_max_lr` and gate initialization; a residual + norm memory (as lucidrains)."""


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  quick = _QUICK.value
  needle_steps, lm_steps = (8, 8) if quick else (800, 300)
  configs = model_configs()
  results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "quick": quick}
  suffix = "_quick" if quick else ""

  needle = {"train_len": TRAIN_LEN, "steps": needle_steps, "batch_size": 32, "models": {}}
  def needle_run(name, cfg):
    config = run_config(cfg, task="needle", steps=needle_steps, batch_size=32, seq_len=TRAIN_LEN,
                        lr=3e-3)
    workdir, summary, seconds = train(name, config)
    if summary is None:  # diverged: no final checkpoint to evaluate
      out = {f"acc@{s}x": None for s in SCALES}
      out["diverged"] = True
    else:
      out = needle_accuracy(config, workdir)
    out.update(params=count_params(cfg), train_s=seconds)
    print(name, out, flush=True)
    return out

  for name, cfg in configs.items():
    needle["models"][name] = cached(f"needle_{name}{suffix}",
                                    lambda name=name, cfg=cfg: needle_run(f"needle_{name}", cfg))
  results["needle"] = needle

  at_4x = lambda v: needle["models"][v]["acc@4x"] or 0.0
  best = max(TITANS, key=at_4x)
  ablation = {"variant": best, "chunks": {str(CHUNK): needle["models"][best]}}
  for chunk in (4, 16):
    cfg = dataclasses.replace(configs[best], memory_chunk=chunk)
    name = f"needle_{best}_c{chunk}"
    ablation["chunks"][str(chunk)] = cached(name + suffix,
                                            lambda name=name, cfg=cfg: needle_run(name, cfg))
  results["chunk_ablation"] = ablation

  def lm_run(name, cfg):
    config = run_config(cfg, task="lm", steps=lm_steps, batch_size=16, seq_len=128, lr=3e-3)
    _, summary, seconds = train(name, config)
    out = {"bpb": None if summary is None else float(summary["eval/bpb"]),
           "params": count_params(cfg), "train_s": seconds}
    print(name, out, flush=True)
    return out

  results["lm_setup"] = {"steps": lm_steps, "batch_size": 16, "seq_len": 128}
  results["lm"] = {}
  for name in ("full_attention",) + TITANS:
    label = "transformer" if name == "full_attention" else name
    results["lm"][label] = cached(f"lm_{name}{suffix}",
                                  lambda name=name: lm_run(f"lm_{name}", configs[name]))

  with open(os.path.join(HERE, f"results{suffix}.json"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=1)
  if not quick:
    svg_plot({k: v for k, v in needle["models"].items()},
             os.path.join(HERE, "accuracy_vs_length.svg"))
    report(results, os.path.join(HERE, "report.md"))


if __name__ == "__main__":
  app.run(main)
