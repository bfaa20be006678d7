"""SAE study: every architecture on one model's residual stream, across sparsities.

    python experiments/sae/run.py [--quick] [--workdir=/tmp/sae_study] [--lm_workdir=DIR]

1. **The model.** ``configs/lm.py:tiny`` (4 layers, width 128) trained on the default corpus for
   2000 steps (or ``--lm_workdir``, any run with ``scan_layers=False``).
2. **Activations.** The residual stream after block 1 (``layers_1/resid_post``, the middle of
   the stack), cached once for 8192 training rows of 128 tokens (1M tokens, evenly spaced over
   the split) and the validation rows the evals read (``training/activations.py``).
3. **SAEs.** 8x expansion (1024 latents), activations rescaled to mean squared norm d_in
   (``constant_norm_rescale``), Adam at 1e-3, 1000 steps of 16 x 128 tokens (2M tokens) each:
   TopK k in {8, 16, 32, 64}, BatchTopK k in {16, 32}, ReLU-L1, JumpReLU and Gated at two
   sparsity coefficients each.
4. **Evals** (the loop's final eval on 8 x 16 validation rows, 16k tokens): L0, FVU, CE loss
   recovered and KL with the reconstruction spliced into the model; ``dead_frac``: latents that
   did not fire in the last 262k training tokens.
5. **Browser** of the TopK k=32 SAE, copied to ``experiments/sae/browser/``.

Writes ``results.json``, ``frontier.png`` and the generated section of ``report.md`` (the reading
below it is written by hand and kept) next to this file; ``--quick`` runs a few steps of each and
writes ``*_quick.*`` instead. Runs resume: a finished SAE is read
back from its workdir.
"""

import json
import os
import shutil
import subprocess
import sys

from absl import app
from absl import flags

from flaxseed import training
from flaxseed.configs import common
from flaxseed.configs import lm as lm_configs
from flaxseed.configs import sae as sae_configs
from flaxseed.experiments import studies
from flaxseed.training import activations

_QUICK = flags.DEFINE_bool("quick", False, "A smoke run: a few steps per model.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/sae_study", "Checkpoints, caches and logs.")
_LM_WORKDIR = flags.DEFINE_string("lm_workdir", None, "A trained model to read instead.")

HERE = os.path.dirname(os.path.abspath(__file__))
SITE, LM_STEPS, SAE_STEPS, CACHE_ROWS = "layers_1/resid_post", 2000, 1000, 8192

# (arch, sparsity knob, value, other SAEConfig fields). JumpReLU's threshold starts at 0.5, not
# SAELens' 0.01: after constant_norm_rescale pre-activations are O(1), and Adam moves
# log(theta) by about lr per step, so from 0.01 it cannot reach a useful threshold in 1000 steps.
SWEEP = (
  [("topk", "k", k, {}) for k in (8, 16, 32, 64)]
  + [("batch_topk", "k", k, {}) for k in (16, 32)]
  + [("relu_l1", "l1_coefficient", c, {}) for c in (0.5, 2.0)]
  + [("jumprelu", "l0_coefficient", c, {"jumprelu_init_threshold": 0.5}) for c in (0.1, 1.0)]
  + [("gated", "l1_coefficient", c, {}) for c in (0.5, 2.0)]
)


def _steps(full: int) -> int:
  return studies.steps(full, quick=_QUICK.value)


def _last_rows(workdir: str) -> tuple[dict, dict]:
  """(last train row, last eval row) of a run's metrics.jsonl."""
  train, evaluation = {}, {}
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    for line in f:
      row = json.loads(line)
      if "loss" in row:
        train = row
      elif "eval/fvu" in row:
        evaluation = row
  return train, evaluation


def train_lm() -> str:
  workdir = _LM_WORKDIR.value or os.path.join(_WORKDIR.value, "lm")
  if not _LM_WORKDIR.value:
    config = common.override(
      lm_configs.get_config("tiny"),
      steps=_steps(LM_STEPS),
      sample_tokens=0,
      eval_every=0,
      checkpoint_every=500,
    )
    training.train(config, workdir)
  return workdir


def sae_config(lm_workdir: str, cache: str, arch: str, knob: str, value, extra=None) -> object:
  config = sae_configs.get_config("tiny")
  return common.override(
    config,
    **{
      "steps": _steps(SAE_STEPS),
      "eval_every": 0,
      "checkpoint_every": 1000,
      "sae.lm_workdir": lm_workdir,
      "sae.site": SITE,
      "sae.activations": cache,
      "model.arch": arch,
      f"model.{knob}": value,
      "model.normalize_activations": "constant_norm_rescale",
      **{f"model.{k}": v for k, v in (extra or {}).items()},
    },
  )


def frontier_png(saes: list[dict], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=110)
  for arch in dict.fromkeys(s["arch"] for s in saes):
    pts = sorted((s["l0"], s["fvu"]) for s in saes if s["arch"] == arch)
    ax.plot(*zip(*pts), "o-", label=arch)
  ax.set_xscale("log")
  ax.set_xlabel("L0 (active latents per token)")
  ax.set_ylabel("FVU (validation)")
  ax.set_title(f"L0-FVU frontier, {SITE} of transformer-tiny, 1024 latents")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def main(argv):
  del argv
  suffix = studies.suffix(_QUICK.value)
  lm_workdir = train_lm()
  cache = os.path.join(_WORKDIR.value, "activations")
  if not os.path.exists(os.path.join(cache, "meta.json")):
    activations.write(
      sae_config(lm_workdir, "", "topk", "k", 32),
      cache,
      max_rows=256 if _QUICK.value else CACHE_ROWS,
    )
  saes = []
  for arch, knob, value, extra in SWEEP:
    name = "_".join([arch, knob, str(value)] + [f"{k}_{v}" for k, v in extra.items()])
    workdir = os.path.join(_WORKDIR.value, "saes", name)
    training.train(sae_config(lm_workdir, cache, arch, knob, value, extra), workdir)
    train_row, eval_row = _last_rows(workdir)
    saes.append(
      {
        "arch": arch,
        knob: value,
        **extra,
        "l0": eval_row["eval/l0"],
        "fvu": eval_row["eval/fvu"],
        "dead_frac": train_row["dead_frac"],
        "ce_loss_recovered": eval_row["eval/ce_loss_recovered"],
        "kl": eval_row["eval/kl"],
        "cossim": eval_row["eval/cossim"],
        "ce_clean": eval_row["eval/ce_clean"],
        "ce_sae": eval_row["eval/ce_sae"],
        "ce_zero": eval_row["eval/ce_zero"],
        "workdir": workdir,
      }
    )
    print(json.dumps(saes[-1]), flush=True)

  goal = [
    s
    for s in saes
    if s["arch"] == "topk"
    and s["l0"] <= 32
    and s["fvu"] <= 0.15
    and s["dead_frac"] <= 0.1
    and s["ce_loss_recovered"] >= 0.9
  ]
  results = {
    "site": SITE,
    "model": lm_workdir,
    "sae_steps": _steps(SAE_STEPS),
    "tokens_per_step": 16 * 128,
    "cache_rows": CACHE_ROWS,
    "saes": saes,
    "goal_met_by": [f"topk k={s['k']}" for s in goal],
    "goal": {
      "criteria": "topk with l0 <= 32, fvu <= 0.15, dead_frac <= 0.1, ce_loss_recovered >= 0.9",
      "met_by": [f"topk k={s['k']}" for s in goal],
      "met": bool(goal),
    },
  }
  with open(os.path.join(HERE, f"results{suffix}.json"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2)
  frontier_png(saes, os.path.join(HERE, f"frontier{suffix}.png"))

  main_sae = next(s for s in saes if s["arch"] == "topk" and s.get("k") == 32)
  browser = os.path.join(HERE, f"browser{suffix}")
  shutil.rmtree(browser, ignore_errors=True)
  subprocess.run(
    [
      sys.executable,
      os.path.join(HERE, "browse.py"),
      f"--workdir={main_sae['workdir']}",
      f"--out={browser}",
      "--features=24",
      "--rows=256",
      "--contexts=8",
    ],
    check=True,
  )

  studies.write_report(
    os.path.join(HERE, f"report{suffix}.md"),
    report(results, quick=_QUICK.value),
    script="experiments/sae/run.py",
  )


def _knobs(s: dict) -> str:
  keys = ("k", "l1_coefficient", "l0_coefficient", "jumprelu_init_threshold")
  return ", ".join(f"{k}={s[k]}" for k in keys if k in s)


def report(results, *, quick: bool) -> str:
  """The generated part of ``report.md``: the table of ``results``, the frontier and the goal
  (the reading is written by hand below the generated section)."""
  suffix, saes = studies.suffix(quick), results["saes"]
  lm_steps = studies.steps(LM_STEPS, quick=quick)
  rows = "\n".join(
    f"| {s['arch']} | {_knobs(s)} "
    f"| {s['l0']:.1f} | {s['fvu']:.3f} | {s['dead_frac']:.3f} | {s['ce_loss_recovered']:.3f} "
    f"| {s['kl']:.4f} |"
    for s in saes
  )
  goal = "met by " + ", ".join(results["goal_met_by"]) if results["goal_met_by"] else "NOT met"
  return f"""# SAE study: {results['site']} of transformer-tiny

Generated by `experiments/sae/run.py{' --quick' if quick else ''}`; numbers in
`results{suffix}.json`. Model: `configs/lm.py:tiny` trained {lm_steps} steps on the
default corpus. SAEs: 1024 latents (8x), {results['sae_steps']} steps of 2048 tokens from an
activation cache of {results['cache_rows']} rows. Evals on 16k validation tokens (clean CE
{saes[0]['ce_clean']:.3f} nats, zero-ablated {saes[0]['ce_zero']:.3f}).

| arch | sparsity knob | L0 | FVU | dead | CE loss recovered | KL |
| --- | --- | --- | --- | --- | --- | --- |
{rows}

![L0-FVU frontier](frontier{suffix}.png)

Goal (a TopK SAE with L0 <= 32, FVU <= 0.15, dead fraction <= 0.1, CE loss recovered >= 0.9):
{goal}.

Feature browser of TopK k=32: [browser{suffix}/index.html](browser{suffix}/index.html)."""


if __name__ == "__main__":
  app.run(main)
