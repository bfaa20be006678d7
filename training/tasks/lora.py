"""LoRA / QLoRA fine-tuning of a trained model: the LM task with only the adapters trainable."""

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxseed.models import lora as lora_lib
from flaxseed.models import quantize as quantize_lib
from flaxseed.training import checkpoint
from flaxseed.training import mesh as mesh_lib
from flaxseed.training.tasks import base
from flaxseed.training.tasks import lm


class LoRATask(lm.LMTask):
  """LoRA fine-tuning (``models/lora.py``) of a trained model: next-token prediction on
  ``config.data`` with only the adapters trainable.

  ``config.lora``: ``base_workdir`` (a flaxseed run: its ``config.json`` gives the model and its
  latest checkpoint the weights; empty: ``config.model`` with fresh random weights, for tests),
  ``rank``, ``alpha``, ``targets``, ``variant``, ``init`` (``LoraConfig``), and ``quantize``
  (``""``, ``"int8"``, ``"int4"`` or ``"nf4"``: QLoRA on a base quantized with
  ``quantize_group_size``; the quantized base is replicated for now).

  The trainable parameters, optimizer state and checkpoints hold only the adapters; the base is
  frozen and referenced by ``base_workdir`` in the run's ``config.json``. ``frozen`` holds the
  base (PiSSA: its residual; QLoRA: quantized) and ``adapters0``, the adapters' initial values
  computed from the real base weights (PiSSA's SVD, DoRA's column norms), which a fresh run copies
  into its state (``prepare``).
  """

  def __init__(
    self,
    model: nn.Module,
    *,
    seq_len: int,
    data_config,
    z_loss: float,
    lora_config,
    base_workdir: str,
    quantize_config: tuple[str, int | None],
    rules,
    seed: int,
  ):
    super().__init__(model, seq_len=seq_len, data_config=data_config, z_loss=z_loss)
    self.cfg = lora_config
    self.base_workdir = base_workdir
    self.quantize_fmt, self.quantize_group = quantize_config
    self.rules = rules
    self.adapter_rng = jax.random.PRNGKey(seed + 1)

  @classmethod
  def from_config(cls, config) -> "LoRATask":
    if "lora" not in config:
      raise ValueError(
        "config.task='lora' needs a config.lora section (base_workdir, rank, alpha, "
        "targets, variant, init, quantize, quantize_group_size)"
      )
    options = config.lora
    if options.base_workdir:
      model = base.model_from_run(options.base_workdir, "config.lora.base_workdir")
    else:
      logging.warning(
        "config.lora.base_workdir is empty: fine-tuning a randomly initialized %s",
        config.model_family,
      )
      model = base.build_model(config)
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
      model,
      seq_len=config.seq_len,
      data_config=config.data,
      z_loss=config.z_loss,
      lora_config=cfg,
      base_workdir=options.base_workdir,
      quantize_config=(options.quantize, options.quantize_group_size),
      rules=tuple(tuple(r) for r in config.logical_axis_rules),
      seed=config.seed,
    )

  def _frozen_from_base(self, base):
    """``{"base", "adapters0"}`` from the (boxed or plain) float base weights; plain arrays keep
    the base's boxes, so the frozen base shards like the model."""
    adapters = lora_lib.init(self.adapter_rng, base, self.cfg)
    frozen_base = nn.unbox(base)
    if self.cfg.init == "pissa":
      frozen_base = lora_lib.unmerge(base, adapters, self.cfg)
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
      base,
      frozen_base,
      is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned),
    )
    return {"base": frozen_base, "adapters0": adapters}

  def init(self, rng, batch):
    base = self.model.init(rng, batch["tokens"][:, :-1])["params"]
    frozen = self._frozen_from_base(base)
    return frozen["adapters0"], frozen

  def load_frozen(self, abstract_frozen):
    """The base weights of ``base_workdir`` (parameters only), restored into the model's
    shardings, then made into the frozen tree (``None`` without a ``base_workdir``)."""
    if not self.base_workdir:
      return None
    mesh = jax.tree.leaves(abstract_frozen)[0].sharding.mesh
    tokens = jnp.zeros((1, self.seq_len), jnp.int32)
    with nn.logical_axis_rules(self.rules):
      boxed = jax.eval_shape(lambda: self.model.init(jax.random.PRNGKey(0), tokens)["params"])
    shardings = mesh_lib.logical_shardings(boxed, mesh, self.rules)
    values = jax.tree.map(
      lambda b: b.value,
      boxed,  # unbox without sharding constraints
      is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned),
    )
    abstract = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), values, shardings
    )
    base, _ = checkpoint.restore_params(self.base_workdir, abstract)
    out_shardings = jax.tree.map(lambda a: a.sharding, abstract_frozen)
    with jax.set_mesh(mesh), nn.logical_axis_rules(self.rules):
      return jax.jit(lambda b: nn.unbox(self._frozen_from_base(b)), out_shardings=out_shardings)(
        base
      )

  def prepare(self, params, task_state, frozen, batch):
    del params, batch
    return frozen["adapters0"], task_state

  def model_params(self, params, frozen):
    return lora_lib.inject(frozen["base"], params, self.cfg)

  def flops_per_token(self):
    # Forward and the activations' backward through the base (no weight gradients): ~4N, not 6N.
    return self.model.config.flops_per_token(self.seq_len) * 2 / 3
