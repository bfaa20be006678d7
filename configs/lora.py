"""LoRA fine-tuning of a trained model (``models/lora.py``, task ``lora``).

Pre-train on the prose half of the embedded corpus, then adapt to the code half:

    python experiments/main.py --config=configs/lm.py:tiny --workdir=/tmp/prose \\
        --config.data.corpus=default:prose
    python experiments/main.py --config=configs/lora.py:tiny --workdir=/tmp/lora \\
        --config.lora.base_workdir=/tmp/prose

Variants (``--config=configs/lora.py:<variant>``):

  tiny   rank 8 on every attention and MLP kernel of ``configs/lm.py:tiny``, 600 steps.
  test   a few seconds, for the test suite (a scanned two-layer model).

Any LM-family post-training config takes the same section with its ``lora`` option
(``--config=configs/preference.py:tiny,lora``): the task's loss on adapters over the frozen
``config.init_from`` (``training/tasks/lora.py``).

``--config.lora.variant=dora``, ``--config.lora.init=pissa``, ``--config.lora.quantize=nf4``
(QLoRA), ``--config.lora.targets='.*attn/(q|v)/kernel'``. Without ``config.lora.base_workdir`` the
adapters sit on a randomly initialized ``config.model`` (the run says so). Adam without weight
decay, as peft's usual recipes; the learning rate is higher than pre-training's since only the
adapters move.
"""

import ml_collections
from ml_collections import config_dict

from flaxseed.configs import common
from flaxseed.configs import lm


def section() -> ml_collections.ConfigDict:
  """The ``config.lora`` section: rank 8 on every attention and MLP kernel."""
  return ml_collections.ConfigDict(
    dict(
      base_workdir="",
      rank=8,
      alpha=16.0,
      targets=r".*(attn|mlp)/\w+/kernel",
      variant="lora",
      init="default",
      quantize="",
      quantize_group_size=config_dict.placeholder(int),
    )
  )


def get_config(arg: str = "tiny"):
  arg, _ = common.variant(arg, ("tiny", "test"), "configs/lora.py")
  c = lm.get_config(arg)  # the base model's section (used when base_workdir is empty)
  c.task = "lora"
  c.data.corpus = "default:code"
  c.optim.update(lr=3e-3, weight_decay=0.0, warmup_steps=50 if arg == "tiny" else 2)
  c.lora = section()
  return c
