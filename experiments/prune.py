"""Prunes a trained run one shot and writes the result as a Hugging Face folder.

    python experiments/prune.py --workdir=/tmp/lm --output=/tmp/lm_wanda50 --method=wanda \\
        --sparsity=0.5
    python experiments/prune.py --workdir=/tmp/lm --output=/tmp/lm_24 --method=sparsegpt --nm=2:4
    # a sparse fine-tune that keeps the pattern:
    python experiments/main.py --config=configs/lm.py:tiny --workdir=/tmp/lm_24_tuned \\
        --config.init_from=/tmp/lm_24 --config.keep_zeros='.*(attn|mlp).*kernel'

``--workdir``: a flaxseed run of a language-model task with unscanned layers (the CPU presets);
calibration rows come from its corpus' training split, the evaluation from its validation split.
Writes ``--output``: ``config.json`` and ``model.safetensors`` (``hf.to_pretrained``; any
``init_from`` reads it), ``masks.npz`` (each pruned kernel's keep-mask, by parameter path) and
``prune.json`` (the options and the held-out bits per byte and next-byte accuracy before and
after). See ``models/prune.py`` for the methods.
"""

import json
import math
import os
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from flaxseed.models import hf
from flaxseed.models import prune
from flaxseed.training import checkpoint
from flaxseed.training import tasks
from flaxseed.training import trainer

_WORKDIR = flags.DEFINE_string("workdir", None, "A flaxseed run of a language-model task.")
_OUTPUT = flags.DEFINE_string("output", None, "The Hugging Face folder to write.")
_METHOD = flags.DEFINE_enum("method", "wanda", prune.METHODS, "The pruning method.")
_SPARSITY = flags.DEFINE_float("sparsity", 0.0, "Fraction of each output unit's inputs dropped.")
_NM = flags.DEFINE_string("nm", None, "An N:M pattern instead, e.g. 2:4 (keep 2 of every 4).")
_TARGETS = flags.DEFINE_string("targets", r".*(attn|mlp).*kernel", "Parameter paths to prune.")
_ROWS = flags.DEFINE_integer("calibration_rows", 128, "Calibration rows (Wanda's default).")
_EVAL_ROWS = flags.DEFINE_integer("eval_rows", 64, "Validation rows to measure before and after.")


def _rows(tokens, count, length, seed):
  if len(tokens) <= length + 1:
    raise ValueError(f"the split has {len(tokens)} tokens, too few for rows of {length + 1}")
  starts = np.random.default_rng(seed).integers(0, len(tokens) - length - 1, count)
  return np.stack([tokens[s : s + length + 1] for s in starts]).astype(np.int32)


def measure(model, params, rows, bytes_per_token):
  logits = model.apply({"params": params}, jnp.asarray(rows[:, :-1]))
  logp = jax.nn.log_softmax(logits)
  nll = -jnp.take_along_axis(logp, jnp.asarray(rows[:, 1:, None]), -1).mean()
  accuracy = (jnp.argmax(logits, -1) == rows[:, 1:]).mean()
  return {"bpb": float(nll) / math.log(2) / bytes_per_token, "accuracy": float(accuracy)}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value or not _OUTPUT.value:
    raise app.UsageError("give --workdir and --output")
  try:
    restored = trainer.restore(checkpoint.run_config(_WORKDIR.value), _WORKDIR.value)
    task = restored.setup.task
    inner = getattr(task, "inner", task)  # a LoRA run: its LM task's corpus
    if not isinstance(inner, tasks.LMTask):
      raise ValueError(f"{_WORKDIR.value}: task {type(inner).__name__} is not a language model")
    model, params = task.model, task.model_params(restored.params, restored.frozen)
    corpus, length = inner.corpus, inner.seq_len
    calibration = _rows(corpus.train.tokens, _ROWS.value, length, seed=0)[:, :-1]
    held_out = _rows(corpus.validation.tokens, _EVAL_ROWS.value, length, seed=1)
    pruned, masks = prune.prune(
      model,
      params,
      calibration,
      method=_METHOD.value,
      sparsity=_SPARSITY.value,
      nm=_NM.value,
      targets=_TARGETS.value,
    )
  except ValueError as e:
    sys.exit(f"error: {e}")
  before = measure(model, params, held_out, corpus.bytes_per_token)
  after = measure(model, pruned, held_out, corpus.bytes_per_token)
  kept = sum(int(m.sum()) for m in masks.values()) / sum(m.size for m in masks.values())
  hf.to_pretrained(model, pruned, _OUTPUT.value)
  np.savez(os.path.join(_OUTPUT.value, "masks.npz"), **masks)
  summary = {
    "workdir": _WORKDIR.value,
    "method": _METHOD.value,
    "sparsity": _SPARSITY.value,
    "nm": _NM.value,
    "targets": _TARGETS.value,
    "calibration_rows": _ROWS.value,
    "pruned_fraction": 1 - kept,
    "before": before,
    "after": after,
  }
  with open(os.path.join(_OUTPUT.value, "prune.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2)
  print(
    f"pruned {1 - kept:.1%} of {len(masks)} kernels ({_METHOD.value}); held-out bpb "
    f"{before['bpb']:.4f} -> {after['bpb']:.4f}, next-token accuracy {before['accuracy']:.4f} -> "
    f"{after['accuracy']:.4f}; wrote {_OUTPUT.value}"
  )


if __name__ == "__main__":
  app.run(main)
