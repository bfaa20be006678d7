"""Titans LMs (LMM, MAC, MAG, MAL) on the embedded corpus, through the shared LM loop.

Variants (``--config=configs/titans.py:<variant>-<size>``; variant: lmm, mac, mag, mal):

  <variant>-tiny   ~1M params, CPU, minutes:
      python experiments/main.py --config=configs/titans.py:mac-tiny --workdir=/tmp/mac
  <variant>-small  ~6M params, a GPU in minutes (CPU in hours).
  <variant>-base   ~90M params, one GPU/TPU host, bf16, FSDP over all devices.
  <variant>-test   a few seconds, for the test suite.

The memory's knobs are model fields: ``--config.model.memory_chunk=8``,
``--config.model.memory_depth=1``, ``--config.model.window=32`` (MAC: the segment length).
"""

from flaxseed.configs import common
from flaxseed.models import titans

T = titans.TitansConfig
SIZES = ("tiny", "small", "base", "test")


def get_config(arg: str = "mac-tiny"):
  variant, _, size = arg.partition("-")
  if variant not in titans.VARIANTS or size not in SIZES:
    raise ValueError(
      f"unknown variant {arg!r} of configs/titans.py: <variant>-<size> with "
      f"variant in {titans.VARIANTS} and size in {SIZES}"
    )
  c = common.base_config()
  c.model_family = "titans"
  if size == "tiny":
    c.model = common.model_section(T.tiny(variant=variant))
    c.steps, c.batch_size, c.seq_len = 600, 16, 128
    c.eval_every, c.checkpoint_every, c.log_every = 200, 200, 20
  elif size == "small":
    c.model = common.model_section(T.small(variant=variant))
    c.steps, c.batch_size, c.seq_len = 5000, 32, 256
    c.optim.lr, c.optim.warmup_steps = 2e-3, 200
  elif size == "base":
    c.model = common.model_section(T.base(variant=variant, dtype="bfloat16"))
    c.steps, c.batch_size, c.seq_len = 20_000, 256, 1024
    c.optim.lr, c.optim.warmup_steps = 6e-4, 1000
    c.mesh.data, c.mesh.fsdp = 1, -1
  else:  # test
    c.model = common.model_section(
      T(
        variant=variant,
        d_model=32,
        num_layers=2,
        num_heads=2,
        mlp_dim=64,
        window=8,
        memory_chunk=4,
        num_persistent=2,
        num_memory_tokens=2,
      )
    )
    c.steps, c.batch_size, c.seq_len = 4, 8, 32
    c.log_every, c.eval_every, c.checkpoint_every, c.eval_batches = 1, 0, 0, 2
    c.sample_tokens = 8
    c.optim.warmup_steps = 2
  return c
