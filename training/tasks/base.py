"""The ``Task`` base class: what the loop needs from an objective, and its optional hooks.

A task builds its model from the config, creates the trainable parameters (and any frozen ones:
a LoRA base, the model an SAE reads), computes the loss and evaluation sums, and makes its own
datasets. The loop knows tasks, never models. Subclasses implement the abstract methods; the
optional hooks below them have defaults that do nothing, so the loop calls every hook on every
task.
"""

import abc
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxseed import models
from flaxseed.models import hf
from flaxseed.models import transformer
from flaxseed.training import checkpoint
from flaxseed.training import mesh as mesh_lib

Params = Any
Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


class Task(abc.ABC):
  """An objective: its model, parameters, loss, evaluation and data."""

  model: nn.Module

  # What ``config.init_from`` initializes: the trainable parameters ("params": the loop loads
  # them on a fresh start) and/or frozen ones ("frozen": the task reads it in ``load_frozen`` at
  # every start, e.g. a preference reference or a LoRA base, so a resume may not change it).
  init_from_sets: tuple[str, ...] = ("params",)
  # Frozen entries that are copies of the initial trainable parameters (a preference reference):
  # a wrapper that trains adapters serves them from its base instead of storing them twice.
  policy_copies: tuple[str, ...] = ()

  # --- What every task defines. ---

  @classmethod
  @abc.abstractmethod
  def from_config(cls, config) -> "Task":
    """The task ``config`` describes (what the registry calls); checks its config section, and
    errors name the offending key."""

  @abc.abstractmethod
  def init(self, rng, batch: Batch) -> tuple[Params, Params]:
    """(trainable params, frozen params); params may carry ``nn.LogicallyPartitioned`` boxes."""

  def loss(self, params, frozen, batch: Batch, rng) -> tuple[jax.Array, Metrics]:
    """(scalar loss to minimize, metrics to log). A task defines this or ``stateful_loss``."""
    raise NotImplementedError(f"{type(self).__name__} defines neither loss nor stateful_loss")

  @abc.abstractmethod
  def evaluate(
    self, params, frozen, batch: Batch, task_state
  ) -> dict[str, tuple[jax.Array, jax.Array]]:
    """name -> (sum, count); the loop reports ``sum / count`` over all eval batches."""

  @abc.abstractmethod
  def batch_spec(self, global_batch: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of one global batch."""

  @abc.abstractmethod
  def datasets(
    self,
    *,
    global_batch: int,
    rows: tuple[int, int],
    train_batches: int,
    eval_batches: int,
    seed: int,
  ):
    """(train, eval) grain ``MapDataset``s of this process's rows of each global batch."""

  # --- Optional hooks: the defaults do nothing. ---

  def init_state(self) -> dict[str, jax.Array]:
    """The initial ``task_state`` carried in the train state (replicated), e.g. counters."""
    return {}

  def stateful_loss(
    self, params, frozen, batch: Batch, rng, task_state
  ) -> tuple[jax.Array, tuple[Metrics, Any]]:
    """The loss the train step differentiates: ``loss`` that also reads and updates
    ``task_state`` (e.g. an SAE's dead-latent counters); the default passes the state through."""
    value, metrics = self.loss(params, frozen, batch, rng)
    return value, (metrics, task_state)

  def prepare(self, params, task_state, frozen, batch: Batch) -> tuple[Params, Any]:
    """A data-dependent init from the first training batch, run once on a fresh start.

    The default does nothing, and the loop skips it (it would cost a compile): see ``overrides``.
    """
    del frozen, batch
    return params, task_state

  def load_frozen(self, abstract_frozen) -> Params | None:
    """The frozen parameters loaded from elsewhere (another run, a Hugging Face folder), in the
    shardings of ``abstract_frozen``; ``None``: initialize them freshly."""
    del abstract_frozen
    return None

  def wrap_optimizer(self, optimizer):
    """The optimizer the task trains with (e.g. a projection after each update)."""
    return optimizer

  def model_params(self, params, frozen) -> Params:
    """The parameter tree the model runs on (LoRA puts its adapters into the frozen base)."""
    del frozen
    return params

  def sample(
    self, params, prompt: str, *, max_new_tokens: int, temperature: float, rng, frozen=None
  ) -> str | None:
    """Prompt + continuation as text, shown at the end of a run; ``None``: no text to show."""
    del params, prompt, max_new_tokens, temperature, rng, frozen
    return None

  def flops_per_token(self) -> float | None:
    """Training FLOPs per token for MFU (``None`` if unknown)."""
    return None


def overrides(task: Task, hook: str) -> bool:
  """Whether ``task`` defines ``hook`` itself rather than inheriting the base's no-op."""
  return getattr(type(task), hook) is not getattr(Task, hook)


def build_model(config) -> nn.Module:
  """``config.model`` (a ConfigDict) -> the family's frozen config -> the Linen module."""
  try:
    return models.build(config.model_family, config.model.to_dict())
  except (TypeError, ValueError) as e:
    raise ValueError(f"config.model: {e}") from e


def model_from_run(workdir: str, what: str = "workdir") -> nn.Module:
  """The model a flaxseed run in ``workdir`` trained (its ``config.json``'s model section). The
  run must have a complete checkpoint, else a ``ValueError`` naming ``what`` (the config key that
  pointed here), before anything compiles."""
  run = checkpoint.run_config(workdir)
  checkpoint.require_checkpoint(workdir, what)
  try:
    return models.build(run.model_family, run.model.to_dict())
  except (TypeError, ValueError) as e:
    raise ValueError(f"{workdir}/config.json: {e}") from e


def model_from(path: str, what: str) -> nn.Module:
  """The model a flaxseed run (see ``model_from_run``) or a Hugging Face folder holds."""
  if hf.is_folder(path):
    return transformer.Transformer(hf.model_config(path))
  return model_from_run(path, what)


def abstract_params(model: nn.Module, mesh=None, rules=()):
  """``model``'s parameters as ``jax.ShapeDtypeStruct``s, in their shardings on ``mesh``."""
  with nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
  values = jax.tree.map(  # unboxed without sharding constraints
    lambda b: b.value if isinstance(b, nn.LogicallyPartitioned) else b,
    boxed,
    is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned),
  )
  if mesh is None:
    return values
  shardings = mesh_lib.logical_shardings(boxed, mesh, rules)
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), values, shardings
  )


def check_weights(path: str, model: nn.Module, what: str) -> None:
  """A ``ValueError`` naming ``what`` unless ``path`` (a run or a Hugging Face folder) holds
  ``model``'s parameters; reads only metadata, before anything compiles."""
  if hf.is_folder(path):
    if not isinstance(model, transformer.Transformer):
      raise ValueError(
        f"{what}={path!r} is a Hugging Face folder: it holds a transformer, not a "
        f"{type(model).__name__}"
      )
    hf.check_matches(path, model.config, what)
  else:
    checkpoint.check_params_match(path, abstract_params(model), what)


def load_params(path: str, model: nn.Module, abstract, what: str):
  """``(params, where they came from)``: ``model``'s parameters from ``path``, a flaxseed run's
  latest intact checkpoint or a Hugging Face folder, placed in the shardings of ``abstract``;
  errors name ``what``."""
  if hf.is_folder(path):
    return hf.load_params(model, path, abstract=abstract), "Hugging Face folder"
  try:
    params, step = checkpoint.restore_params(path, abstract)
  except ValueError as e:
    raise ValueError(f"{what}={path!r}: {e}") from e
  return params, f"step {step}"
