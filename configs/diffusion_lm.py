"""Masked-diffusion LM (LLaDA / MDLM) on the embedded corpus: the transformer, bidirectional.

Variants (``--config=configs/diffusion_lm.py:<variant>``):

  tiny   0.9M params, the same network and budget as configs/lm.py:tiny (for AR vs diffusion):
           python experiments/main.py --config=configs/diffusion_lm.py:tiny --workdir=/tmp/dlm
  small  6M params, CPU in an hour or a GPU in minutes.
  base   85M params, bf16, FSDP over all devices.
  test   a few seconds, for the test suite.

SFT instead of pre-training: ``--config.diffusion.sft_data='/data/sft/*.jsonl'`` (JSON lines with
``prompt`` and ``response``). The loop starts SFT from fresh parameters (it cannot yet load a
pre-trained run's weights as the starting point).
"""

import ml_collections

from flaxseed.configs import common
from flaxseed.configs import lm
from flaxseed.models import diffusion_lm

C = diffusion_lm.DiffusionLMConfig


def get_config(arg: str = "tiny"):
  if arg not in ("tiny", "small", "base", "test"):
    raise ValueError(f"unknown variant {arg!r} of configs/diffusion_lm.py: tiny, small, base, test")
  c = lm.get_config(arg)  # the AR run of the same size: same budget, optimizer and data
  c.task, c.model_family = "diffusion", "diffusion_lm"
  fields = {k: v for k, v in c.model.to_dict().items() if k != "causal"}
  c.model = common.model_section(C(**{k: v for k, v in fields.items() if k != "vocab_size"}))
  c.diffusion = ml_collections.ConfigDict(
    dict(
      eps=1e-3,  # lowest mask probability (LLaDA, MDLM)
      antithetic=True,  # MDLM's low-discrepancy times across the batch
      random_length_prob=0.01,  # LLaDA: 1% of batches cut to a random length
      sft_data="",  # a glob of JSONL {"prompt", "response"} files: SFT instead of pre-training
    )
  )
  c.sample_prompt = "def "
  c.sample_tokens = 128  # blocks of 32, one step per token
  if arg == "test":
    c.sample_tokens = 8
  return c
