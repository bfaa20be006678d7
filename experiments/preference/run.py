"""Preference study: which preference loss best turns a sloppy SFT policy into one that sorts?

    python experiments/preference/run.py [--quick] [--workdir=/tmp/preference_study]

1. **Policy.** ``configs/lm.py:tiny`` (0.9M parameters) pre-trained ``PRETRAIN_STEPS`` steps on
   the embedded corpus, then chat-SFT'd (``task="sft"``) on prompts ``sort 4135`` whose
   demonstrated answers are the sorted digits only ``SFT_CORRECT`` of the time (otherwise a random
   permutation): a policy that knows the format but sorts only sometimes.
2. **Reward.** 1 if the completion is exactly the sorted digits, else 0 (programmatic, in [0, 1]).
3. **Pairs.** ``SAMPLES`` completions a prompt sampled from the SFT policy at temperature 1 and
   labelled by the reward: every prompt with at least one right and one wrong completion gives a
   pair (chosen: a right one); KTO gets every sample with its label. (A ``--quick`` run's policy
   is never right: there the sorted digits stand in as the chosen answer.)
4. **Runs.** From the SFT policy, at matched steps (``PREF_STEPS``): DPO at β = 0.05, 0.1, 0.5,
   IPO (β = 0.1), SimPO (β = 2, γ/β = 0.25), ORPO (λ = 0.1) and KTO (β = 0.1), each at every
   learning rate of ``LRS`` and reported at the one with the best held-out reward (the same
   tuning budget for every method; chosen on the evaluation prompts, so the best numbers are
   optimistic by the selection).
5. **Measures.** On ``EVAL_PROMPTS`` held-out prompts (never in the SFT or pair data): the mean
   reward of one sampled completion a prompt
   (temperature 1), and a Monte Carlo estimate of the sequence KL(π ‖ π_SFT) on those samples;
   held-out preference accuracy (``eval/rewards/accuracy`` of the paired losses); the chosen
   completions' log-probability over training (it often falls under DPO while the margin grows).

Goal (issue 26): the best method at least doubles the SFT policy's mean reward and raises it by at
least 0.2, at a KL reported. Writes ``results.json``, ``frontier.png``, ``chosen_logps.png`` and
the generated section of ``report.md`` next to this file (``*_quick.*`` with ``--quick``).
"""

import functools
import json
import os

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from flaxseed import training
from flaxseed.configs import common
from flaxseed.configs import lm as lm_configs
from flaxseed.configs import preference as preference_configs
from flaxseed.configs import sft as sft_configs
from flaxseed.data import chat
from flaxseed.data import tokenizers
from flaxseed.experiments import studies
from flaxseed.models import sampling

_QUICK = flags.DEFINE_bool("quick", False, "A smoke run: a few steps per model.")
_FRESH = flags.DEFINE_bool("fresh", False, "Recompute cached results.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/preference_study", "Checkpoints and logs.")

HERE = os.path.dirname(os.path.abspath(__file__))
PRETRAIN_STEPS, SFT_STEPS, PREF_STEPS = 600, 300, 300
SFT_CORRECT, DIGITS, SAMPLES = 0.3, 4, 8
TRAIN_PROMPTS, EVAL_PROMPTS, EVAL_SEED = 4000, 256, 2
SEQ_LEN = 64
METHODS = {  # name -> config.preference overrides
  "dpo_b0.05": {"loss": "sigmoid", "beta": 0.05},
  "dpo_b0.1": {"loss": "sigmoid", "beta": 0.1},
  "dpo_b0.5": {"loss": "sigmoid", "beta": 0.5},
  "ipo": {"loss": "ipo", "beta": 0.1},
  "simpo": {"loss": "simpo", "beta": 2.0},
  "orpo": {"loss": "orpo", "orpo_lambda": 0.1},
  "kto": {"loss": "kto", "beta": 0.1},
}
LRS = (3e-6, 1e-5, 3e-5, 1e-4)  # every method at each; reported at its best
BYTES = tokenizers.ByteTokenizer()
END = chat.END["assistant"]  # "<|end|>\n": the completion stops at its "<"
STOP = ord("<")


def prompts(n, seed):
  """``n`` digit strings; training sets (every seed but ``EVAL_SEED``) never hold an evaluation
  prompt."""
  rng = np.random.default_rng(seed)
  held_out = set() if seed == EVAL_SEED else set(prompts(EVAL_PROMPTS, EVAL_SEED))
  out = []
  while len(out) < n:
    digits = "".join(rng.choice(list("0123456789"), size=DIGITS))
    if digits not in held_out:
      out.append(digits)
  return out


def reward(digits: str, completion: str) -> float:
  return float(completion == "".join(sorted(digits)))


def chat_prefix(digits: str) -> str:
  """The chat template up to the assistant's answer (what the policy continues)."""
  return f"{chat.TEMPLATE['user']}sort {digits}{chat.END['user']}{chat.TEMPLATE['assistant']}"


def write_sft_data(path, seed):
  rng = np.random.default_rng(seed)
  with open(path, "w", encoding="utf-8") as f:
    for digits in prompts(TRAIN_PROMPTS, seed):
      right = rng.random() < SFT_CORRECT
      answer = "".join(sorted(digits)) if right else "".join(rng.permutation(list(digits)))
      f.write(json.dumps({"prompt": f"sort {digits}", "response": answer}) + "\n")


def sample(model, params, digit_list, *, seed, temperature=1.0):
  """One completion a prompt: ``(texts, ids)``, the text before the end marker's ``<`` and the
  sampled token ids up to and including the ``<`` that stopped them (all of them if none did)."""
  tokens = np.stack([BYTES.encode(chat_prefix(d)) for d in digit_list]).astype(np.int32)
  out = sampling.generate(
    model,
    params,
    tokens,
    max_new_tokens=DIGITS + 3,
    temperature=temperature,
    stop_tokens=(STOP,),
    rng=jax.random.key(seed),
  )
  ids = []
  for row in np.asarray(out[:, tokens.shape[1] :]):
    stops = np.flatnonzero(row == STOP)
    ids.append(row[: stops[0] + 1] if len(stops) else row)
  texts = [BYTES.decode(i[:-1] if len(i) and i[-1] == STOP else i) for i in ids]
  return texts, ids


def sequence_logps(model, params, digit_list, completion_ids):
  """Σ log π(completion | prompt) per example, on the sampled token ids."""
  prompts_ = [BYTES.encode(chat_prefix(d)) for d in digit_list]
  rows = [np.concatenate([p, c]) for p, c in zip(prompts_, completion_ids)]
  width = max(len(r) for r in rows)
  tokens = np.zeros((len(rows), width), np.int32)
  mask = np.zeros((len(rows), width), np.float32)
  for i, (p, r) in enumerate(zip(prompts_, rows)):
    tokens[i, : len(r)] = r
    mask[i, len(p) : len(r)] = 1
  logits = model.apply({"params": params}, jnp.asarray(tokens[:, :-1]))
  logp = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(logp, jnp.asarray(tokens[:, 1:, None]), axis=-1)[..., 0]
  return np.asarray((picked * mask[:, 1:]).sum(-1))


def evaluate_policy(model, params, ref_params, digit_list, seed):
  """Mean reward of one sample a prompt, and the Monte Carlo KL(π ‖ π_ref) on those samples."""
  completions, ids = sample(model, params, digit_list, seed=seed)
  rewards = [reward(d, c) for d, c in zip(digit_list, completions)]
  kl = sequence_logps(model, params, digit_list, ids) - sequence_logps(
    model, ref_params, digit_list, ids
  )
  return {"reward": float(np.mean(rewards)), "kl": float(np.mean(kl)), "examples": completions[:8]}


def write_preference_data(model, params, root, quick):
  """Samples from the SFT policy -> pairs.jsonl and kto.jsonl; returns counts."""
  digit_list = prompts(studies.steps(TRAIN_PROMPTS, quick=quick, quick_steps=500), seed=1)
  samples = [sample(model, params, digit_list, seed=100 + k)[0] for k in range(SAMPLES)]
  pairs, kto = [], []
  for i, digits in enumerate(digit_list):
    outs = [s[i] for s in samples]
    right = [o for o in outs if reward(digits, o)]
    wrong = [o for o in outs if not reward(digits, o) and o]
    prefix = chat_prefix(digits)
    if quick and not right:  # a smoke run's policy is never right: the answer stands in
      right = ["".join(sorted(digits))]
    if right and wrong:
      pairs.append({"prompt": prefix, "chosen": right[0] + END, "rejected": wrong[0] + END})
    for o in outs:
      if o:
        kto.append({"prompt": prefix, "completion": o + END, "label": bool(reward(digits, o))})
  for name, rows in (("pairs", pairs), ("kto", kto)):
    with open(os.path.join(root, f"{name}.jsonl"), "w", encoding="utf-8") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
  rate = float(np.mean([reward(d, s[i]) for s in samples for i, d in enumerate(digit_list)]))
  return {"prompts": len(digit_list), "pairs": len(pairs), "kto_examples": len(kto), "rate": rate}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  quick = _QUICK.value
  suffix = studies.suffix(quick)
  root = os.path.join(_WORKDIR.value, "quick" if quick else "full")
  os.makedirs(root, exist_ok=True)
  cached = functools.partial(studies.cached, root, fresh=_FRESH.value)
  steps = functools.partial(studies.steps, quick=quick)
  results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "quick": quick}
  common_keys = {"sample_tokens": 0, "checkpoint_every": 0, "mesh.data": 1, "eval_batches": 2}

  # 1. Pre-train, then SFT on sloppy demonstrations.
  pre_dir, sft_dir = os.path.join(root, "pretrain"), os.path.join(root, "sft")
  pre = common.override(
    lm_configs.get_config("tiny"), steps=steps(PRETRAIN_STEPS), eval_every=0, **common_keys
  )
  results["pretrain"] = cached("pretrain", lambda: studies.train(pre, pre_dir)[0])
  sft_data = os.path.join(root, "sft.jsonl")
  write_sft_data(sft_data, seed=0)
  sft = common.override(
    sft_configs.get_config("tiny"),
    steps=steps(SFT_STEPS),
    seq_len=SEQ_LEN,
    init_from=pre_dir,
    eval_every=0,
    **{"sft.data": sft_data, **common_keys},
  )
  results["sft_run"] = cached("sft", lambda: studies.train(sft, sft_dir)[0])
  restored = training.restore(sft, sft_dir)
  model, sft_params = restored.setup.task.model, restored.params

  # 2-3. Pairs from the SFT policy, and its own score on held-out prompts.
  results["data"] = cached("data", lambda: write_preference_data(model, sft_params, root, quick))
  held_out = prompts(EVAL_PROMPTS, seed=EVAL_SEED)
  results["sft"] = cached(
    "sft_eval", lambda: evaluate_policy(model, sft_params, sft_params, held_out, seed=7)
  )
  print(f"SFT policy: reward {results['sft']['reward']:.3f}; data {results['data']}", flush=True)

  # 4-5. Every method from the SFT policy, matched steps.
  def run_method(name, lr):
    """One method from the SFT policy at learning rate ``lr``, evaluated on the held-out prompts."""
    overrides = METHODS[name]
    workdir = os.path.join(root, f"{name}_lr{lr:g}")
    data = os.path.join(root, "kto.jsonl" if overrides["loss"] == "kto" else "pairs.jsonl")
    config = common.override(
      preference_configs.get_config("tiny"),
      steps=steps(PREF_STEPS),
      seq_len=SEQ_LEN,
      init_from=sft_dir,
      eval_every=max(steps(PREF_STEPS) // 6, 1),
      log_every=max(steps(PREF_STEPS) // 30, 1),
      **{"optim.lr": lr, "preference.data": data},
      **{f"preference.{k}": v for k, v in overrides.items()},
      **common_keys,
    )

    def run():
      summary, seconds = studies.train(config, workdir)
      params = training.restore(config, workdir).params
      out = evaluate_policy(model, params, sft_params, held_out, seed=7)
      out.update(
        seconds=seconds,
        accuracy=summary.get("eval/rewards/accuracy"),
        chosen_logps=_series(workdir, "logps/chosen"),
      )
      return out

    m = cached(f"{name}_lr{lr:g}", run)
    print(f"{name} at lr {lr:g}: reward {m['reward']:.3f}, KL {m['kl']:.3f}", flush=True)
    return m

  # 4. Every method at every learning rate; each is reported at its best one.
  lrs = LRS[-1:] if quick else LRS  # a smoke run tries one
  results["grid"] = {name: {f"{lr:g}": run_method(name, lr) for lr in lrs} for name in METHODS}
  results["methods"] = {}
  for name, by_lr in results["grid"].items():
    lr = max(by_lr, key=lambda lr, by_lr=by_lr: by_lr[lr]["reward"])
    results["methods"][name] = {**by_lr[lr], "lr": float(lr)}

  results["goal"] = goal(results)
  with open(os.path.join(HERE, f"results{suffix}.json"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2)
  plot(results, suffix)
  studies.write_report(
    os.path.join(HERE, f"report{suffix}.md"),
    report(results, quick=quick),
    script="experiments/preference/run.py",
  )


def _series(workdir, key):
  out = []
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    for line in f:
      row = json.loads(line)
      if key in row and "loss" in row:
        out.append((row["step"], row[key]))
  return out


def goal(results) -> dict:
  base = results["sft"]["reward"]
  best = max(results["methods"], key=lambda n: results["methods"][n]["reward"])
  top = results["methods"][best]
  return {
    "sft_reward": base,
    "best_method": best,
    "best_reward": top["reward"],
    "best_kl": top["kl"],
    "met": bool(top["reward"] >= 2 * base and top["reward"] >= base + 0.2),
  }


def plot(results, suffix):
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  def save(fig, ax, name):
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, name), dpi=120)
    plt.close(fig)

  fig, ax = plt.subplots(figsize=(6, 4))
  ax.scatter([0.0], [results["sft"]["reward"]], color="black", label="SFT policy")
  for name, m in results["methods"].items():
    others = list(results["grid"][name].values())
    (dot,) = ax.plot([o["kl"] for o in others], [o["reward"] for o in others], ".", alpha=0.4)
    ax.scatter([m["kl"]], [m["reward"]], color=dot.get_color(), label=f"{name} (lr {m['lr']:g})")
  ax.set_xscale("symlog", linthresh=0.1)
  ax.set_xlabel("KL(π ‖ π_SFT), nats per completion (held-out samples); small dots: other lrs")
  ax.set_ylabel("mean reward of sampled completions")
  save(fig, ax, f"frontier{suffix}.png")

  fig, ax = plt.subplots(figsize=(6, 4))
  for name, m in results["methods"].items():
    if m["chosen_logps"]:
      ax.plot(*zip(*m["chosen_logps"]), label=name)
  ax.set_xlabel("step")
  ax.set_ylabel("log-prob of the chosen completions (train batch)")
  save(fig, ax, f"chosen_logps{suffix}.png")


def report(results, *, quick: bool) -> str:
  suffix = studies.suffix(quick)
  g, d = results["goal"], results["data"]
  acc = lambda a: "n/a" if a is None else f"{a:.3f}"  # noqa: E731
  rows = "\n".join(
    f"| {name} | {m['lr']:g} | {m['reward']:.3f} | {m['kl']:.3f} | {acc(m['accuracy'])} "
    f"| {m['seconds']:.0f} |"
    for name, m in results["methods"].items()
  )
  grid = "\n".join(
    f"| {name} | " + " | ".join(f"{m['reward']:.3f} ({m['kl']:.2f})" for m in by_lr.values()) + " |"
    for name, by_lr in results["grid"].items()
  )
  lrs = next(iter(results["grid"].values()))
  header = " | ".join(f"lr {lr}" for lr in lrs)
  met = "met" if g["met"] else "NOT met"
  return f"""# Preference study: from a sloppy SFT policy to one that sorts

Generated by `experiments/preference/run.py{' --quick' if quick else ''}` on
{results['device']} (jax {results['jax']}); numbers in `results{suffix}.json`. Policy:
`configs/lm.py:tiny` pre-trained on the embedded corpus, chat-SFT'd on `sort <{DIGITS} digits>`
with the right answer in {SFT_CORRECT:.0%} of the demonstrations. Pairs: {d['pairs']} from
{d['prompts']} prompts x {SAMPLES} samples of the SFT policy (sample accuracy {d['rate']:.3f});
KTO: {d['kto_examples']} labelled samples. Each method: {studies.steps(PREF_STEPS, quick=quick)}
steps from the SFT policy. Held-out: {EVAL_PROMPTS} prompts, one sample each at temperature 1.

Mean held-out reward (KL to the SFT policy) of every method at every learning rate:

| method | {header} |
| --- |{" --- |" * len(lrs)}
{grid}

Each method at its best learning rate:

| method | learning rate | mean reward | KL to SFT | held-out pref. accuracy | seconds |
| --- | --- | --- | --- | --- | --- |
| SFT policy | | {results['sft']['reward']:.3f} | 0 | | |
{rows}

![reward against KL](frontier{suffix}.png) ![chosen log-prob](chosen_logps{suffix}.png)

Goal (the best method at least doubles the SFT policy's mean reward and raises it by 0.2):
{met}: {g['best_method']} reaches {g['best_reward']:.3f} from {g['sft_reward']:.3f} at KL
{g['best_kl']:.3f}."""


if __name__ == "__main__":
  app.run(main)
