"""Needle retrieval beyond the attention window: the Titans study's six models of one budget.

Variants (``--config=configs/needle.py:<model>[-lm][-quick]``; model: swa, full_attention, lmm,
mac, mag, mal):

  <model>          needle retrieval (``task="needle"``, rows from ``data/needle.py``): 1500 steps
                   of 32 rows of 128 tokens, 4 key-value pairs in each row's first half and a
                   query for every key at its end; 2 to 6 minutes on a 2-core CPU:
      python experiments/main.py --config=configs/needle.py:mal --workdir=/tmp/needle_mal
  <model>-lm       the same model as a byte-level LM on the default corpus: 300 steps of
                   16 x 128 bytes:
      python experiments/main.py --config=configs/needle.py:mal-lm --workdir=/tmp/needle_mal_lm
  <model>[-lm]-quick   8 steps: the study's ``--quick`` smoke run.

The models (``model_config``): d_model 64, 2 layers, 2 heads. ``swa`` is a transformer whose
sliding window of 16 is much shorter than the distance from the pairs to the queries, so it cannot
see them; ``full_attention`` attends to the whole row; ``lmm``, ``mac``, ``mag`` and ``mal`` are
Titans with the same window (MAC: the segment) and a linear memory (``memory_depth=1``) updated in
chunks of 8. Each model's MLP width is the one (a multiple of 8) that brings its parameter count
closest to MAC's at width 128, so all six have about 155k parameters. The study
(``experiments/titans/run.py``) runs every variant and ablates the memory with
``--config.model.memory_chunk=4`` and ``--config.model.memory_depth=2``.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxseed.configs import common
from flaxseed.models import titans
from flaxseed.models import transformer

MODELS = ("swa", "full_attention", "lmm", "mac", "mag", "mal")
D_MODEL, LAYERS, HEADS, WINDOW, CHUNK = 64, 2, 2, 16, 8
MEMORY_DEPTH = 1  # a linear memory; the depth-2 MLP memory is the study's ablation
TRAIN_LEN = 128
NEEDLE = dict(num_pairs=4, num_keys=16, num_values=16, region=0.5)
MLP_WIDTHS = range(16, 1024, 8)  # the MLP widths the parameter matching chooses from


def num_params(model: nn.Module) -> int:
  """The parameter count of a Linen LM module (from shapes; nothing is materialized)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nn.unbox(shapes["params"]))))


def _module(cfg) -> nn.Module:
  return (titans.Titans if isinstance(cfg, titans.TitansConfig) else transformer.Transformer)(cfg)


def _unmatched(name: str, mlp_dim: int = 128):
  if name == "swa":
    return transformer.TransformerConfig(
      d_model=D_MODEL,
      num_layers=LAYERS,
      num_heads=HEADS,
      mlp_dim=mlp_dim,
      scan_layers=False,
      attention_pattern=(f"sliding_window:{WINDOW}",),
    )
  if name == "full_attention":
    return transformer.TransformerConfig(
      d_model=D_MODEL, num_layers=LAYERS, num_heads=HEADS, mlp_dim=mlp_dim, scan_layers=False
    )
  return titans.TitansConfig(
    variant=name,
    d_model=D_MODEL,
    num_layers=LAYERS,
    num_heads=HEADS,
    mlp_dim=mlp_dim,
    window=WINDOW,
    memory_chunk=CHUNK,
    memory_depth=MEMORY_DEPTH,
  )


@functools.cache
def matched_mlp_dim(name: str) -> int:
  """The width in ``MLP_WIDTHS`` whose parameter count is closest to MAC's at width 128 (the
  smallest on a tie). A model's count is affine in its MLP width, so two counts give every
  width's (asserted at the chosen width)."""
  target = num_params(_module(_unmatched("mac")))
  cfg = _unmatched(name)
  at = lambda f: num_params(_module(dataclasses.replace(cfg, mlp_dim=f)))
  lo, hi = MLP_WIDTHS[0], MLP_WIDTHS[1]
  base, slope = at(lo), (at(hi) - at(lo)) // (hi - lo)
  best = min(MLP_WIDTHS, key=lambda f: abs(base + slope * (f - lo) - target))
  assert at(best) == base + slope * (best - lo), f"{name}: parameters not affine in mlp_dim"
  return best


def model_config(name: str):
  """The frozen model config of ``name`` (one of ``MODELS``) at its matched MLP width."""
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r} of configs/needle.py; one of {MODELS}")
  return dataclasses.replace(_unmatched(name), mlp_dim=matched_mlp_dim(name))


def get_config(arg: str = "mal"):
  name, *rest = arg.split("-")
  if name not in MODELS or rest not in ([], ["lm"], ["quick"], ["lm", "quick"]):
    raise ValueError(
      f"unknown variant {arg!r} of configs/needle.py: <model>[-lm][-quick] with model in {MODELS}"
    )
  lm, quick = "lm" in rest, "quick" in rest
  cfg = model_config(name)
  c = common.base_config()
  c.task = "lm" if lm else "needle"
  c.model_family = "titans" if isinstance(cfg, titans.TitansConfig) else "transformer"
  c.model = common.model_section(cfg)
  steps = 8 if quick else 300 if lm else 1500
  c.steps, c.batch_size, c.seq_len = steps, 16 if lm else 32, TRAIN_LEN
  c.log_every, c.eval_every, c.checkpoint_every = max(steps // 10, 1), 0, 0
  c.eval_batches, c.sample_tokens = 4, 0
  c.optim.lr, c.optim.warmup_steps = 3e-3, max(steps // 20, 1)
  c.mesh.data = 1
  if not lm:
    c.needle = dict(NEEDLE)
  return c
