"""Byte-level transformer LM on the embedded corpus (pydoc topics + the stdlib's sources).

Variants (``--config=configs/lm.py:<variant>``):

  tiny   0.9M params, CPU, a few minutes:
           python experiments/main.py --config=configs/lm.py:tiny --workdir=/tmp/lm
  small  6M params, CPU in an hour or a GPU in minutes:
           python experiments/main.py --config=configs/lm.py:small --workdir=/tmp/lm_small
  base   85M params, one GPU/TPU host, bf16, FSDP over all devices:
           python experiments/main.py --config=configs/lm.py:base --workdir=$WORKDIR
  1b     1.1B params, bf16, full remat, FSDP over a v5e-16 slice (13.7 of 16 GiB per chip; check
         any topology first with experiments/aot.py --config=configs/lm.py:1b --topology=v5e:4x4):
           python experiments/main.py --config=configs/lm.py:1b --workdir=$WORKDIR --distributed
  test   a few seconds, for the test suite.

Override any key: ``--config.steps=200 --config.model.num_layers=2 --config.mesh.fsdp=-1``.
"""

from flaxseed.configs import common
from flaxseed.models import transformer

T = transformer.TransformerConfig


def get_config(arg: str = "tiny"):
  c = common.base_config()
  if arg == "tiny":
    c.model = common.model_section(T.tiny())
    c.steps, c.batch_size, c.seq_len = 600, 16, 128
    c.eval_every, c.checkpoint_every, c.log_every = 200, 200, 20
  elif arg == "small":
    c.model = common.model_section(T.small())
    c.steps, c.batch_size, c.seq_len = 5000, 32, 256
    c.optim.lr, c.optim.warmup_steps = 2e-3, 200
  elif arg == "base":
    c.model = common.model_section(T.base(dtype="bfloat16", remat_policy="dots_no_batch"))
    c.steps, c.batch_size, c.seq_len = 20_000, 256, 1024
    c.optim.lr, c.optim.warmup_steps = 6e-4, 1000
    c.mesh.data, c.mesh.fsdp = 1, -1
  elif arg == "1b":
    c.model = common.model_section(T.one_b(dtype="bfloat16", remat_policy="full"))
    c.steps, c.batch_size, c.seq_len = 50_000, 256, 2048
    c.optim.lr, c.optim.warmup_steps = 3e-4, 2000
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.checkpoint_every, c.eval_every = 1000, 1000
  elif arg == "test":
    c.model = common.model_section(
      T.tiny(d_model=32, num_layers=2, num_heads=2, mlp_dim=64, scan_layers=True)
    )
    c.steps, c.batch_size, c.seq_len = 4, 8, 32
    c.log_every, c.eval_every, c.checkpoint_every, c.eval_batches = 1, 0, 0, 2
    c.sample_tokens = 8
    c.optim.warmup_steps = 2
  else:
    raise ValueError(f"unknown variant {arg!r} of configs/lm.py: tiny, small, base, 1b, test")
  return c
