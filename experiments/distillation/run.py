"""Distillation study: does a 1M student learn more from a 5M teacher's soft targets than from data?

    python experiments/distillation/run.py [--quick] [--workdir=/tmp/distill_study]

1. **Teacher.** ``configs/lm.py:small`` (5.2M parameters: width 256, 6 layers) trained
   ``TEACHER_STEPS`` steps on the prose half of the embedded corpus (``default:prose``).
2. **Students.** ``configs/lm.py:tiny`` (0.9M parameters), ``STUDENT_STEPS`` steps of the same
   16 x 128-token batches, seeds 0 and 1, trained
   * on data alone (the LM task), and
   * on the teacher's soft targets (``task="distill"``: ``alpha * T² * KL(teacher ‖ student) +
     (1 - alpha) * CE`` with ``alpha = 0.5``, ``T = 1``, MaxText's defaults),
   equal steps and tokens; the teacher's forward passes are the only extra compute.
3. **Measure.** Held-out bits per byte of each student on the prose validation split (the LM
   task's evaluation, 8 x 16 rows), and the curves over training.

Goal (issue 26): the distilled student's held-out bpb is lower than the data-only student's, by
a margin larger than the seed-to-seed spread (the larger of the two conditions' spreads). Writes
``results.json``, ``curves.png`` and the generated section of ``report.md`` next to this file
(``*_quick.*`` with ``--quick``, a smoke run of a few steps).
"""

import functools
import json
import os
import statistics

from absl import app
from absl import flags
from absl import logging
import jax

from flaxseed.configs import common
from flaxseed.configs import distill as distill_configs
from flaxseed.configs import lm as lm_configs
from flaxseed.experiments import studies

_QUICK = flags.DEFINE_bool("quick", False, "A smoke run: a few steps per model.")
_FRESH = flags.DEFINE_bool("fresh", False, "Recompute cached results.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/distill_study", "Checkpoints and logs.")

HERE = os.path.dirname(os.path.abspath(__file__))
TEACHER_STEPS, STUDENT_STEPS, SEEDS = 800, 800, (0, 1)
DATA = {"data.corpus": "default:prose", "batch_size": 16, "seq_len": 128, "sample_tokens": 0}
DISTILL = {"distill.alpha": 0.5, "distill.temperature": 1.0, "distill.divergence": "forward_kl"}


def teacher_config(quick):
  c = lm_configs.get_config("small")
  steps = studies.steps(TEACHER_STEPS, quick=quick)
  return common.override(
    c,
    **DATA,
    **{
      "steps": steps,
      "eval_every": 0,
      "checkpoint_every": 0,
      "optim.warmup_steps": min(100, steps),
    },
  )


def student_config(kind, seed, teacher_dir, quick):
  steps = studies.steps(STUDENT_STEPS, quick=quick)
  base = (
    distill_configs.get_config("tiny") if kind == "distilled" else lm_configs.get_config("tiny")
  )
  overrides = {
    **DATA,
    "steps": steps,
    "seed": seed,
    "eval_every": max(steps // 8, 1),
    "checkpoint_every": 0,
    "optim.warmup_steps": min(50, steps),
  }
  if kind == "distilled":
    overrides.update(DISTILL, **{"distill.teacher_workdir": teacher_dir})
  return common.override(base, **overrides)


def _curve(workdir):
  """(step, eval bpb) pairs of a run's metrics.jsonl."""
  out = []
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    for line in f:
      row = json.loads(line)
      if "eval/bpb" in row:
        out.append((row["step"], row["eval/bpb"]))
  return out


def goal(results) -> dict:
  students = results["students"]
  mean = {k: statistics.mean(students[k][str(s)]["bpb"] for s in SEEDS) for k in students}
  spread = {
    k: max(students[k][str(s)]["bpb"] for s in SEEDS)
    - min(students[k][str(s)]["bpb"] for s in SEEDS)
    for k in students
  }
  gap = mean["data"] - mean["distilled"]
  return {
    "data_bpb_mean": mean["data"],
    "distilled_bpb_mean": mean["distilled"],
    "gap": gap,
    "seed_spread": max(spread.values()),
    "met": bool(gap > max(spread.values())),
  }


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  quick = _QUICK.value
  suffix = studies.suffix(quick)
  root = os.path.join(_WORKDIR.value, "quick" if quick else "full")
  cached = functools.partial(studies.cached, root, fresh=_FRESH.value)
  results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "quick": quick}

  teacher_dir = os.path.join(root, "teacher")

  def train_teacher():
    summary, seconds = studies.train(teacher_config(quick), teacher_dir)
    return {"bpb": summary["eval/bpb"], "seconds": seconds}

  results["teacher"] = cached("teacher", train_teacher)
  results["students"] = {"data": {}, "distilled": {}}
  for kind in ("data", "distilled"):
    for seed in SEEDS:
      workdir = os.path.join(root, f"{kind}_seed{seed}")

      def train_student(kind=kind, seed=seed, workdir=workdir):
        summary, seconds = studies.train(student_config(kind, seed, teacher_dir, quick), workdir)
        return {"bpb": summary["eval/bpb"], "seconds": seconds, "curve": _curve(workdir)}

      results["students"][kind][str(seed)] = cached(f"{kind}_seed{seed}", train_student)
      print(
        f"{kind} seed {seed}: bpb {results['students'][kind][str(seed)]['bpb']:.4f}", flush=True
      )
  results["goal"] = goal(results)
  with open(os.path.join(HERE, f"results{suffix}.json"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2)
  plot(results, os.path.join(HERE, f"curves{suffix}.png"))
  studies.write_report(
    os.path.join(HERE, f"report{suffix}.md"),
    report(results, quick=quick),
    script="experiments/distillation/run.py",
  )


def plot(results, path):
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(6, 4))
  for kind, color in (("data", "tab:blue"), ("distilled", "tab:orange")):
    for seed in SEEDS:
      curve = results["students"][kind][str(seed)]["curve"]
      ax.plot(*zip(*curve), color=color, alpha=0.8, label=f"{kind} (seed {seed})")
  ax.axhline(results["teacher"]["bpb"], color="gray", ls="--", label="teacher (5.2M)")
  ax.set_xlabel("student step")
  ax.set_ylabel("held-out bits per byte")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def report(results, *, quick: bool) -> str:
  suffix = studies.suffix(quick)
  s, g = results["students"], results["goal"]
  rows = "\n".join(
    f"| {kind} | {s[kind]['0']['bpb']:.4f} | {s[kind]['1']['bpb']:.4f} "
    f"| {statistics.mean(s[kind][str(x)]['bpb'] for x in SEEDS):.4f} "
    f"| {statistics.mean(s[kind][str(x)]['seconds'] for x in SEEDS):.0f} |"
    for kind in ("data", "distilled")
  )
  met = "met" if g["met"] else "NOT met"
  teacher_steps = studies.steps(TEACHER_STEPS, quick=quick)
  student_steps = studies.steps(STUDENT_STEPS, quick=quick)
  return f"""# Distillation study: a 0.9M student on a 5.2M teacher's soft targets

Generated by `experiments/distillation/run.py{' --quick' if quick else ''}` on
{results['device']} (jax {results['jax']}); numbers in `results{suffix}.json`. Teacher:
`configs/lm.py:small` trained {teacher_steps} steps on `default:prose` (held-out bpb
{results['teacher']['bpb']:.4f}). Students: `configs/lm.py:tiny`, {student_steps} steps of
16 x 128 tokens, alpha = 0.5, T = 1, forward KL.

| student | bpb seed 0 | bpb seed 1 | mean | seconds |
| --- | --- | --- | --- | --- |
{rows}

![held-out bpb over training](curves{suffix}.png)

Goal (the distilled student's mean bpb lower than the data-only student's by more than the
seed-to-seed spread): {met}: gap {g['gap']:.4f} bits per byte, spread {g['seed_spread']:.4f}."""


if __name__ == "__main__":
  app.run(main)
