"""Knowledge distillation of a trained teacher run into a smaller student (``task="distill"``).

    python experiments/main.py --config=configs/lm.py:small --workdir=/tmp/teacher
    python experiments/main.py --config=configs/distill.py:tiny --workdir=/tmp/student \\
        --config.distill.teacher_workdir=/tmp/teacher

The student is ``config.model`` (``configs/lm.py:tiny``'s by default), trained on the same corpus
as an LM run, on ``alpha * T² * D(teacher/T, student/T) + (1 - alpha) * CE``
(``training/tasks/distill.py``). ``--config.distill.divergence=reverse_kl|jsd``,
``--config.distill.top_k=8`` (the teacher's top 8 tokens only). Defaults: ``alpha=0.5``,
``temperature=1.0`` (MaxText's; tunix uses 2.0), forward KL. Variants: ``tiny``, ``test``.

``configs/distill.py:tiny,lora`` trains LoRA adapters over a frozen student base
(``config.init_from``).
"""

import ml_collections

from flaxseed.configs import common
from flaxseed.configs import lm
from flaxseed.configs import lora


def get_config(arg: str = "tiny"):
  arg, options = common.variant(arg, ("tiny", "test"), "configs/distill.py", ("lora",))
  c = lm.get_config(arg)
  c.task = "distill"
  c.distill = ml_collections.ConfigDict(
    dict(
      teacher_workdir="",
      alpha=0.5,
      temperature=1.0,
      divergence="forward_kl",
      beta=0.5,
      top_k=0,
    )
  )
  if "lora" in options:  # adapters over the frozen init_from (training/tasks/lora.py)
    c.lora = lora.section()
  return c
