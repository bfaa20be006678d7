"""Exports a LoRA run for Hugging Face: the base in the Llama layout, the adapter in peft's.

    python experiments/lora/export.py --workdir=/tmp/lora --out=/tmp/lora_hf

writes ``OUT/base`` (``hf.to_pretrained``: ``config.json``, ``model.safetensors``) and
``OUT/adapter`` (``hf.to_peft``: ``adapter_config.json``, ``adapter_model.safetensors``), which
load as

    base = transformers.AutoModelForCausalLM.from_pretrained("OUT/base")
    model = peft.PeftModel.from_pretrained(base, "OUT/adapter")

The base is the one the adapters were trained against: the base run's weights, or PiSSA's
residual. A QLoRA run exports its float base (peft quantizes at load time, as bitsandbytes does).
"""

import os
import sys

from absl import app
from absl import flags

from flaxseed.models import hf
from flaxseed.training import checkpoint
from flaxseed.training import trainer

_WORKDIR = flags.DEFINE_string("workdir", None, "A LoRA run (task='lora').")
_OUT = flags.DEFINE_string("out", None, "Output folder (base/ and adapter/ inside).")
flags.mark_flags_as_required(["workdir", "out"])


def export(workdir: str, out: str) -> None:
  config = checkpoint.run_config(workdir)
  if "lora" not in config:
    raise ValueError(f"{workdir}/config.json has no lora section; export reads LoRA runs")
  restored = trainer.restore(config, workdir)
  task = restored.setup.task
  base = restored.frozen["base"]
  if task.quantize_fmt:
    if task.cfg.init == "pissa":
      raise ValueError("a quantized PiSSA residual has no float form to export")
    if hf.is_folder(task.base_from):
      base = hf.load_params(task.model, task.base_from)
    else:
      base = trainer.restore(checkpoint.run_config(task.base_from), task.base_from).params
  hf.to_pretrained(task.model, base, os.path.join(out, "base"))
  hf.to_peft(
    restored.params,
    task.cfg,
    os.path.join(out, "adapter"),
    base_model_name_or_path=os.path.abspath(os.path.join(out, "base")),
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    export(_WORKDIR.value, _OUT.value)
  except ValueError as e:
    sys.exit(f"error: {e}")
  print(f"wrote {_OUT.value}/base and {_OUT.value}/adapter")


if __name__ == "__main__":
  app.run(main)
