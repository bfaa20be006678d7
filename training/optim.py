"""The optimizer: optax AdamW with linear warmup, cosine decay and global-norm clipping.

Weight decay applies to parameters with two or more dimensions (matrices and embeddings), never to
norm scales or biases. ``config.optim`` keys: ``lr``, ``warmup_steps``, ``final_lr_fraction``,
``b1``, ``b2``, ``eps``, ``weight_decay``, ``grad_clip`` (0 disables clipping), ``decay_steps``
(length of the schedule; 0: ``config.steps``, so a run can stop early or be extended without
changing its learning rates) and ``accum_steps`` (gradient accumulation inside the step, see
``training/step.py``).
"""

import re

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import optax


def schedule(optim_config, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to ``lr`` over ``warmup_steps``, then cosine decay to
  ``lr * final_lr_fraction`` at the schedule's end (``decay_steps``, default ``total_steps``).

  A warmup longer than the schedule is honoured, never shortened to fit: the learning rate is
  still rising when the run ends (the loop prints a note), and the same run extended later
  continues the same warmup."""
  total_steps = optim_config.decay_steps or total_steps
  warmup = optim_config.warmup_steps
  peak = optim_config.lr
  if warmup >= total_steps:
    return optax.linear_schedule(0.0, peak, max(warmup, 1))
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=peak,
    warmup_steps=warmup,
    decay_steps=total_steps,
    end_value=peak * optim_config.final_lr_fraction,
  )


def decay_mask(params):
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(optim_config, total_steps: int) -> optax.GradientTransformation:
  # identity() when clipping is off: the state has one structure for every config, so a run may
  # resume with other optimizer hyperparameters (training/workdir.py).
  clip = optim_config.grad_clip
  parts = [optax.clip_by_global_norm(clip) if clip > 0 else optax.identity()]
  parts.append(
    optax.adamw(
      schedule(optim_config, total_steps),
      b1=optim_config.b1,
      b2=optim_config.b2,
      eps=optim_config.eps,
      weight_decay=optim_config.weight_decay,
      mask=decay_mask,
    )
  )
  return optax.chain(*parts)


def keep_zeros(targets: str, abstract_params) -> optax.GradientTransformation:
  """Zeroes the updates of the parameters whose paths match ``targets`` wherever the parameter is
  exactly zero, so a pruned model's fine-tune keeps its sparsity pattern (``config.keep_zeros``;
  chained after AdamW, whose decoupled weight decay leaves a zero at zero). The mask is read from
  the parameters at every step, so nothing is stored; a kept weight would join it only by landing
  on exactly 0.0. A pattern that matches no parameter is a ``ValueError``."""
  from flaxseed.models import params as params_lib  # pylint: disable=g-import-not-at-top

  pattern = re.compile(targets)
  if not any(pattern.fullmatch(p) for p in params_lib.param_paths(abstract_params)):
    raise ValueError(
      f"config.keep_zeros={targets!r} matches no trainable parameter; the paths are: "
      f"{params_lib.param_paths(abstract_params)}"
    )

  def update(updates, state, params):
    def fix(key_path, u, p):
      if not pattern.fullmatch(params_lib.path_string(key_path)):
        return u
      return u * (p != 0).astype(u.dtype)

    return jax.tree_util.tree_map_with_path(fix, updates, params), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def state_shardings(optimizer, abstract_opt_state, param_shardings, mesh):
  """Optimizer-state shardings: param-shaped leaves follow their parameter, the rest replicate."""
  replicated = NamedSharding(mesh, PartitionSpec())
  return optax.tree_utils.tree_map_params(
    optimizer,
    lambda _, sharding: sharding,
    abstract_opt_state,
    param_shardings,
    transform_non_params=lambda _: replicated,
    is_leaf=lambda x: isinstance(x, NamedSharding),
  )


def validate(optim_config) -> None:
  """Bad values raise a ValueError naming the key."""
  checks = {
    "lr": optim_config.lr > 0,
    "warmup_steps": optim_config.warmup_steps >= 0,
    "final_lr_fraction": 0 <= optim_config.final_lr_fraction <= 1,
    "b1": 0 <= optim_config.b1 < 1,
    "b2": 0 <= optim_config.b2 < 1,
    "eps": optim_config.eps > 0,
    "weight_decay": optim_config.weight_decay >= 0,
    "grad_clip": optim_config.grad_clip >= 0,
    "decay_steps": optim_config.decay_steps >= 0,
    "accum_steps": optim_config.accum_steps >= 1,
  }
  for key, ok in checks.items():
    if not ok:
      raise ValueError(f"config.optim.{key}={optim_config[key]!r} is out of range")
