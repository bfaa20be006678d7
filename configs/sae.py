"""Sparse autoencoders on a trained model's activations (``models/sae.py``, task ``sae``).

Train the model first, then its SAE at the middle of the residual stream:

    python experiments/main.py --config=configs/lm.py:tiny --workdir=/tmp/lm
    python experiments/main.py --config=configs/sae.py:tiny --workdir=/tmp/sae \\
        --config.sae.lm_workdir=/tmp/lm

Variants (``--config=configs/sae.py:<variant>``):

  tiny   an 8x TopK SAE (1024 latents, k=32) on ``layers_1/resid_post`` of ``configs/lm.py:tiny``;
         4M tokens, a few minutes on a CPU.
  test   a few seconds, for the test suite.

Any architecture: ``--config.model.arch=jumprelu --config.model.l0_coefficient=3e-3`` (see
``sae.SAEConfig``). Without ``config.sae.lm_workdir`` the SAE reads a randomly initialized
``config.sae.lm_model`` (for smoke tests; the run says so). ``config.sae.activations=DIR`` reads
an activation cache written by ``experiments/sae/cache.py`` instead of running the model.

The optimizer is Adam without weight decay or clipping (SAELens' defaults), and ``batch_size``
counts rows of ``seq_len`` tokens: a step trains on ``batch_size * seq_len`` activations.
"""

import ml_collections

from flaxseed.configs import common
from flaxseed.models import sae
from flaxseed.models import transformer


def get_config(arg: str = "tiny"):
  c = common.base_config()
  c.task, c.model_family = "sae", "sae"
  c.sample_tokens = 0
  c.optim.update(
    lr=1e-3, b2=0.999, weight_decay=0.0, grad_clip=0.0, warmup_steps=100, final_lr_fraction=0.0
  )
  c.sae = ml_collections.ConfigDict(
    dict(
      site="layers_1/resid_post",
      lm_workdir="",
      lm_family="transformer",
      lm_model=common.model_section(transformer.TransformerConfig.tiny()),
      dead_window=262_144,  # tokens
      activations="",
    )
  )
  if arg == "tiny":
    c.model = common.model_section(sae.SAEConfig.tiny())
    c.steps, c.batch_size, c.seq_len = 2000, 16, 128
    c.eval_every, c.checkpoint_every, c.log_every = 500, 500, 50
  elif arg == "test":
    c.sae.lm_model = common.model_section(
      transformer.TransformerConfig.tiny(d_model=32, num_layers=2, num_heads=2, mlp_dim=64)
    )
    c.sae.site = "layers_0/resid_post"
    c.sae.dead_window = 256
    c.model = common.model_section(sae.SAEConfig(d_in=32, num_latents=128, arch="topk", k=4))
    c.steps, c.batch_size, c.seq_len = 4, 8, 32
    c.log_every, c.eval_every, c.checkpoint_every, c.eval_batches = 1, 0, 0, 2
    c.optim.warmup_steps = 2
  else:
    raise ValueError(f"unknown variant {arg!r} of configs/sae.py: tiny, test")
  return c
