"""The task registry and the ``Task`` base class (``training/tasks/``)."""

import ast
import os

import pytest

from flaxseed.configs import lm
from flaxseed.training import tasks
from flaxseed.training.tasks import base

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_every_registered_task_is_a_complete_task():
  for name, cls in tasks.TASKS.items():
    assert issubclass(cls, base.Task), name
    assert not cls.__abstractmethods__, f"{name} misses {sorted(cls.__abstractmethods__)}"
  assert {n for n, c in tasks.TASKS.items() if tasks.overrides(c.__new__(c), "prepare")} == {
    "sae",
    "lora",
  }


def test_a_task_missing_a_required_method_cannot_be_built():
  class NoData(tasks.LMTask):
    datasets = base.Task.datasets  # back to the abstract declaration

  with pytest.raises(TypeError, match="datasets"):
    NoData.from_config(lm.get_config("test"))


def test_unknown_task_names_the_key():
  config = lm.get_config("test")
  config.task = "dpo"
  with pytest.raises(ValueError, match=r"config.task='dpo' is not one of \[") as e:
    tasks.build(config)
  assert str(sorted(tasks.TASKS)) in str(e.value)  # every registered task, listed


def test_the_loop_never_probes_tasks_with_hasattr():
  """Hooks are declared on ``base.Task`` with no-op defaults; the loop calls them all."""
  for name in ("trainer.py", "step.py"):
    path = os.path.join(REPO, "training", name)
    tree = ast.parse(open(path, encoding="utf-8").read())
    calls = [
      n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
    ]
    assert "hasattr" not in calls, name
