"""Sections shared by every config. Small helpers, not an inheritance chain."""

import dataclasses
import typing

import ml_collections
from ml_collections import config_dict

from flaxseed.models import sharding


def model_section(model_config) -> ml_collections.ConfigDict:
  """A frozen model dataclass as a ConfigDict; ``None`` fields become typed placeholders, so
  ``--config.model.head_dim=64`` works although the preset leaves it unset."""
  hints = typing.get_type_hints(type(model_config))
  section = ml_collections.ConfigDict()
  for field in dataclasses.fields(model_config):
    value = getattr(model_config, field.name)
    if value is None:
      kinds = [t for t in typing.get_args(hints[field.name]) if t is not type(None)]
      value = config_dict.placeholder(kinds[0])
    section[field.name] = value
  return section


def variant(arg: str, variants: tuple[str, ...], path: str, options=()) -> tuple[str, set[str]]:
  """``"tiny"`` or ``"tiny,lora"`` -> ``("tiny", {"lora"})``: a config's variant and the options
  after it (``--config=configs/sft.py:tiny,lora``); an unknown one is a ``ValueError``."""
  name, *extra = arg.split(",")
  if name not in variants:
    raise ValueError(f"unknown variant {name!r} of {path}: {', '.join(variants)}")
  for option in extra:
    if option not in options:
      raise ValueError(
        f"unknown option {option!r} of {path}:{arg} (options: {', '.join(options) or 'none'})"
      )
  return name, set(extra)


def base_config() -> ml_collections.ConfigDict:
  """Keys every experiment has. Configs override what they need."""
  c = ml_collections.ConfigDict()
  c.task = "lm"
  c.model_family = "transformer"
  c.seed = 0
  c.steps = 1000
  c.batch_size = 16  # global, in sequences
  c.seq_len = 128
  c.log_every = 10
  c.eval_every = 250  # 0: only at the end
  c.eval_batches = 8
  c.checkpoint_every = 250  # 0: only at the end (and on SIGTERM)
  c.max_to_keep = 3
  c.z_loss = 0.0
  # lambda of a model with multi-token heads (model.mtp_heads > 0): main + lambda * mean over heads
  c.mtp_weight = 0.3
  # Medusa-1: train only the heads on the frozen model of config.init_from
  c.mtp_freeze_trunk = False
  # A regex of parameter paths whose exact zeros stay zero (a pruned model's sparse fine-tune,
  # models/prune.py), e.g. r".*(attn|mlp).*kernel"; "" trains every weight. Fixed for a run.
  c.keep_zeros = ""
  c.sample_tokens = 200  # 0: no sample at the end
  c.sample_prompt = "def "
  c.sample_temperature = 0.8
  # A run's workdir whose latest parameters start this run (fine-tuning, continued training);
  # the optimizer starts fresh. Used only when this run has no checkpoint of its own yet.
  c.init_from = ""

  c.optim = ml_collections.ConfigDict(
    dict(
      lr=3e-3,
      warmup_steps=100,
      final_lr_fraction=0.1,
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      weight_decay=0.1,
      grad_clip=1.0,
      decay_steps=0,
      accum_steps=1,
    )
  )

  c.data = ml_collections.ConfigDict(
    dict(
      # "default" (pydoc topics + stdlib sources), "default:prose" / "default:code" (one of the
      # two), or a glob of text files
      corpus="default",
      tokenizer="byte",  # "byte", a tokenizer.json or a SentencePiece .model path
    )
  )

  # -1: all remaining devices. data x fsdp splits the batch; tensor splits heads/MLP/vocab.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.logical_axis_rules = sharding.DEFAULT_RULES
  return c


def override(config: ml_collections.ConfigDict, **dotted) -> ml_collections.ConfigDict:
  """Sets dotted keys in place, as ``--config.a.b=v`` would (``override(c, **{"optim.lr": 1e-3})``)
  and returns ``config``; for notebooks and tests. An unknown key raises, naming it."""
  for key, value in dotted.items():
    node = config
    *parents, leaf = key.split(".")
    for i, p in enumerate(parents):
      if p not in node:
        raise KeyError(f"config has no key {'.'.join(parents[: i + 1])!r}")
      node = node[p]
    if leaf not in node:
      raise KeyError(f"config has no key {key!r}")
    node[leaf] = value
  return config
