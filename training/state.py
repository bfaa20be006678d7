"""The train state: a pytree of everything that changes from step to step and is checkpointed."""

import dataclasses
from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class TrainState:
  """``step`` (int32 scalar), trainable ``params``, ``opt_state``, the base ``rng`` and the
  ``task_state``: non-trainable statistics a task updates every step (an SAE's dead-latent counters
  and inference threshold; ``{}`` for most tasks).

  Frozen parameters (a LoRA base, the model an SAE reads) are not part of the state: they are
  passed to the step separately and never saved with it. The per-step key is
  ``jax.random.fold_in(rng, step)``, so a resumed run draws exactly the keys it would have drawn.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # raw uint32[2] key: checkpoints as a plain array
  task_state: Any = dataclasses.field(default_factory=dict)
