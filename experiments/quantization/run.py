"""Study: what each weight format costs in quality, on a transformer trained on the default corpus.

    python experiments/quantization/run.py [--quick] [--workdir=/tmp/flaxseed_quant]

Trains ``configs/lm.py:tiny`` in float32, then evaluates the same checkpoint with its attention
and MLP weights quantized after training (int8 per channel, int4 with groups of 128 and 64, NF4
with groups of 64), and trains a BitNet b1.58 model (``model.quant="ternary"``) with the same
budget, exported to packed ternary weights. For each: eval bits per byte on the held-out split
and the bytes of all weights as stored (embeddings stay float32 in every variant). Writes
``results.json`` next to this file (``--quick``: ``results_quick.json``).
"""

import json
import os
import time

from absl import app
from absl import flags
from absl import logging
import jax

from flaxseed import training
from flaxseed.configs import lm
from flaxseed.models import quantize

_QUICK = flags.DEFINE_bool("quick", False, "A short run (CI-sized), written to results_quick.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/flaxseed_quantization", "Checkpoints go here.")

PTQ = {
  "int8": ("int8", None),
  "int4_g128": ("int4", 128),
  "int4_g64": ("int4", 64),
  "nf4": ("nf4", 64),
}


def _config(quant=None):
  config = lm.get_config("tiny")
  config.mesh.data = 1  # one device: the numbers do not depend on the host's device count
  config.sample_tokens = 0
  config.eval_batches = 16
  if _QUICK.value:
    config.steps, config.eval_every, config.checkpoint_every = 150, 0, 0
    config.optim.warmup_steps = 30
  if quant:
    config.model.quant = quant
  return config


def _train_and_restore(config, workdir):
  start = time.perf_counter()
  training.train(config, workdir)
  print(f"trained {workdir} in {time.perf_counter() - start:.0f} s")
  return training.restore(config, workdir)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  results = {}
  base = _train_and_restore(_config(), os.path.join(_WORKDIR.value, "fp32"))
  results["fp32"] = {
    "bpb": base.evaluate()["eval/bpb"],
    "weight_bytes": quantize.weight_bytes(base.params),
  }
  for name, (fmt, group) in PTQ.items():
    qparams = quantize.quantize_params(base.params, fmt=fmt, group_size=group)
    results[name] = {
      "bpb": base.evaluate(qparams)["eval/bpb"],
      "weight_bytes": quantize.weight_bytes(qparams),
    }
  bitnet = _train_and_restore(_config("ternary"), os.path.join(_WORKDIR.value, "ternary"))
  exported = quantize.quantize_params(bitnet.params, fmt="ternary")
  results["ternary_qat"] = {
    "bpb": bitnet.evaluate(exported)["eval/bpb"],
    "bpb_before_export": bitnet.evaluate()["eval/bpb"],
    "weight_bytes": quantize.weight_bytes(exported),
  }
  fp32 = results["fp32"]["bpb"]
  for name, r in results.items():
    r["bpb_vs_fp32"] = r["bpb"] / fp32
    print(
      f"{name:12s} bpb {r['bpb']:.4f} ({100 * (r['bpb_vs_fp32'] - 1):+.2f}% vs fp32)  "
      f"weights {r['weight_bytes'] / 1024:.0f} KiB"
    )
  print(
    f"configs/lm.py:tiny, {_config().steps} steps, {jax.devices()[0].device_kind}, "
    f"jax {jax.__version__}"
  )
  out = os.path.join(
    os.path.dirname(os.path.abspath(__file__)),
    "results_quick.json" if _QUICK.value else "results.json",
  )
  with open(out, "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2)
  print(f"wrote {out}")


if __name__ == "__main__":
  app.run(main)
