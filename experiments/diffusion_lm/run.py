"""Diffusion LM study: AR vs masked diffusion on one backbone, the reversal probe, sampling cost.

    python experiments/diffusion_lm/run.py [--quick] [--workdir=/tmp/diffusion_study]

1. **bpb.** ``configs/lm.py:tiny`` and ``configs/diffusion_lm.py:tiny`` (the same network, causal
   or not; the diffusion vocabulary has 8 more ids for [MASK], [EOS] and padding) trained with the
   same optimizer, batch, length and steps on the default corpus: the AR model's eval bits per
   byte against the diffusion model's stratified-ELBO bits per byte (an upper bound), and
   samples of both.
2. **Reversal probe.** Random name-like facts ``Bako->Kimu``. Half of them (``both``) appear in
   training in both orders (``Bako->Kimu`` and ``Kimu<-Bako``), so the models know the reverse
   format; the other half (``forward_only``) only as ``A->B``. Tested on ``forward_only``:
   forward = given A, produce B; reverse = given B, produce A. The AR model can only continue a
   prefix: forward prompt ``A->``, reverse prompt ``B<-``. The diffusion LM fills masks anywhere:
   forward ``A->____``, reverse ``____->B`` (the trained format with A masked); it is also asked
   the AR's reverse query ``B<-____``. Every query follows two known facts as context; greedy.
3. **Sampling against steps.** The bpb-study diffusion model continues 64 tokens of 8 validation
   prompts with steps = 64, 32, 16, 8, low-confidence or random remasking, one block or blocks
   of 16. ``score``: bits per byte of the continuation under the AR model of part 1 (a judge, like
   MDLM's generative perplexity; lower is better, but repetitive text also scores low, so the
   unigram ``entropy`` of the sampled bytes is reported next to it); ``seconds``: median wall
   time of one call (batch 8).

Writes ``results.json`` and the generated section of ``report.md`` (the reading below it is
written by hand and kept) next to this file; ``--quick`` (a smoke run of a few steps) writes
``*_quick.*`` instead. Each part's result is kept in the workdir, so an interrupted study resumes
(``--fresh`` retrains).
"""

import json
import math
import os
import time

from absl import app
from absl import flags
import jax
import numpy as np

from flaxseed import training
from flaxseed.configs import common
from flaxseed.configs import diffusion_lm as diffusion_configs
from flaxseed.configs import lm as lm_configs
from flaxseed.experiments import studies
from flaxseed.models import diffusion_lm
from flaxseed.models import sampling

_QUICK = flags.DEFINE_bool("quick", False, "A smoke run: a few steps per model.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/diffusion_study", "Checkpoints and logs.")
_FRESH = flags.DEFINE_bool("fresh", False, "Retrain models whose results are in the workdir.")

HERE = os.path.dirname(os.path.abspath(__file__))
NUM_FACTS, FACT_EPOCHS, FACT_STEPS = 60, 120, 12_000
SAMPLE_STEPS, SAMPLE_GEN, SAMPLE_PROMPT, SAMPLE_ROWS = (64, 32, 16, 8), 64, 32, 8


def _steps(full: int) -> int:
  return studies.steps(full, quick=_QUICK.value, quick_steps=5)


def cached(name, fn):
  return studies.cached(_WORKDIR.value, name, fn, fresh=_FRESH.value)


def train(name, config):
  """Trains ``config`` in ``--workdir``/``name``, resuming a run with checkpoints unless
  ``--fresh``; returns (workdir, final metrics, seconds)."""
  workdir = os.path.join(_WORKDIR.value, name)
  summary, seconds = studies.train(config, workdir, resume=not _FRESH.value)
  return workdir, summary, seconds


def corpus_configs():
  """The AR and diffusion runs of part 1: configs/*.py:tiny with the same budget."""
  out = {}
  for name, module in (("ar", lm_configs), ("diffusion", diffusion_configs)):
    c = module.get_config("tiny")
    common.override(
      c,
      steps=_steps(2000),
      eval_every=0,
      checkpoint_every=0,
      log_every=100,
      eval_batches=16,
      sample_tokens=0,
    )
    out[name] = c
  return out


# ---------------------------------------------------------------------------------------------
# 1. bpb and samples


def bpb_study():
  configs = corpus_configs()
  result = {}
  for name, config in configs.items():

    def run(name=name, config=config):
      _, summary, seconds = train(f"corpus_{name}", config)
      restored = training.restore(config, os.path.join(_WORKDIR.value, f"corpus_{name}"))
      task = restored.setup.task
      sample = task.sample(
        restored.params, "def ", max_new_tokens=128, temperature=0.8, rng=jax.random.key(0)
      )
      return {
        "bpb": summary["eval/bpb"],
        "seconds": seconds,
        "sample": sample,
        "params": int(sum(x.size for x in jax.tree.leaves(restored.params))),
      }

    result[name] = cached(f"corpus_{name}", run)
  return result


# ---------------------------------------------------------------------------------------------
# 2. Reversal probe


def make_facts(rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
  """``n`` (A, B) pairs of distinct capitalized consonant-vowel names of 4 letters."""
  consonants, vowels = "bdfghklmnprstvz", "aeiou"
  names = set()
  while len(names) < 2 * n:
    letters = [
      consonants[rng.integers(15)],
      vowels[rng.integers(5)],
      consonants[rng.integers(15)],
      vowels[rng.integers(5)],
    ]
    names.add("".join(letters).capitalize())
  names = sorted(names)
  rng.shuffle(names)
  return list(zip(names[:n], names[n:]))


def write_fact_corpus(path: str, facts, both: int, rng: np.random.Generator):
  """``FACT_EPOCHS`` shuffled passes over the lines: ``A->B`` for every fact, ``B<-A`` too for
  the first ``both`` facts."""
  lines = [f"{a}->{b}\n" for a, b in facts] + [f"{b}<-{a}\n" for a, b in facts[:both]]
  with open(path, "w", encoding="utf-8") as f:
    for _ in range(FACT_EPOCHS):
      f.write("".join(lines[i] for i in rng.permutation(len(lines))))


def reversal_configs(corpus_path: str):
  out = {}
  for name, module in (("ar", lm_configs), ("diffusion", diffusion_configs)):
    c = module.get_config("tiny")
    common.override(
      c,
      steps=_steps(FACT_STEPS),
      batch_size=32,
      seq_len=32,
      eval_every=0,
      checkpoint_every=0,
      log_every=200,
      eval_batches=4,
      sample_tokens=0,
      **{"data.corpus": corpus_path},
    )
    out[name] = c
  return out


def reversal_study():
  rng = np.random.default_rng(0)
  facts = make_facts(rng, NUM_FACTS)
  both, forward_only = facts[: NUM_FACTS // 2], facts[NUM_FACTS // 2 :]
  os.makedirs(_WORKDIR.value, exist_ok=True)
  corpus = os.path.join(_WORKDIR.value, "facts.txt")
  write_fact_corpus(corpus, facts, len(both), np.random.default_rng(1))
  contexts = [
    f"{a1}->{b1}\n{a2}->{b2}\n"
    for (a1, b1), (a2, b2) in zip(rng.permutation(both), rng.permutation(both))
  ]
  configs = reversal_configs(corpus)

  def ar():
    workdir, _, seconds = train("reversal_ar", configs["ar"])
    restored = training.restore(configs["ar"], workdir)
    model, params = restored.setup.task.model, restored.params

    def complete(prompts):
      tokens = np.array([list(p.encode()) for p in prompts], np.int32)
      out = sampling.generate(model, params, tokens, max_new_tokens=4, temperature=0.0)
      return [bytes(np.asarray(r[-4:]).tolist()).decode(errors="replace") for r in out]

    forward = complete([c + f"{a}->" for c, (a, _) in zip(contexts, forward_only)])
    reverse = complete([c + f"{b}<-" for c, (_, b) in zip(contexts, forward_only)])
    reverse_both = complete([c + f"{b}<-" for c, (_, b) in zip(contexts, both)])
    return {
      "forward": _accuracy(forward, [b for _, b in forward_only]),
      "reverse": _accuracy(reverse, [a for a, _ in forward_only]),
      "reverse_of_both": _accuracy(reverse_both, [a for a, _ in both]),
      "seconds": seconds,
      "examples": _examples(forward_only, forward, reverse),
    }

  def diffusion():
    workdir, _, seconds = train("reversal_diffusion", configs["diffusion"])
    restored = training.restore(configs["diffusion"], workdir)
    model, params = restored.setup.task.model, restored.params

    def fill(templates):
      """Fills the ``_`` of every template (one token per step, the most confident first)."""
      rows = np.array([list(t.encode()) for t in templates], np.int32)
      blanks = rows == ord("_")
      out = diffusion_lm.infill(
        model, params, np.where(blanks, model.config.mask_token_id, rows), steps=4
      )
      return [_text(r[b]) for r, b in zip(np.asarray(out), blanks)]

    blank = "____"
    forward = fill([c + f"{a}->{blank}\n" for c, (a, _) in zip(contexts, forward_only)])
    reverse = fill([c + f"{blank}->{b}\n" for c, (_, b) in zip(contexts, forward_only)])
    reverse_ar_query = fill([c + f"{b}<-{blank}\n" for c, (_, b) in zip(contexts, forward_only)])
    return {
      "forward": _accuracy(forward, [b for _, b in forward_only]),
      "reverse": _accuracy(reverse, [a for a, _ in forward_only]),
      "reverse_ar_query": _accuracy(reverse_ar_query, [a for a, _ in forward_only]),
      "seconds": seconds,
      "examples": _examples(forward_only, forward, reverse),
    }

  name = f"{NUM_FACTS}_facts_{configs['ar'].steps}_steps"
  diffusion_result = cached(f"reversal_diffusion_{name}", diffusion)
  return {
    "ar": cached(f"reversal_ar_{name}", ar),
    "diffusion": diffusion_result,
    "setup": {
      "facts": NUM_FACTS,
      "forward_only_tested": len(forward_only),
      "chance": 1 / (15 * 5) ** 2,
      "steps": configs["ar"].steps,
    },
  }


def _accuracy(got, want) -> float:
  return float(np.mean([g == w for g, w in zip(got, want)]))


def _examples(facts, forward, reverse, n=5):
  return [
    {"fact": f"{a}->{b}", "forward": f, "reverse": r}
    for (a, b), f, r in list(zip(facts, forward, reverse))[:n]
  ]


# ---------------------------------------------------------------------------------------------
# 3. Sampling against steps


def sampling_study():
  configs = corpus_configs()
  ar = training.restore(configs["ar"], os.path.join(_WORKDIR.value, "corpus_ar"))
  dlm = training.restore(configs["diffusion"], os.path.join(_WORKDIR.value, "corpus_diffusion"))
  corpus = dlm.setup.task.corpus
  starts = np.linspace(0, len(corpus.validation.tokens) - 200, SAMPLE_ROWS).astype(int)
  prompts = np.stack([corpus.validation.tokens[s : s + SAMPLE_PROMPT] for s in starts])
  prompts = prompts.astype(np.int32)
  truth = np.stack([corpus.validation.tokens[s : s + SAMPLE_PROMPT + SAMPLE_GEN] for s in starts])
  ar_model, ar_params = ar.setup.task.model, ar.params
  judge_fn = jax.jit(lambda p, t: ar_model.apply({"params": p}, t))

  def judge(rows):
    """AR bits per byte of the continuation given the prompt, and unigram entropy (bits). Ids
    that are not bytes (EOS, unused) become byte 0, which the judge finds very unlikely."""
    rows = np.asarray(rows, np.int32)
    rows = np.where(rows < 256, rows, 0)
    logp = jax.nn.log_softmax(judge_fn(ar_params, rows[:, :-1]))
    target = rows[:, 1:]
    nll = -np.take_along_axis(np.asarray(logp), target[..., None], -1)[..., 0]
    bits = float(nll[:, SAMPLE_PROMPT - 1 :].mean() / math.log(2))
    counts = np.bincount(rows[:, SAMPLE_PROMPT:].ravel(), minlength=256).astype(np.float64)
    freq = counts[counts > 0] / counts.sum()
    return bits, float(-(freq * np.log2(freq)).sum())

  rows = []
  for steps in SAMPLE_STEPS:
    for remasking in diffusion_lm.REMASKING:
      for block in (SAMPLE_GEN, 16):

        def call(steps=steps, remasking=remasking, block=block):
          return diffusion_lm.generate(
            dlm.setup.task.model,
            dlm.params,
            prompts,
            gen_length=SAMPLE_GEN,
            steps=steps,
            block_length=block,
            temperature=1.0,
            remasking=remasking,
            rng=jax.random.key(0),
          )

        out = jax.block_until_ready(call())  # compile
        times = []
        for _ in range(3):
          start = time.perf_counter()
          jax.block_until_ready(call())
          times.append(time.perf_counter() - start)
        score, entropy = judge(out)
        rows.append(
          {
            "steps": steps,
            "remasking": remasking,
            "block_length": block,
            "score": score,
            "entropy": entropy,
            "seconds": float(np.median(times)),
            "sample": _text(out[0, SAMPLE_PROMPT:]),
          }
        )
  ar_out = sampling.generate(
    ar_model, ar_params, prompts, max_new_tokens=SAMPLE_GEN, temperature=1.0, rng=jax.random.key(0)
  )
  references = {
    "data": dict(zip(("score", "entropy"), judge(truth))),
    "ar_samples": dict(zip(("score", "entropy"), judge(ar_out))),
  }
  return rows, references


def _text(ids) -> str:
  ids = np.asarray(ids)
  return bytes(ids[ids < 256].tolist()).decode(errors="replace")


# ---------------------------------------------------------------------------------------------
# Report


def report(results, *, quick: bool) -> str:
  """The generated part of ``report.md``: every table of ``results`` (the reading is written by
  hand in ``report.md``, below the generated section)."""
  bpb, rev, samp = results["bpb"], results["reversal"], results["sampling"]
  lines = [
    "# Diffusion LM study",
    "",
    f"Generated by `experiments/diffusion_lm/run.py{' --quick' if quick else ''}`; numbers are "
    f"in `results{studies.suffix(quick)}.json`. {results['setup']}",
    "",
    "## 1. AR vs masked diffusion, same network and budget",
    "",
    "| model | params | eval bits per byte | train seconds |",
    "| --- | --- | --- | --- |",
    f"| AR (causal) | {results['details']['ar']['params']:,} | {bpb['ar']:.3f} | "
    f"{results['details']['ar']['seconds']:.0f} |",
    f"| diffusion (ELBO, an upper bound) | {results['details']['diffusion']['params']:,} | "
    f"{bpb['diffusion_elbo']:.3f} | {results['details']['diffusion']['seconds']:.0f} |",
    "",
    "Samples (`def `, 128 tokens, temperature 0.8; diffusion: blocks of 32, one token per step):",
    "",
    "AR:",
    "```",
    results["details"]["ar"]["sample"],
    "```",
    "",
    "Diffusion:",
    "```",
    results["details"]["diffusion"]["sample"],
    "```",
    "",
    "## 2. Reversal probe",
    "",
    f"{rev['setup']['facts']} facts, accuracy on the {rev['setup']['forward_only_tested']} seen "
    f"only as `A->B` (exact 4-letter name; chance {rev['setup']['chance']:.1e}).",
    "",
    "| model | forward (A -> B) | reverse (B -> A) | other |",
    "| --- | --- | --- | --- |",
    f"| AR (prompt `A->` / `B<-`) | {rev['ar']['forward']:.2f} | {rev['ar']['reverse']:.2f} | "
    f"reverse of facts trained both ways: {rev['ar']['reverse_of_both']:.2f} |",
    f"| diffusion (fill `A->____` / `____->B`) | {rev['diffusion']['forward']:.2f} | "
    f"{rev['diffusion']['reverse']:.2f} | AR's query `B<-____`: "
    f"{rev['diffusion']['reverse_ar_query']:.2f} |",
    "",
    "## 3. Sampling quality and cost against steps",
    "",
    f"64 tokens after 32-token validation prompts, batch {SAMPLE_ROWS}, temperature 1. Score: "
    "AR-judged bits per byte (lower is better; the data itself scores "
    f"{results['sampling_references']['data']['score']:.2f} with unigram entropy "
    f"{results['sampling_references']['data']['entropy']:.2f} bits, the AR model's own samples "
    f"{results['sampling_references']['ar_samples']['score']:.2f} / "
    f"{results['sampling_references']['ar_samples']['entropy']:.2f}).",
    "",
    "| steps | remasking | block | score (bits/byte) | entropy (bits) | seconds |",
    "| --- | --- | --- | --- | --- | --- |",
  ]
  for r in samp:
    lines.append(
      f"| {r['steps']} | {r['remasking']} | {r['block_length']} | {r['score']:.3f} | "
      f"{r['entropy']:.2f} | {r['seconds']:.3f} |"
    )
  return "\n".join(lines)


def goal(results) -> dict:
  """The study's goal: diffusion answers the reverse questions (>= 0.8) where AR is near chance
  (<= 0.1), and both answer the forward ones (>= 0.8)."""
  ar, diffusion = results["reversal"]["ar"], results["reversal"]["diffusion"]
  return {
    "diffusion_reverse": diffusion["reverse"],
    "ar_reverse": ar["reverse"],
    "diffusion_forward": diffusion["forward"],
    "ar_forward": ar["forward"],
    "met": bool(
      diffusion["reverse"] >= 0.8
      and ar["reverse"] <= 0.1
      and min(ar["forward"], diffusion["forward"]) >= 0.8
    ),
  }


def main(argv):
  del argv
  details = bpb_study()
  reversal = reversal_study()
  sampling_rows, references = cached("sampling", sampling_study)
  results = {
    "bpb": {"ar": details["ar"]["bpb"], "diffusion_elbo": details["diffusion"]["bpb"]},
    "reversal": {
      k: {m: v for m, v in reversal[k].items() if m != "examples"} for k in ("ar", "diffusion")
    },
    "sampling": [{k: v for k, v in r.items() if k != "sample"} for r in sampling_rows],
    "sampling_references": references,
    "details": details,
    "reversal_setup": reversal["setup"],
    "reversal_examples": {k: reversal[k]["examples"] for k in ("ar", "diffusion")},
    "sampling_samples": {
      f"{r['steps']}/{r['remasking']}/{r['block_length']}": r["sample"] for r in sampling_rows
    },
    "setup": (
      f"jax {jax.__version__} on {jax.devices()[0].device_kind} "
      f"({os.cpu_count()} cores){', --quick smoke run' if _QUICK.value else ''}."
    ),
  }
  results["reversal"]["setup"] = reversal["setup"]
  results["goal"] = goal(results)
  suffix = studies.suffix(_QUICK.value)
  with open(os.path.join(HERE, f"results{suffix}.json"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=1)
  studies.write_report(
    os.path.join(HERE, f"report{suffix}.md"),
    report(results, quick=_QUICK.value),
    script="experiments/diffusion_lm/run.py",
  )
  print(json.dumps({k: results[k] for k in ("bpb", "reversal")}, indent=1))


if __name__ == "__main__":
  app.run(main)
