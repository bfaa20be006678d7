"""Steering study (issue 23): read prose-vs-code from a byte LM's residual stream, steer with it.

    python experiments/steering/run.py [--quick] [--workdir=/tmp/steering_study]

1. **Model.** ``configs/lm.py:tiny`` (0.9M parameters, 4 layers) trained ``LM_STEPS`` steps on the
   whole embedded corpus: Python's pydoc prose and the standard library's code, the binary
   attribute (prose = positive).
2. **Judge.** A byte-bigram logistic classifier of prose vs code, trained on ``WINDOW``-byte
   windows of the training split and checked on held-out ones: the attribute of a generation.
3. **Reading.** ``READ`` prose and ``READ`` code windows of the validation split (disjoint from
   the ones below); each window's ``resid_post`` at every layer, averaged over its positions (a
   byte model's last position mostly encodes its own byte: reading it gave 0.60-0.68); each reader
   (``mean_diff``, ``pca`` on pairs, ``logistic``) fit on half and its reading accuracy measured on
   the other half.
4. **Steering.** ``PROMPTS`` code prompts (``PROMPT_LEN`` bytes of held-out code) continued
   greedily for ``GEN`` bytes with ``h + c v_l`` at every position of every layer's
   ``resid_post`` (``v_l``: that layer's ``mean_diff`` direction, so ``c = 1`` is the mean
   prose-code displacement; RepE and repeng steer many layers at once), norm-preserving
   (repeng's ``normalize``), for ``c`` in ``COEFFS``. The control: a random direction of the same
   norm at each layer, ``CONTROLS`` draws averaged (their range is reported). Also reported: the
   same steering without norm preservation. The attribute
   rate is the judge's share of prose among the generations.
5. **Cost.** Bits per byte of held-out text (half prose, half code) under the steered model at
   each ``c`` (the interventions on the full forward), against the unsteered model.

Goal: a monotone dose-response that moves the prose rate from below 0.2 to above 0.8 while the
random control stays within 0.1 of baseline. Writes ``results.json``, the generated section of
``report.md`` and the plots next to this file (``*_quick.*`` with ``--quick``).
"""

import json
import os

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from flaxseed import training
from flaxseed.configs import common
from flaxseed.configs import lm as lm_configs
from flaxseed.data import corpus as corpus_lib
from flaxseed.experiments import studies
from flaxseed.models import sampling
from flaxseed.models import sites
from flaxseed.models import steering

_QUICK = flags.DEFINE_bool("quick", False, "A smoke run: a few steps, few samples.")
_FRESH = flags.DEFINE_bool("fresh", False, "Recompute cached results.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/steering_study", "Checkpoints and caches.")
_SEED = flags.DEFINE_integer(
  "seed",
  0,
  "The LM's seed; the data, prompts and controls stay fixed. Outputs of seed s > 0 "
  "are named *_seed{s}.*.",
)

HERE = os.path.dirname(os.path.abspath(__file__))
LM_STEPS, WINDOW, READ, PROMPTS, PROMPT_LEN, GEN = 3000, 64, 400, 200, 32, 64
JUDGE_WINDOWS = 4000
COEFFS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0)
COST_TEXTS = 200
CONTROLS = 5  # random control directions, averaged
POOL = None  # read the mean over each window's positions (None) or one position (an index)


def windows(stream, n, length, rng):
  """``n`` random ``length``-byte windows of a token stream that stay inside one piece."""
  out = []
  starts = stream.piece_starts
  while len(out) < n:
    s = int(rng.integers(0, len(stream.tokens) - length))
    piece = np.searchsorted(starts, s, side="right") - 1
    end = starts[piece + 1] if piece + 1 < len(starts) else len(stream.tokens)
    if s + length <= end:
      out.append(stream.tokens[s : s + length])
  return np.stack(out).astype(np.int32)


def split_streams(prose: bool):
  """(train, validation) streams of the prose or the code half of the embedded corpus."""
  data = lm_configs.get_config("tiny").data
  data.corpus = "default:prose" if prose else "default:code"
  c = corpus_lib.build_corpus(data, 256)
  return c.train, c.validation


def bigram_features(texts):
  """Normalized byte-bigram counts hashed to 4096 buckets: ``[N, 4096]``."""
  pairs = texts[:, :-1].astype(np.int64) * 256 + texts[:, 1:]
  feats = np.zeros((len(texts), 4096), np.float32)
  for i, row in enumerate(pairs % 4096):
    np.add.at(feats[i], row, 1.0)
  return feats / feats.sum(1, keepdims=True)


def train_judge(prose, code):
  """A logistic regression on bigram features (optax, full batch): ``fn(texts) -> P(prose)``."""
  x = jnp.asarray(np.concatenate([bigram_features(prose), bigram_features(code)]))
  y = jnp.asarray(np.r_[np.ones(len(prose)), np.zeros(len(code))], jnp.float32)
  mean, scale = x.mean(0), x.std(0) + 1e-4
  opt = optax.adam(1e-2)

  def loss(p):
    logits = ((x - mean) / scale) @ p["w"] + p["b"]
    return optax.sigmoid_binary_cross_entropy(logits, y).mean() + 1e-4 * jnp.sum(p["w"] ** 2)

  @jax.jit
  def fit(p):
    def step(carry, _):
      p, s = carry
      u, s = opt.update(jax.grad(loss)(p), s, p)
      return (optax.apply_updates(p, u), s), None

    return jax.lax.scan(step, (p, opt.init(p)), None, length=300)[0][0]

  p = fit({"w": jnp.zeros(x.shape[1]), "b": jnp.zeros(())})
  return lambda texts: np.asarray(
    jax.nn.sigmoid(((jnp.asarray(bigram_features(texts)) - mean) / scale) @ p["w"] + p["b"])
  )


def main(argv):
  del argv
  quick = _QUICK.value
  global READ, PROMPTS, JUDGE_WINDOWS, COST_TEXTS, CONTROLS  # pylint: disable=global-statement
  if quick:
    READ, PROMPTS, JUDGE_WINDOWS, COST_TEXTS, CONTROLS = 40, 8, 200, 20, 2
  seed = _SEED.value
  suffix = studies.suffix(quick) + (f"_seed{seed}" if seed else "")
  root = os.path.join(
    _WORKDIR.value, ("quick" if quick else "full") + (f"_seed{seed}" if seed else "")
  )
  cached = lambda name, fn: studies.cached(root, name, fn, fresh=_FRESH.value)  # noqa: E731
  results = {"device": jax.devices()[0].device_kind}

  # 1. The model (unrolled layers: sites need them).
  config = common.override(
    lm_configs.get_config("tiny"),
    steps=studies.steps(LM_STEPS, quick=quick),
    eval_every=0,
    sample_tokens=0,
    seed=seed,
  )
  results["seed"] = seed
  lm_dir = os.path.join(root, "lm")
  results["lm"] = cached("lm", lambda: studies.train(config, lm_dir, resume=True)[0])
  restored = training.restore(config, lm_dir)
  model, params = restored.setup.task.model, restored.params
  layers = [f"layers_{i}/resid_post" for i in range(model.config.num_layers)]

  # 2. The judge.
  rng = np.random.default_rng(0)
  (prose_train, prose_val), (code_train, code_val) = split_streams(True), split_streams(False)
  judge = train_judge(
    windows(prose_train, JUDGE_WINDOWS, WINDOW, rng),
    windows(code_train, JUDGE_WINDOWS, WINDOW, rng),
  )
  held_prose, held_code = windows(prose_val, 500, WINDOW, rng), windows(code_val, 500, WINDOW, rng)
  results["judge_accuracy"] = float(
    ((judge(held_prose) > 0.5).sum() + (judge(held_code) <= 0.5).sum()) / 1000
  )
  print(f"judge accuracy on held-out windows: {results['judge_accuracy']:.3f}", flush=True)

  # 3. Reading, per layer and reader.
  prose, code = windows(prose_val, READ, WINDOW, rng), windows(code_val, READ, WINDOW, rng)
  acts_pos = steering.activations(model, params, prose, layers, index=POOL)
  acts_neg = steering.activations(model, params, code, layers, index=POOL)
  half = READ // 2
  results["reading"] = {}
  directions = {}
  for site in layers:
    row = {}
    for reader in steering.READERS:
      d = steering.read(acts_pos[site][:half], acts_neg[site][:half], reader, site=site)
      row[reader] = steering.accuracy(d, acts_pos[site][half:], acts_neg[site][half:])
      directions[(site, reader)] = d
    results["reading"][site] = row
    print(f"reading {site}: {row}", flush=True)
  # The steering vectors: every layer's mean_diff direction (RepE and repeng steer many layers),
  # and the control: a random direction of the same norm at each layer.
  # The readers' accuracy above is held out; the steering vectors use every window.
  steered = [steering.read(acts_pos[s], acts_neg[s], "mean_diff", site=s) for s in layers]

  def random_like(ds, seed):
    out = []
    for i, d in enumerate(ds):
      v = np.random.default_rng(1000 * seed + i).normal(size=d.vector.shape).astype(np.float32)
      out.append(
        steering.Direction(v / np.linalg.norm(v) * np.linalg.norm(d.vector), d.site, "random")
      )
    return out

  results["direction_norms"] = {d.site: float(np.linalg.norm(d.vector)) for d in steered}

  # 4. Dose-response from code prompts.
  prompt_rows = windows(code_val, PROMPTS, PROMPT_LEN, np.random.default_rng(2))
  cost_texts = np.concatenate(
    [
      windows(prose_val, COST_TEXTS // 2, 128, np.random.default_rng(3)),
      windows(code_val, COST_TEXTS // 2, 128, np.random.default_rng(4)),
    ]
  )

  def hooks(ds, c, normalize):
    return [steering.steer(d, c, normalize=normalize) for d in ds]

  def bpb(ds, c, normalize):
    """Bits per byte of the cost texts under the steered model (its full forward)."""
    fns = {site: (lambda h, fn=fn, a=a: fn(h, a)) for site, fn, a in hooks(ds, c, normalize)}
    with sites.Interventions(fns) as record:
      logits = model.apply({"params": params}, jnp.asarray(cost_texts[:, :-1]))
    record.check()
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    picked = jnp.take_along_axis(logp, jnp.asarray(cost_texts[:, 1:, None]), -1)
    return float(-picked.mean() / np.log(2))

  def generations(ds, c, normalize, rows=prompt_rows):
    out = sampling.generate(
      model,
      params,
      jnp.asarray(rows),
      max_new_tokens=GEN,
      temperature=0.0,
      interventions=hooks(ds, c, normalize),
    )
    return np.asarray(out)

  def dose(ds, normalize):
    rows = []
    for c in COEFFS:
      generated = generations(ds, c, normalize)[:, PROMPT_LEN:]
      rate = float((judge(generated) > 0.5).mean())
      rows.append({"coeff": c, "prose_rate": rate, "bpb": bpb(ds, c, normalize)})
    return rows

  # The control: CONTROLS random draws, averaged per coefficient (one draw is a noisy control).
  draws = [dose(random_like(steered, seed), True) for seed in range(CONTROLS)]
  control = [
    {
      "coeff": c,
      "prose_rate": float(np.mean([d[i]["prose_rate"] for d in draws])),
      "prose_rate_range": [
        min(d[i]["prose_rate"] for d in draws),
        max(d[i]["prose_rate"] for d in draws),
      ],
      "bpb": float(np.mean([d[i]["bpb"] for d in draws])),
    }
    for i, c in enumerate(COEFFS)
  ]
  results["dose"] = {
    "mean_diff": dose(steered, True),
    "random": control,
    "mean_diff_unnormalized": dose(steered, False),
  }
  for name, rows in results["dose"].items():
    print(name, [(r["coeff"], r["prose_rate"], round(r["bpb"], 3)) for r in rows], flush=True)
  results["example"] = {
    f"{c:g}": [_text(r) for r in generations(steered, c, True, prompt_rows[:3])]
    for c in (0.0, 1.5, 3.0)
  }

  results["goal"] = goal(results)
  with open(os.path.join(HERE, f"results{suffix}.json"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2)
  plot(results, suffix)
  studies.write_report(
    os.path.join(HERE, f"report{suffix}.md"), report(results), script="experiments/steering/run.py"
  )
  print(json.dumps(results["goal"]), flush=True)


def _text(row) -> str:
  return bytes(np.asarray(row).astype(np.uint8).tolist()).decode("utf-8", "replace")


def goal(results) -> dict:
  steered = [r["prose_rate"] for r in results["dose"]["mean_diff"]]
  control = [r["prose_rate"] for r in results["dose"]["random"]]
  base = steered[0]
  monotone = all(b >= a - 1e-9 for a, b in zip(steered, steered[1:]))
  return {
    "baseline": base,
    "max_steered": max(steered),
    "monotone": monotone,
    "control_max_shift": max(abs(c - control[0]) for c in control),
    "met": bool(
      base < 0.2
      and max(steered) > 0.8
      and monotone
      and max(abs(c - control[0]) for c in control) <= 0.1
    ),
  }


def plot(results, suffix):
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  layers = list(results["reading"])
  for reader in steering.READERS:
    axes[0].plot(
      range(len(layers)), [results["reading"][s][reader] for s in layers], marker="o", label=reader
    )
  axes[0].set_xticks(range(len(layers)), [s.split("/")[0] for s in layers])
  axes[0].set_ylabel("reading accuracy (held out)")
  axes[0].legend(fontsize=8)
  for name, rows in results["dose"].items():
    axes[1].plot(
      [r["coeff"] for r in rows], [r["prose_rate"] for r in rows], marker="o", label=name
    )
  axes[1].set_xlabel("coefficient c (h + c v_l at every layer l)")
  axes[1].set_ylabel("prose rate of greedy generations")
  axes[1].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(HERE, f"steering{suffix}.png"), dpi=120)
  plt.close(fig)


def report(results) -> str:
  lines = [
    f"Device: {results['device']}. LM seed {results.get('seed', 0)}. Judge accuracy (held-out "
    "windows): "
    f"{results['judge_accuracy']:.3f}. Steered: every layer's `resid_post`, "
    f"|v_l| = {', '.join(f'{n:.2f}' for n in results['direction_norms'].values())}.",
    "",
    "| layer | " + " | ".join(steering.READERS) + " |",
    "| --- | " + " | ".join("---" for _ in steering.READERS) + " |",
  ]
  for site, row in results["reading"].items():
    lines.append(f"| {site} | " + " | ".join(f"{row[r]:.3f}" for r in steering.READERS) + " |")
  lines += [
    "",
    "Prose rate of greedy generations from code prompts, and bits per byte of held-out text "
    "(half prose, half code) under the steered model:",
    "",
    "| c | prose rate: mean_diff | random (same norms; mean, range) "
    "| mean_diff, no norm preservation | bpb: mean_diff | random | no norm preservation |",
    "| --- | --- | --- | --- | --- | --- | --- |",
  ]
  d = results["dose"]
  for a, b, u in zip(d["mean_diff"], d["random"], d["mean_diff_unnormalized"]):
    lines.append(
      f"| {a['coeff']:g} | {a['prose_rate']:.3f} | {b['prose_rate']:.3f} "
      f"({b['prose_rate_range'][0]:.3f}-{b['prose_rate_range'][1]:.3f}) | {u['prose_rate']:.3f} "
      f"| {a['bpb']:.3f} | {b['bpb']:.3f} | {u['bpb']:.3f} |"
    )
  lines += ["", f"Goal: {results['goal']}", "", "Examples (prompt + greedy continuation):", ""]
  for c, texts in results["example"].items():
    for t in texts:
      lines.append(f"- c={c}: `{t!r}`")
  return "\n".join(lines)


if __name__ == "__main__":
  app.run(main)
