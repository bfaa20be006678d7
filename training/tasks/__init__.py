"""Tasks: the only thing that differs between objectives. One file a task, registered here.

``build(config)`` returns ``TASKS[config.task].from_config(config)``. A new objective is one new
file (a ``base.Task`` subclass with a ``from_config(config)`` classmethod) and one line in
``TASKS``; the loop needs nothing else. A ``config.lora`` section trains any LM-family task's
LoRA adapters instead of its parameters (``lora.py``).
"""

from flaxseed.training.tasks.base import Task
from flaxseed.training.tasks.base import abstract_params
from flaxseed.training.tasks.base import build_model
from flaxseed.training.tasks.base import load_params
from flaxseed.training.tasks.base import model_from_run
from flaxseed.training.tasks.base import overrides
from flaxseed.training.tasks.diffusion import DiffusionTask
from flaxseed.training.tasks.distill import DistillTask
from flaxseed.training.tasks.lm import LMTask
from flaxseed.training.tasks.lora import LoRA
from flaxseed.training.tasks.needle import NeedleTask
from flaxseed.training.tasks.preference import PreferenceTask
from flaxseed.training.tasks.sae import SAETask
from flaxseed.training.tasks.sft import SFTTask

TASKS: dict[str, type[Task]] = {
  "lm": LMTask,
  "needle": NeedleTask,
  "diffusion": DiffusionTask,
  "sae": SAETask,
  "lora": LoRA,
  "preference": PreferenceTask,
  "distill": DistillTask,
  "sft": SFTTask,
}


def build(config) -> Task:
  """The task ``config.task`` names, built from ``config`` (errors name the key)."""
  if config.task not in TASKS:
    raise ValueError(f"config.task={config.task!r} is not one of {sorted(TASKS)}")
  task = TASKS[config.task].from_config(config)
  if "lora" in config and config.task != "lora":  # adapters as the trainable part
    task = LoRA.wrap(task, config)
  return task
