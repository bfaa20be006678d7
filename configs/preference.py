"""Preference optimization of a trained LM on pairs (``training/tasks/preference.py``).

Pre-train (or SFT) a policy, then optimize it on JSONL pairs ``{prompt, chosen, rejected}``:

    python experiments/main.py --config=configs/lm.py:tiny --workdir=/tmp/lm
    python experiments/main.py --config=configs/preference.py:tiny --workdir=/tmp/dpo \\
        --config.init_from=/tmp/lm --config.preference.data='/tmp/pairs/*.jsonl'

``--config.preference.loss=ipo|simpo|orpo|hinge|kto`` picks another loss of the registry
(``training/losses/preference.py``; KTO reads unpaired ``{prompt, completion, label}`` lines);
``beta`` is each loss's β (SimPO's reference value is 2.0, set it with the loss). The model
section must be the ``init_from`` run's (checked before compiling). Variants: ``tiny``
(``configs/lm.py:tiny``'s model, 300 steps) and ``test``.

Defaults follow TRL's DPO: β = 0.1, sigmoid loss, no label smoothing; Adam without weight decay at
a learning rate far below pre-training's (preference optimization forgets quickly at high ones).

``--config.preference.precompute_reference=True`` computes the reference's log-probs once
before training instead of holding it. ``configs/preference.py:tiny,lora`` trains LoRA adapters
over the frozen ``init_from`` (the reference is that base: one copy of the weights).
"""

import ml_collections
from ml_collections import config_dict

from flaxseed.configs import common
from flaxseed.configs import lm
from flaxseed.configs import lora


def get_config(arg: str = "tiny"):
  arg, options = common.variant(arg, ("tiny", "test"), "configs/preference.py", ("lora",))
  c = lm.get_config(arg)
  c.task = "preference"
  if arg == "tiny":
    c.steps, c.batch_size, c.eval_every, c.checkpoint_every = 300, 16, 100, 100
  c.optim.update(lr=1e-4 if arg == "tiny" else 1e-3, weight_decay=0.0, warmup_steps=2)
  c.preference = ml_collections.ConfigDict(
    dict(
      data="",
      loss="sigmoid",
      beta=0.1,
      label_smoothing=0.0,
      gamma_beta_ratio=0.25,
      orpo_lambda=0.1,
      desirable_weight=1.0,  # KTO
      undesirable_weight=1.0,  # KTO
      precompute_reference=False,  # the reference's log-probs once, before training
      eos_id=config_dict.placeholder(int),
      pad_id=0,
    )
  )
  if "lora" in options:  # adapters over the frozen init_from (training/tasks/lora.py)
    c.lora = lora.section()
  return c
