"""Preference optimization (DPO, IPO, SimPO, ORPO, hinge; KTO) on pairs: ``task="preference"``.

``config.preference``: ``data`` (a glob of JSONL pairs, ``data/preference.py``; for ``kto``,
unpaired ``{prompt, completion, label}``), ``loss`` (a key of
``training/losses/preference.LOSSES``, or ``kto``), ``beta``, ``label_smoothing``,
``gamma_beta_ratio``, ``orpo_lambda``, ``desirable_weight`` and ``undesirable_weight`` (KTO),
``eos_id`` (appended to every completion when set) and ``pad_id``.

The policy starts from ``config.init_from`` (a pre-training or SFT run, or a Hugging Face folder;
without it, from a fresh init, for tests). The reference is the frozen copy of the same
parameters: loaded from ``init_from`` by ``load_frozen`` at every start, so a resume may not change
``init_from`` (or, without ``init_from``, initialized from the same rng as the policy, so the two
start equal). Losses without a reference (SimPO, ORPO) hold no frozen copy. With a
``config.lora`` section the adapters train and the reference is the frozen base with the initial
adapters (``training/tasks/lora.py``): one copy of the weights in memory.

A batch is ``tokens [B, 2, seq_len + 1]`` (chosen, rejected) with ``mask`` on the completions;
one forward pass of the policy (and one of the reference) over the ``2B`` rows gives the summed
completion log-probabilities the loss compares. Logged: the loss, TRL's ``logps/*`` and
``rewards/*`` (margin, accuracy), and ``kl``, the token-level KL(π ‖ π_ref) on the pairs'
completions, the price the policy paid for its margin.

``precompute_reference=True`` (TRL's ``precompute_ref_log_probs``): the reference's summed
completion log-probs of every pair are computed once before training, on the run's mesh, and
travel with the batches as ``ref_logps``; no reference is held during training (half the
weights' memory, a third fewer FLOPs a step) and no token-level ``kl`` is logged (it needs the
reference's logits). It needs ``init_from``; a resume computes them again (the same values on the
same mesh).

KTO's batch row 0 is the example and row 1 its prompt with another example's completion; the mean
policy/reference log-ratio of the row-1 pairs over the global batch is KTO's KL estimate (detached,
clamped at 0), logged as ``kto/kl_estimate``.
"""

import time

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import numpy as np

from flaxseed.data import pipeline
from flaxseed.data import preference as preference_data
from flaxseed.data import tokenizers
from flaxseed.training import mesh as mesh_lib
from flaxseed.training.losses import distillation
from flaxseed.training.losses import preference as losses
from flaxseed.training.tasks import base
from flaxseed.training.tasks import lm


class PreferenceTask(lm.LMTask):
  """Pairs -> a preference loss of the policy against its frozen reference (module docstring).
  Subclasses the LM task for its model, sampling and FLOPs; replaces its data and loss."""

  def __init__(
    self,
    model,
    *,
    seq_len,
    data_config,
    options: dict,
    init_from: str = "",
    run: dict | None = None,
  ):
    super().__init__(model, seq_len=seq_len, data_config=data_config)
    self.run = run or {}  # mesh, logical_axis_rules, batch_size: the precomputing pass's
    self.options = options
    self.loss_name = options["loss"]
    self.loss_options = losses.Options(
      beta=options["beta"],
      label_smoothing=options["label_smoothing"],
      gamma_beta_ratio=options["gamma_beta_ratio"],
      orpo_lambda=options["orpo_lambda"],
    )
    self.kto = self.loss_name == "kto"
    self.needs_reference = self.kto or losses.NEEDS_REFERENCE[self.loss_name]
    self.precomputed = options.get("precompute_reference", False)
    self.init_from = init_from
    if self.needs_reference:  # the reference is init_from's parameters, read at every start
      self.init_from_sets = ("params", "frozen")
    if self.needs_reference and not self.precomputed:
      self.policy_copies = ("reference",)

  @classmethod
  def from_config(cls, config) -> "PreferenceTask":
    if "preference" not in config:
      raise ValueError(
        "config.task='preference' needs a config.preference section (configs/preference.py)"
      )
    options = config.preference.to_dict()
    if options["loss"] not in (*losses.LOSSES, "kto"):
      raise ValueError(
        f"config.preference.loss={options['loss']!r} is not one of "
        f"{sorted(losses.LOSSES) + ['kto']}"
      )
    for name in ("desirable_weight", "undesirable_weight"):
      if not options[name] >= 0:  # NaN fails too
        raise ValueError(f"config.preference.{name}={options[name]} must be >= 0")
    if not options["data"]:
      raise ValueError(
        "config.preference.data is empty: a glob of JSONL files of {prompt, chosen, rejected}"
      )
    try:
      losses.Options(
        beta=options["beta"],
        label_smoothing=options["label_smoothing"],
        gamma_beta_ratio=options["gamma_beta_ratio"],
        orpo_lambda=options["orpo_lambda"],
      )
    except ValueError as e:
      raise ValueError(f"config.preference: {e}") from e
    if options.get("precompute_reference"):
      key = "config.preference.precompute_reference"
      if options["loss"] in losses.LOSSES and not losses.NEEDS_REFERENCE[options["loss"]]:
        raise ValueError(f"{key}: loss {options['loss']!r} has no reference to precompute")
      if not config.get("init_from"):
        raise ValueError(f"{key} needs config.init_from: the reference whose log-probs it reads")
    model = base.build_model(config)
    for name in ("eos_id", "pad_id"):
      value = options[name]
      if value is not None and not 0 <= value < model.config.vocab_size:
        raise ValueError(
          f"config.preference.{name}={value} is outside [0, {model.config.vocab_size})"
        )
    return cls(
      model,
      seq_len=config.seq_len,
      data_config=config.data,
      options=options,
      init_from=config.get("init_from", ""),
      run=dict(
        mesh=config.mesh.to_dict(),
        rules=tuple(tuple(r) for r in config.logical_axis_rules),
        batch_size=config.batch_size,
      ),
    )

  @property
  def tokenizer(self):
    return tokenizers.load(self.data_config.tokenizer)

  def batch_spec(self, global_batch):
    shape = (global_batch, 2, self.seq_len + 1)
    spec = {k: jax.ShapeDtypeStruct(shape, jnp.int32) for k in ("tokens", "mask")}
    if self.kto:  # row 0: the example, row 1: its prompt with another's completion
      spec["label"] = jax.ShapeDtypeStruct((global_batch, 1), jnp.int32)  # rank 2, like a batch
    if self.precomputed:
      spec["ref_logps"] = jax.ShapeDtypeStruct((global_batch, 2), jnp.float32)
    return spec

  def datasets(self, **batching):
    read = preference_data.kto_rows if self.kto else preference_data.preference_rows
    train, evaluation, skipped = read(
      self.options["data"],
      self.tokenizer,
      self.seq_len,
      eos_id=self.options["eos_id"],
      pad_id=self.options["pad_id"],
    )
    skipped.warn("config.preference.data", self.seq_len + 1)
    if self.precomputed:
      self._add_reference_logps(train, evaluation)
    return pipeline.train_and_eval(train, evaluation, row_len=self.seq_len + 1, **batching)

  def _add_reference_logps(self, *splits):
    """Adds ``ref_logps [N, 2]`` to each split: the reference's (``init_from``'s) summed
    completion log-probs, computed once, batch by batch, on the run's mesh, before training;
    the reference's parameters are freed after. Every process computes every row (the rows
    are small), so any process may read any row."""
    start = time.perf_counter()
    mesh = mesh_lib.make_mesh(self.run["mesh"])
    rules, size = self.run["rules"], self.run["batch_size"]
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      abstract = base.abstract_params(self.model, mesh, rules)
      params, _ = base.load_params(self.init_from, self.model, abstract, "config.init_from")
      forward = jax.jit(
        lambda p, batch: self._forward(p, batch)[0],
        out_shardings=NamedSharding(mesh, PartitionSpec()),
      )
      sharding = mesh_lib.batch_sharding(mesh, ndim=3)
      for split in splits:
        rows = {k: split.arrays[k] for k in ("tokens", "mask")}
        n = len(rows["tokens"])
        out = []
        for i in range(0, n, size):
          batch = {}
          for k, a in rows.items():
            a = a[i : i + size]
            a = np.pad(a, [(0, size - len(a))] + [(0, 0)] * (a.ndim - 1))  # the last batch
            batch[k] = jax.make_array_from_callback(a.shape, sharding, lambda idx, a=a: a[idx])
          out.append(np.asarray(forward(params, batch)))
        split.arrays["ref_logps"] = np.concatenate(out)[:n].astype(np.float32)
    del params
    logging.info(
      "precomputed the reference log-probs of %d rows in %.1f s",
      sum(len(s.arrays["tokens"]) for s in splits),
      time.perf_counter() - start,
    )

  def init(self, rng, batch):
    params = self.model.init(rng, batch["tokens"][:, 0, :-1])["params"]
    return params, ({"reference": params} if self.policy_copies else {})

  def load_frozen(self, abstract_frozen):
    if not (self.policy_copies and self.init_from):
      return None  # no reference held, or the fresh init's twin of the policy
    params, _ = base.load_params(
      self.init_from, self.model, abstract_frozen["reference"], "config.init_from"
    )
    return {"reference": params}

  def _forward(self, params, batch):
    """(summed completion log-probs [B, 2], completion lengths [B, 2], logits [2B, L, V])."""
    tokens, mask = batch["tokens"], batch["mask"]
    b, _, length = tokens.shape
    flat, flat_mask = tokens.reshape(2 * b, length), mask.reshape(2 * b, length)
    logits = self.model.apply({"params": params}, flat[:, :-1])
    total, count = losses.sequence_logps(logits, flat[:, 1:], flat_mask[:, 1:])
    return total.reshape(b, 2), count.reshape(b, 2), logits

  def _pairs(self, params, frozen, batch):
    logps, lengths, logits = self._forward(params, batch)
    ref = ref_logits = None
    if self.precomputed:  # no token-level KL without the reference's logits
      ref = batch["ref_logps"]
    elif self.needs_reference:
      ref, _, ref_logits = self._forward(jax.lax.stop_gradient(frozen["reference"]), batch)
    if self.kto:
      # KL(π ‖ π_ref) estimated on the mismatched rows (row 1), over the whole global batch.
      kl = (logps[:, 1] - ref[:, 1]).mean()
      loss, metrics = losses.kto(
        logps[:, 0],
        ref[:, 0],
        batch["label"][:, 0] > 0,
        kl,
        beta=self.loss_options.beta,
        desirable_weight=self.options["desirable_weight"],
        undesirable_weight=self.options["undesirable_weight"],
      )
      metrics = {
        "logps/completion": logps[:, 0],
        "rewards/kto": metrics["rewards/kto"],
        "kto/kl_estimate": jnp.broadcast_to(metrics["kl"], loss.shape),
      }
      return loss, self._with_token_kl(metrics, logits, ref_logits, batch)
    pairs = losses.Pairs(
      chosen=logps[:, 0],
      rejected=logps[:, 1],
      chosen_len=jnp.maximum(lengths[:, 0], 1.0),
      rejected_len=jnp.maximum(lengths[:, 1], 1.0),
      ref_chosen=None if ref is None else ref[:, 0],
      ref_rejected=None if ref is None else ref[:, 1],
    )
    loss, metrics = losses.paired_loss(self.loss_name, pairs, self.loss_options)
    return loss, self._with_token_kl(metrics, logits, ref_logits, batch)

  def _with_token_kl(self, metrics, logits, ref_logits, batch):
    """``metrics`` plus ``kl``: the token-level KL(π ‖ π_ref) on the completions (per example,
    the mean of its two rows), where there is a reference."""
    if ref_logits is not None:
      kl = distillation.divergence(ref_logits, logits, "reverse_kl")
      mask = batch["mask"].reshape(kl.shape[0], -1)[:, 1:].astype(jnp.float32)
      per_row = (kl * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1.0)
      metrics["kl"] = per_row.reshape(-1, 2).mean(-1)
    return metrics

  def loss(self, params, frozen, batch, rng):
    del rng
    loss, metrics = self._pairs(params, frozen, batch)
    return loss.mean(), {"loss": loss.mean(), **{k: v.mean() for k, v in metrics.items()}}

  def evaluate(self, params, frozen, batch, task_state):
    del task_state
    loss, metrics = self._pairs(params, frozen, batch)
    count = jnp.asarray(loss.shape[0], jnp.float32)
    return {"loss": (loss.sum(), count), **{k: (v.sum(), count) for k, v in metrics.items()}}

  def flops_per_token(self):
    # Two rows a pair; the reference adds a forward pass (1/3 of a training step's FLOPs).
    per_row = self.model.config.flops_per_token(self.seq_len)
    return 2 * per_row * (4 / 3 if self.policy_copies else 1)
