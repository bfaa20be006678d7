"""LoRA adapters as the trainable part of a task: ``task="lora"``, or any LM-family task with a
``config.lora`` section.

``LoRA(inner)`` wraps a task (``lm``, ``sft``, ``preference``, ``distill``): the inner task keeps
its data, loss, evaluation and sampling, and runs on the base weights with adapters in them
(``models/lora.py``); only the adapters are trainable, so the optimizer state and checkpoints hold
nothing of the base's size. ``task="lora"`` is the LM task wrapped (next-token prediction on
``config.data``). ``python experiments/main.py --config=configs/preference.py:tiny
--config.init_from=/tmp/sft --config.lora=...`` is DPO on adapters (``configs/lora.py`` documents
the section; ``common.with_lora`` adds it to any config).

``config.lora``: ``base_workdir``, ``rank``, ``alpha``, ``targets``, ``variant``, ``init``
(``LoraConfig``), and ``quantize`` (``""``, ``"int8"``, ``"int4"`` or ``"nf4"``: QLoRA on a base
quantized with ``quantize_group_size``; the quantized base is replicated for now).

The base weights come from ``config.lora.base_workdir`` or, where that is empty,
``config.init_from`` (one of them; both set is an error): a flaxseed run's latest checkpoint or a
Hugging Face folder. They are frozen and read again at every start, so a resume may not change
where they come from. With neither, the base is ``config.model`` freshly initialized (a warning;
for tests).

``frozen`` holds ``base`` (PiSSA: its residual; QLoRA: quantized), ``adapters0``, the adapters'
initial values computed from the real base weights (PiSSA's SVD, DoRA's column norms), which a
fresh run copies into its state (``prepare``), and ``inner``, the inner task's own frozen
parameters (a distillation teacher). An inner frozen entry that is a copy of the initial policy
(``Task.policy_copies``: the preference task's reference) is not stored twice: it is the base
with the initial adapters, ``inject(base, adapters0)``, the model before any step, so DPO starts at
log 2 with one base in memory.
"""

import math

from absl import logging
import flax.linen as nn
import jax

from flaxseed.models import lora as lora_lib
from flaxseed.models import quantize as quantize_lib
from flaxseed.training.tasks import base
from flaxseed.training.tasks import lm

# The tasks adapters can wrap: their trainable parameters are one LM's, with no optimizer
# wrapper or data-dependent init of their own.
WRAPPABLE = ("lm", "sft", "preference", "distill")


class LoRA(base.Task):
  """``inner`` with LoRA adapters as its trainable parameters (module docstring)."""

  init_from_sets = ("frozen",)  # init_from (or base_workdir) is the frozen base

  def __init__(
    self,
    inner: base.Task,
    *,
    lora_config: lora_lib.LoraConfig,
    base_from: str,
    quantize_config: tuple[str, int | None],
    rules,
    seed: int,
  ):
    self.inner = inner
    self.model = inner.model
    self.cfg = lora_config
    self.base_from = base_from
    self.quantize_fmt, self.quantize_group = quantize_config
    self.rules = rules
    self.adapter_rng = jax.random.PRNGKey(seed + 1)

  @classmethod
  def from_config(cls, config) -> "LoRA":
    """``task="lora"``: the LM task on adapters; a ``base_workdir`` run gives the model."""
    inner = lm.LMTask.from_config(config)
    if "lora" in config and config.lora.base_workdir:
      inner.model = base.model_from_run(config.lora.base_workdir, "config.lora.base_workdir")
    return cls.wrap(inner, config)

  @classmethod
  def wrap(cls, inner: base.Task, config) -> "LoRA":
    """``inner`` (built from ``config``) on the adapters ``config.lora`` describes."""
    if "lora" not in config:
      raise ValueError(
        "config.task='lora' needs a config.lora section (base_workdir, rank, alpha, "
        "targets, variant, init, quantize, quantize_group_size): configs/lora.py"
      )
    name = "lm" if config.task == "lora" else config.task
    if name not in WRAPPABLE:
      raise ValueError(
        f"config.lora: LoRA adapters train tasks {', '.join(WRAPPABLE)}, not "
        f"config.task={config.task!r}"
      )
    options = config.lora
    base_from = options.base_workdir or config.get("init_from", "")
    if options.base_workdir and config.get("init_from"):
      raise ValueError(
        f"config.lora.base_workdir={options.base_workdir!r} and config.init_from="
        f"{config.init_from!r} both name the frozen base: set one"
      )
    if not base_from:
      logging.warning(
        "neither config.lora.base_workdir nor config.init_from is set: the adapters sit on a "
        "randomly initialized %s",
        config.model_family,
      )
    else:
      base.check_weights(base_from, inner.model, _key(config))
    try:
      cfg = lora_lib.LoraConfig(
        rank=options.rank,
        alpha=options.alpha,
        targets=options.targets,
        variant=options.variant,
        init=options.init,
      )
    except ValueError as e:
      raise ValueError(f"config.lora: {e}") from e
    if options.quantize not in ("", "int8", "int4", "nf4"):
      raise ValueError(
        f"config.lora.quantize={options.quantize!r} is not one of '', 'int8', 'int4', 'nf4'"
      )
    return cls(
      inner,
      lora_config=cfg,
      base_from=base_from,
      quantize_config=(options.quantize, options.quantize_group_size),
      rules=tuple(tuple(r) for r in config.logical_axis_rules),
      seed=config.seed,
    )

  # --- The frozen tree: base, initial adapters, the inner task's own. ---

  def _frozen_from_base(self, base_params):
    """``{"base", "adapters0"}`` from the (boxed or plain) float base weights; plain arrays keep
    the base's boxes, so the frozen base shards like the model."""
    adapters = lora_lib.init(self.adapter_rng, base_params, self.cfg)
    frozen_base = nn.unbox(base_params)
    if self.cfg.init == "pissa":
      frozen_base = lora_lib.unmerge(base_params, adapters, self.cfg)
    if self.quantize_fmt:
      frozen_base = quantize_lib.quantize_params(
        frozen_base, fmt=self.quantize_fmt, group_size=self.quantize_group
      )
    frozen_base = jax.tree.map(
      lambda box, leaf: (
        box.replace_boxed(leaf)
        if isinstance(box, nn.LogicallyPartitioned) and isinstance(leaf, jax.Array)
        else leaf
      ),
      base_params,
      frozen_base,
      is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned),
    )
    return {"base": frozen_base, "adapters0": adapters}

  def _inner_frozen(self, frozen):
    """The frozen tree the inner task reads: its own entries, and its copies of the initial
    policy as the base with the initial adapters."""
    out = dict(frozen["inner"])
    for key in self.inner.policy_copies:
      out[key] = self.model_params(frozen["adapters0"], frozen)
    return out

  def init(self, rng, batch):
    base_params, inner_frozen = self.inner.init(rng, batch)
    frozen = self._frozen_from_base(base_params)
    frozen["inner"] = {k: v for k, v in inner_frozen.items() if k not in self.inner.policy_copies}
    return frozen["adapters0"], frozen

  def load_frozen(self, abstract_frozen):
    """The base weights of ``base_from`` (parameters only, a run's or a Hugging Face folder's),
    restored into the model's shardings and made into the frozen tree, with the inner task's own
    frozen parameters (``None`` without a ``base_from``: all freshly initialized)."""
    if not self.base_from:
      return None
    inner = {}
    if abstract_frozen["inner"]:
      inner = self.inner.load_frozen(abstract_frozen["inner"])
      if inner is None:
        raise ValueError(
          f"task {type(self.inner).__name__} initializes its frozen parameters freshly; "
          "its LoRA form needs them loaded"
        )
    mesh = jax.tree.leaves(abstract_frozen["adapters0"])[0].sharding.mesh
    base_params, _ = base.load_params(
      self.base_from,
      self.model,
      base.abstract_params(self.model, mesh, self.rules),
      "the LoRA base",
    )
    out_shardings = jax.tree.map(
      lambda a: a.sharding, {k: v for k, v in abstract_frozen.items() if k != "inner"}
    )
    with jax.set_mesh(mesh), nn.logical_axis_rules(self.rules):
      frozen = jax.jit(lambda b: nn.unbox(self._frozen_from_base(b)), out_shardings=out_shardings)(
        base_params
      )
    return {**frozen, "inner": inner}

  def prepare(self, params, task_state, frozen, batch):
    del params, batch
    return frozen["adapters0"], task_state

  def model_params(self, params, frozen):
    return lora_lib.inject(frozen["base"], params, self.cfg)

  # --- Everything else is the inner task's, on the adapted model. ---

  def __getattr__(self, name):  # seq_len, tokenizer, corpus, bytes_per_token, ...
    if name == "inner":  # not yet set (copy, pickle): no recursion
      raise AttributeError(name)
    return getattr(self.inner, name)

  def batch_spec(self, global_batch):
    return self.inner.batch_spec(global_batch)

  def datasets(self, **batching):
    return self.inner.datasets(**batching)

  def init_state(self):
    return self.inner.init_state()

  def loss(self, params, frozen, batch, rng):
    return self.inner.loss(
      self.model_params(params, frozen), self._inner_frozen(frozen), batch, rng
    )

  def stateful_loss(self, params, frozen, batch, rng, task_state):
    return self.inner.stateful_loss(
      self.model_params(params, frozen), self._inner_frozen(frozen), batch, rng, task_state
    )

  def evaluate(self, params, frozen, batch, task_state):
    return self.inner.evaluate(
      self.model_params(params, frozen), self._inner_frozen(frozen), batch, task_state
    )

  def sample(self, params, prompt, *, max_new_tokens, temperature, rng, frozen=None):
    return self.inner.sample(
      self.model_params(params, frozen),
      prompt,
      max_new_tokens=max_new_tokens,
      temperature=temperature,
      rng=rng,
      frozen=self._inner_frozen(frozen),
    )

  def flops_per_token(self):
    """The inner task's, less the base's weight gradients: the trained model's backward costs
    2N a token instead of 4N (of 6N), per row of an example (a preference pair has two)."""
    inner = self.inner.flops_per_token()
    if inner is None:
      return None
    rows = math.prod(self.inner.batch_spec(1)["tokens"].shape[1:-1])
    return inner - self.model.config.flops_per_token(self.inner.seq_len) * rows / 3


def _key(config) -> str:
  return "config.lora.base_workdir" if config.lora.base_workdir else "config.init_from"
