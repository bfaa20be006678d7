"""Tasks: the only thing that differs between objectives (LM, diffusion LM, SAE, LoRA).

The training loop knows tasks, never models. A task builds its model from the config, creates
the trainable parameters (and any frozen ones), computes the loss and evaluation sums, and makes
its own datasets. ``TASKS`` maps ``config.task`` to a constructor ``fn(config) -> Task``.
"""

import functools
import glob
import json
import math
from typing import Any, Callable, Protocol

from absl import logging
import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np

from flaxseed import models
from flaxseed.models import diffusion_lm
from flaxseed.models import lora as lora_lib
from flaxseed.models import quantize as quantize_lib
from flaxseed.models import sae as sae_lib
from flaxseed.models import sampling
from flaxseed.models import sites
from flaxseed.training import checkpoint
from flaxseed.training import data as data_lib
from flaxseed.training import mesh as mesh_lib
from flaxseed.training import tokenizers

Params = Any
Batch = dict[str, jax.Array]


class Task(Protocol):
  """What the loop needs from an objective."""

  model: nn.Module

  def init(self, rng, batch: Batch) -> tuple[Params, Params]:
    """(trainable params, frozen params); params may carry ``nn.LogicallyPartitioned`` boxes."""

  def loss(self, params, frozen, batch: Batch, rng) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(scalar loss to minimize, metrics to log)."""

  def evaluate(self, params, frozen, batch: Batch) -> dict[str, tuple[jax.Array, jax.Array]]:
    """name -> (sum, count); the loop reports ``sum / count`` over all eval batches."""

  def batch_spec(self, global_batch: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of one global batch."""

  def datasets(self, *, global_batch: int, rows: tuple[int, int], train_batches: int,
               eval_batches: int, seed: int):
    """(train, eval) grain ``MapDataset``s of this process's rows of each global batch."""

  def flops_per_token(self) -> float | None:
    """Training FLOPs per token for MFU (``None`` if unknown)."""


def build_model(config) -> nn.Module:
  """``config.model`` (a ConfigDict) -> the family's frozen config -> the Linen module."""
  try:
    return models.build(config.model_family, config.model.to_dict())
  except (TypeError, ValueError) as e:
    raise ValueError(f"config.model: {e}") from e


def model_from_run(workdir: str) -> nn.Module:
  """The model a flaxseed run in ``workdir`` trained (its ``config.json``'s model section)."""
  run = checkpoint.run_config(workdir)
  try:
    return models.build(run.model_family, run.model.to_dict())
  except (TypeError, ValueError) as e:
    raise ValueError(f"{workdir}/config.json: {e}") from e


class LMTask:
  """Next-token prediction on packed rows of a text corpus.

  A batch holds rows of ``seq_len + 1`` tokens: the model reads the first ``seq_len`` and predicts
  the next token at each place where it belongs to the same document piece. ``z_loss`` adds
  ``z_loss * logsumexp(logits)^2`` (PaLM) to keep the softmax normalizer near 1.
  """

  def __init__(self, model: nn.Module, *, seq_len: int, data_config, z_loss: float = 0.0):
    self.model = model
    self.seq_len = seq_len
    self.data_config = data_config
    self.z_loss = z_loss

  @classmethod
  def from_config(cls, config) -> "LMTask":
    if config.z_loss < 0:
      raise ValueError(f"config.z_loss={config.z_loss} must be >= 0")
    return cls(build_model(config), seq_len=config.seq_len, data_config=config.data,
               z_loss=config.z_loss)

  @functools.cached_property
  def corpus(self) -> data_lib.Corpus:
    return data_lib.build_corpus(self.data_config, self.model.config.vocab_size)

  @property
  def tokenizer(self):
    return self.corpus.tokenizer

  def batch_spec(self, global_batch):
    shape = (global_batch, self.seq_len + 1)
    return {k: jax.ShapeDtypeStruct(shape, jnp.int32)
            for k in ("tokens", "segment_ids", "positions")}

  def datasets(self, *, global_batch, rows, train_batches, eval_batches, seed):
    common = dict(global_batch=global_batch, rows=rows, row_len=self.seq_len + 1,
                  stride=self.seq_len)
    train = data_lib.batches(self.corpus.train, num_batches=train_batches, seed=seed,
                             name="train", **common)
    evaluation = data_lib.batches(self.corpus.validation, num_batches=eval_batches, seed=None,
                                  name="validation", **common)
    return train, evaluation

  def init(self, rng, batch):
    inputs = batch["tokens"][:, :-1]
    return self.model.init(rng, inputs)["params"], {}

  def model_params(self, params, frozen):
    """The parameter tree the model runs on (LoRA puts its adapters into the frozen base)."""
    del frozen
    return params

  def _nll(self, params, frozen, batch):
    """Per-token negative log-likelihood, logsumexp, correctness and target weights."""
    tokens, segments = batch["tokens"], batch["segment_ids"]
    logits = self.model.apply({"params": self.model_params(params, frozen)}, tokens[:, :-1],
                              segment_ids=segments[:, :-1], positions=batch["positions"][:, :-1])
    targets = tokens[:, 1:]
    weights = ((segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] != 0)).astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return lse - target_logit, lse, correct, weights

  def loss(self, params, frozen, batch, rng):
    del rng
    nll, lse, correct, weights = self._nll(params, frozen, batch)
    count = jnp.maximum(weights.sum(), 1.0)
    loss = (nll * weights).sum() / count
    metrics = {"loss": loss, "accuracy": (correct * weights).sum() / count}
    if self.z_loss:
      z = (jnp.square(lse) * weights).sum() / count
      metrics["z_loss"] = z
      loss = loss + self.z_loss * z
    return loss, metrics

  def evaluate(self, params, frozen, batch):
    nll, _, correct, weights = self._nll(params, frozen, batch)
    count = weights.sum()
    nll_sum = (nll * weights).sum()
    bits_per_byte = nll_sum / math.log(2) / self.corpus.bytes_per_token
    return {"loss": (nll_sum, count), "bpb": (bits_per_byte, count),
            "accuracy": ((correct * weights).sum(), count)}

  def flops_per_token(self):
    return self.model.config.flops_per_token(self.seq_len)

  def sample(self, params, prompt: str, *, max_new_tokens: int, temperature: float, rng,
             frozen=None) -> str:
    """Continues ``prompt`` with the KV cache; returns prompt + continuation as text."""
    prompt_tokens = np.asarray(self.tokenizer.encode(prompt), np.int32)[None]
    out = sampling.generate(self.model, self.model_params(params, frozen), prompt_tokens,
                            max_new_tokens=max_new_tokens, temperature=temperature, rng=rng)
    return self.tokenizer.decode(np.asarray(out[0]))


class LoRATask(LMTask):
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

  def __init__(self, model: nn.Module, *, seq_len: int, data_config, z_loss: float, lora_config,
               base_workdir: str, quantize_config: tuple[str, int | None], rules, seed: int):
    super().__init__(model, seq_len=seq_len, data_config=data_config, z_loss=z_loss)
    self.cfg = lora_config
    self.base_workdir = base_workdir
    self.quantize_fmt, self.quantize_group = quantize_config
    self.rules = rules
    self.adapter_rng = jax.random.PRNGKey(seed + 1)

  @classmethod
  def from_config(cls, config) -> "LoRATask":
    if "lora" not in config:
      raise ValueError("config.task='lora' needs a config.lora section (base_workdir, rank, alpha, "
                       "targets, variant, init, quantize, quantize_group_size)")
    options = config.lora
    if options.base_workdir:
      model = model_from_run(options.base_workdir)
    else:
      logging.warning("config.lora.base_workdir is empty: fine-tuning a randomly initialized %s",
                      config.model_family)
      model = build_model(config)
    try:
      cfg = lora_lib.LoraConfig(rank=options.rank, alpha=options.alpha, targets=options.targets,
                                variant=options.variant, init=options.init)
    except ValueError as e:
      raise ValueError(f"config.lora: {e}") from e
    if options.quantize not in ("", "int8", "int4", "nf4"):
      raise ValueError(f"config.lora.quantize={options.quantize!r} is not one of '', 'int8', "
                       "'int4', 'nf4'")
    return cls(model, seq_len=config.seq_len, data_config=config.data, z_loss=config.z_loss,
               lora_config=cfg, base_workdir=options.base_workdir,
               quantize_config=(options.quantize, options.quantize_group_size),
               rules=tuple(tuple(r) for r in config.logical_axis_rules), seed=config.seed)

  def _frozen_from_base(self, base):
    """``{"base", "adapters0"}`` from the (boxed or plain) float base weights; plain arrays keep
    the base's boxes, so the frozen base shards like the model."""
    adapters = lora_lib.init(self.adapter_rng, base, self.cfg)
    frozen_base = nn.unbox(base)
    if self.cfg.init == "pissa":
      frozen_base = lora_lib.unmerge(base, adapters, self.cfg)
    if self.quantize_fmt:
      frozen_base = quantize_lib.quantize_params(frozen_base, fmt=self.quantize_fmt,
                                                 group_size=self.quantize_group)
    frozen_base = jax.tree.map(
        lambda box, leaf: (box.replace_boxed(leaf) if isinstance(box, nn.LogicallyPartitioned)
                           and isinstance(leaf, jax.Array) else leaf),
        base, frozen_base, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
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
    values = jax.tree.map(lambda b: b.value, boxed,  # unbox without sharding constraints
                          is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            values, shardings)
    base, _ = checkpoint.restore_params(self.base_workdir, abstract)
    out_shardings = jax.tree.map(lambda a: a.sharding, abstract_frozen)
    with jax.set_mesh(mesh), nn.logical_axis_rules(self.rules):
      return jax.jit(lambda b: nn.unbox(self._frozen_from_base(b)),
                     out_shardings=out_shardings)(base)

  def prepare(self, params, task_state, frozen, batch):
    del params, batch
    return frozen["adapters0"], task_state

  def model_params(self, params, frozen):
    return lora_lib.inject(frozen["base"], params, self.cfg)

  def flops_per_token(self):
    # Forward and the activations' backward through the base (no weight gradients): ~4N, not 6N.
    return self.model.config.flops_per_token(self.seq_len) * 2 / 3


class NeedleTask:
  """Associative recall beyond the attention window: a long-context probe (experiments/titans).

  A row is filler with ``num_pairs`` key-value pairs written as ``PAIR k v`` in its first
  ``region`` fraction, ending in ``QUERY k v`` for every key in a random order (multi-query
  associative recall): after each ``QUERY k`` the model must emit that key's value. Only those
  predictions are scored (``loss``, ``accuracy``). ``config.needle`` holds
  ``num_pairs``, ``num_keys``, ``num_values`` and ``region``; ``needle_rows`` makes rows of any
  length, so a model trained at one length can be evaluated at others.
  """

  def __init__(self, model: nn.Module, *, seq_len: int, needle_config):
    self.model = model
    self.seq_len = seq_len
    self.needle = dict(needle_config)
    needle_rows(np.random.default_rng(0), 1, seq_len + 1, **self.needle)  # validates the config

  @classmethod
  def from_config(cls, config) -> "NeedleTask":
    if "needle" not in config:
      raise ValueError("config.task='needle' needs a config.needle section (num_pairs, num_keys, "
                       "num_values, region)")
    return cls(build_model(config), seq_len=config.seq_len, needle_config=config.needle)

  def batch_spec(self, global_batch):
    return {"tokens": jax.ShapeDtypeStruct((global_batch, self.seq_len + 1), jnp.int32)}

  def datasets(self, *, global_batch, rows, train_batches, eval_batches, seed):
    def make(offset, num_batches):
      def batch(t):
        rng = np.random.default_rng([offset, t])  # the global batch t, whoever asks for it
        tokens = needle_rows(rng, global_batch, self.seq_len + 1, **self.needle)
        return {"tokens": tokens[rows[0]:rows[1]]}
      return grain.MapDataset.range(num_batches).map(batch)
    return make(seed, train_batches), make(2**31 - 1, eval_batches)  # eval rows never trained on

  def init(self, rng, batch):
    return self.model.init(rng, batch["tokens"][:, :-1])["params"], {}

  def predictions(self, params, tokens):
    """(nll, correct) ``[B, num_pairs]`` of the values asked for at the end of rows
    ``[B, L + 1]``."""
    values = tokens.shape[1] - 1 - 3 * np.arange(self.needle["num_pairs"])  # answer positions
    logits = self.model.apply({"params": params}, tokens[:, :-1])[:, values - 1]
    target = tokens[:, values]
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(
        logits, target[..., None], axis=-1)[..., 0]
    return nll, (jnp.argmax(logits, axis=-1) == target).astype(jnp.float32)

  def loss(self, params, frozen, batch, rng):
    del frozen, rng
    nll, correct = self.predictions(params, batch["tokens"])
    return nll.mean(), {"loss": nll.mean(), "accuracy": correct.mean()}

  def evaluate(self, params, frozen, batch):
    del frozen
    nll, correct = self.predictions(params, batch["tokens"])
    count = jnp.asarray(nll.size, jnp.float32)
    return {"loss": (nll.sum(), count), "accuracy": (correct.sum(), count)}

  def flops_per_token(self):
    return self.model.config.flops_per_token(self.seq_len)


class DiffusionTask:
  """Masked-diffusion LM training (``models/diffusion_lm.py``): pre-training or LLaDA SFT.

  ``config.diffusion``: ``eps`` (the lowest mask probability), ``antithetic`` (low-discrepancy
  times across the batch), ``random_length_prob`` (LLaDA cuts 1% of pre-training batches to a
  length drawn from U[1, L] so the model also sees short sequences: the cut tail is excluded from
  attention and loss) and ``sft_data``. Empty ``sft_data`` pre-trains on ``config.data``'s
  corpus (rows of ``seq_len`` tokens, documents attend within themselves); a glob of JSONL files
  with ``prompt`` and ``response`` strings fine-tunes instead: a row is prompt, response and
  ``eos_token_id`` padding, only the answer (padding included) is ever masked, and every tenth
  example is held out for evaluation.

  Evaluation reports the stratified ELBO (``eval/loss`` in nats per scored token, ``eval/bpb``):
  one mask per row, the masked counts spread over 1..L across the batch, with a fixed key per
  batch so evaluations are comparable across steps. It is an upper bound on the NLL.
  """

  def __init__(self, model: nn.Module, *, seq_len: int, data_config, diffusion_config):
    if not isinstance(model.config, diffusion_lm.DiffusionLMConfig):
      raise ValueError("config.task='diffusion' needs config.model_family='diffusion_lm'")
    self.model = model
    self.seq_len = seq_len
    self.data_config = data_config
    self.options = dict(diffusion_config)
    if not 0 < self.options["eps"] < 1:
      raise ValueError(f"config.diffusion.eps={self.options['eps']} must be in (0, 1)")
    if not 0 <= self.options["random_length_prob"] <= 1:
      raise ValueError(f"config.diffusion.random_length_prob={self.options['random_length_prob']}"
                       " must be in [0, 1]")
    self.sft = bool(self.options["sft_data"])

  @classmethod
  def from_config(cls, config) -> "DiffusionTask":
    if "diffusion" not in config:
      raise ValueError("config.task='diffusion' needs a config.diffusion section (eps, "
                       "antithetic, random_length_prob, sft_data)")
    return cls(build_model(config), seq_len=config.seq_len, data_config=config.data,
               diffusion_config=config.diffusion)

  @functools.cached_property
  def corpus(self) -> data_lib.Corpus:
    return data_lib.build_corpus(self.data_config, self.model.config.vocab_size)

  @functools.cached_property
  def tokenizer(self):
    return self.corpus.tokenizer if not self.sft else tokenizers.load(self.data_config.tokenizer)

  def batch_spec(self, global_batch):
    keys = ("tokens", "prompt_mask") if self.sft else ("tokens", "segment_ids", "positions")
    return {k: jax.ShapeDtypeStruct((global_batch, self.seq_len), jnp.int32) for k in keys}

  def datasets(self, *, global_batch, rows, train_batches, eval_batches, seed):
    if self.sft:
      train, evaluation = sft_rows(self.options["sft_data"], self.tokenizer, self.seq_len,
                                   eos_id=self.model.config.eos_token_id)
    else:
      train, evaluation = self.corpus.train, self.corpus.validation
    mask_id = self.model.config.mask_token_id
    for split in (train, evaluation):
      tokens = split.rows["tokens"] if self.sft else split.tokens
      if tokens.size and (tokens.max() >= self.model.config.vocab_size or
                          (tokens == mask_id).any()):
        raise ValueError(f"the data has token ids equal to config.model.mask_token_id={mask_id} "
                         f"or outside config.model.vocab_size={self.model.config.vocab_size}; "
                         "the mask token must be an id the tokenizer never produces")
    common = dict(global_batch=global_batch, rows=rows, row_len=self.seq_len, stride=self.seq_len)
    return (data_lib.batches(train, num_batches=train_batches, seed=seed, name="train", **common),
            data_lib.batches(evaluation, num_batches=eval_batches, seed=None, name="validation",
                             **common))

  def init(self, rng, batch):
    return self.model.init(rng, batch["tokens"])["params"], {}

  def _inputs(self, batch):
    """(answer: the tokens that may be masked, model keyword arguments)."""
    if self.sft:
      return batch["prompt_mask"] == 0, {}
    segments = batch["segment_ids"]
    return segments != 0, {"segment_ids": segments, "positions": batch["positions"]}

  def loss(self, params, frozen, batch, rng):
    del frozen
    tokens = batch["tokens"]
    answer, model_kw = self._inputs(batch)
    noise_rng, cut_rng = jax.random.split(rng)
    if not self.sft and self.options["random_length_prob"]:
      cut_at = jax.random.randint(cut_rng, (), 1, tokens.shape[1] + 1)
      cut = jax.random.uniform(jax.random.fold_in(cut_rng, 1)) < self.options["random_length_prob"]
      answer = answer & ~(cut & (jnp.arange(tokens.shape[1]) >= cut_at))[None]
      model_kw["segment_ids"] = jnp.where(answer, model_kw["segment_ids"], 0)
    noisy, masked, p_mask = diffusion_lm.noise(
        noise_rng, tokens, answer, mask_token_id=self.model.config.mask_token_id,
        eps=self.options["eps"], antithetic=self.options["antithetic"])
    logits = self.model.apply({"params": params}, noisy, **model_kw)
    if self.sft:
      loss = diffusion_lm.sft_loss(logits, tokens, masked, p_mask, answer)
    else:
      loss = diffusion_lm.pretrain_loss(logits, tokens, masked, p_mask,
                                        num_tokens=jnp.maximum(answer.sum(), 1))
    correct = (jnp.argmax(logits, axis=-1) == tokens) & masked
    return loss, {"loss": loss, "masked_accuracy": correct.sum() / jnp.maximum(masked.sum(), 1),
                  "mask_rate": masked.sum() / jnp.maximum(answer.sum(), 1)}

  def evaluate(self, params, frozen, batch):
    del frozen
    tokens = batch["tokens"]
    answer, model_kw = self._inputs(batch)
    batch_size = tokens.shape[0]
    u_rng, mask_rng = jax.random.split(jax.random.fold_in(jax.random.key(0), tokens.sum()))
    # One mask per row; the rows are the strata: row b's count is 1 + floor(A (u + b / B mod 1)).
    u_B = jnp.mod(jax.random.uniform(u_rng, ()) + jnp.arange(batch_size) / batch_size, 1.0)
    masked, count = diffusion_lm.stratified_masks(mask_rng, u_B, jnp.zeros(1), 1, answer)
    nats = diffusion_lm.stratified_nats(self.model, params, tokens, masked, count,
                                        answer.sum(-1), **model_kw).sum()
    scored = answer.sum().astype(jnp.float32)
    metrics = {"loss": (nats, scored)}
    if not self.sft:
      metrics["bpb"] = (nats / math.log(2) / self.corpus.bytes_per_token, scored)
    return metrics

  def flops_per_token(self):
    return self.model.config.flops_per_token(self.seq_len)

  def sample(self, params, prompt: str, *, max_new_tokens: int, temperature: float, rng,
             frozen=None) -> str:
    """Prompt + ``max_new_tokens`` tokens of semi-autoregressive low-confidence sampling (blocks
    of 32 when that divides, one step per token), cut at the first EOS."""
    prompt_tokens = np.asarray(self.tokenizer.encode(prompt), np.int32)[None]
    block = 32 if max_new_tokens % 32 == 0 else max_new_tokens
    del frozen
    out = diffusion_lm.generate(self.model, params, prompt_tokens, gen_length=max_new_tokens,
                                steps=max_new_tokens, block_length=block,
                                temperature=temperature, rng=rng)
    return self.tokenizer.decode(text_ids(np.asarray(out[0]), self.model.config,
                                          self.tokenizer.vocab_size))


class SAETask:
  """A sparse autoencoder (``models/sae.py``) on a frozen model's activations at ``config.sae.site``.

  ``config.model`` is the SAE; ``config.sae`` names the model it reads and how:

  * ``lm_workdir``: a flaxseed run whose latest checkpoint (parameters only) and ``config.json``
    give the model; empty: ``lm_family``/``lm_model`` with fresh random weights (tests, smoke runs).
  * ``site``: an activation site (``models/sites.py``), e.g. ``layers_1/resid_post``.
  * ``activations``: empty to compute activations on the fly from the corpus rows of
    ``config.data`` (``seq_len`` tokens each, documents attend within themselves), or a cache
    directory written by ``training/activations.py`` for this model and site: the same rows with
    their activations, read back with grain (a cached run sees the batches an on-the-fly run
    would).
  * ``dead_window``: a latent is dead when it has not fired for this many tokens; dead latents
    feed AuxK (topk, batch_topk) and the ``dead_frac`` metric.

  The train state carries ``task_state``: per-latent tokens since the last activation (saturating
  at 2**30), the BatchTopK inference threshold and the activation scale of
  ``constant_norm_rescale``. A fresh run's first batch sets ``b_dec`` to the geometric median of
  its activations and the scale to ``sqrt(d_in / mean ||x||^2)``. Decoder rows stay unit-norm
  (``sae.decoder_constraint``). Evaluation reports ``sae.eval_sums`` on the validation rows
  (FVU, L0, cosine similarity, CE loss recovered and KL with the reconstruction spliced in).
  """

  DEAD_CAP = 2**30

  def __init__(self, model: nn.Module, lm: nn.Module, *, seq_len: int, data_config, sae_config):
    if not isinstance(model.config, sae_lib.SAEConfig):
      raise ValueError("config.task='sae' needs config.model_family='sae'")
    self.model, self.lm = model, lm
    self.seq_len = seq_len
    self.data_config = data_config
    self.options = dict(sae_config)
    self.site = self.options["site"]
    sites.resolve(self.site)
    if getattr(lm.config, "scan_layers", False):
      raise ValueError("config.sae: the model scans its layers (scan_layers=True); activation "
                       "sites need a model trained with scan_layers=False")
    if self.options["dead_window"] <= 0:
      raise ValueError(f"config.sae.dead_window={self.options['dead_window']} must be positive")
    self.cache = None
    if self.options["activations"]:
      # Imported here: training/activations.py builds tasks itself.
      from flaxseed.training import activations  # pylint: disable=g-import-not-at-top
      self.cache = activations.Cache(self.options["activations"], site=self.site,
                                     seq_len=seq_len, d_in=model.config.d_in)

  @classmethod
  def from_config(cls, config) -> "SAETask":
    if "sae" not in config:
      raise ValueError("config.task='sae' needs a config.sae section (site, lm_workdir, "
                       "lm_family, lm_model, dead_window, activations)")
    options = config.sae
    if options.lm_workdir:
      lm = model_from_run(options.lm_workdir)
    else:
      logging.warning("config.sae.lm_workdir is empty: the SAE reads a randomly initialized %s",
                      options.lm_family)
      try:
        lm = models.build(options.lm_family, options.lm_model.to_dict())
      except (TypeError, ValueError) as e:
        raise ValueError(f"config.sae.lm_model: {e}") from e
    return cls(build_model(config), lm, seq_len=config.seq_len, data_config=config.data,
               sae_config=options)

  @functools.cached_property
  def corpus(self) -> data_lib.Corpus:
    return data_lib.build_corpus(self.data_config, self.lm.config.vocab_size)

  def batch_spec(self, global_batch):
    shape = (global_batch, self.seq_len)
    spec = {k: jax.ShapeDtypeStruct(shape, jnp.int32)
            for k in ("tokens", "segment_ids", "positions")}
    if self.cache is not None:
      spec["acts"] = jax.ShapeDtypeStruct(shape + (self.model.config.d_in,), jnp.float32)
    return spec

  def datasets(self, *, global_batch, rows, train_batches, eval_batches, seed):
    if self.cache is not None:
      train, evaluation = self.cache.split("train"), self.cache.split("validation")
    else:
      train, evaluation = self.corpus.train, self.corpus.validation
    common = dict(global_batch=global_batch, rows=rows, row_len=self.seq_len, stride=self.seq_len)
    return (data_lib.batches(train, num_batches=train_batches, seed=seed, name="train", **common),
            data_lib.batches(evaluation, num_batches=eval_batches, seed=None, name="validation",
                             **common))

  def init(self, rng, batch):
    lm_rng, sae_rng = jax.random.split(rng)
    lm_params = self.lm.init(lm_rng, batch["tokens"])["params"]
    # Traced abstractly by the loop's setup: a bad site or width fails here, before compiling.
    width = sites.capture(self.lm, {"params": lm_params}, batch["tokens"], self.site).shape[-1]
    if width != self.model.config.d_in:
      raise ValueError(f"config.model.d_in={self.model.config.d_in} must equal the width of the "
                       f"activations at config.sae.site={self.site!r} ({width})")
    x = jnp.zeros((1, self.model.config.d_in), jnp.float32)
    return self.model.init(sae_rng, x)["params"], {"lm": lm_params}

  def load_frozen(self, abstract_frozen):
    """The model's trained parameters from ``lm_workdir`` (fresh random ones without it)."""
    if not self.options["lm_workdir"]:
      return None
    params, _ = checkpoint.restore_params(self.options["lm_workdir"], abstract_frozen["lm"])
    return {"lm": params}

  def init_state(self):
    return {"tokens_since_fired": jnp.zeros((self.model.config.num_latents,), jnp.int32),
            "threshold": jnp.zeros((), jnp.float32), "norm_scale": jnp.ones((), jnp.float32)}

  def wrap_optimizer(self, optimizer):
    return sae_lib.decoder_constraint(optimizer)

  def _lm_kwargs(self, batch):
    return {"segment_ids": batch["segment_ids"], "positions": batch["positions"]}

  def activations(self, frozen, batch):
    """``[B * L, d_in]`` float32 activations of the batch's rows (cached or computed)."""
    if "acts" in batch:
      acts = batch["acts"]
    else:
      acts = sites.capture(self.lm, {"params": frozen["lm"]}, batch["tokens"], self.site,
                           **self._lm_kwargs(batch))
    acts = jax.lax.stop_gradient(acts.astype(jnp.float32))
    return acts.reshape(-1, acts.shape[-1])

  def variables(self, params, task_state):
    """The SAE's variables: ``params`` and, for BatchTopK, the inference threshold."""
    if self.model.config.arch == "batch_topk":
      return {"params": params, "batch_stats": {"threshold": task_state["threshold"]}}
    return {"params": params}

  def prepare(self, params, task_state, frozen, batch):
    x = self.activations(frozen, batch)
    scale = jnp.ones((), jnp.float32)
    if self.model.config.normalize_activations == "constant_norm_rescale":
      scale = jnp.sqrt(x.shape[-1] / jnp.square(x).sum(-1).mean())
    params = {**params, "b_dec": sae_lib.geometric_median(x * scale).astype(params["b_dec"].dtype)}
    return params, {**task_state, "norm_scale": scale}

  def stateful_loss(self, params, frozen, batch, rng, task_state):
    del rng
    cfg = self.model.config
    x = self.activations(frozen, batch) * task_state["norm_scale"]
    since = task_state["tokens_since_fired"]
    dead = since >= self.options["dead_window"]
    loss, metrics, f = sae_lib.loss_and_code(self.model, self.variables(params, task_state), x,
                                             dead_F=dead)
    fired = (f != 0).any(0)
    since = jnp.where(fired, 0, jnp.minimum(since + x.shape[0], self.DEAD_CAP))
    task_state = {**task_state, "tokens_since_fired": since}
    if cfg.arch == "batch_topk":
      task_state["threshold"] = sae_lib.update_threshold(task_state["threshold"], f,
                                                         cfg.threshold_lr)
    metrics["dead_frac"] = (since >= self.options["dead_window"]).mean()
    return loss, (metrics, task_state)

  def encode(self, params, frozen, batch, task_state):
    """``[B * L, num_latents]``: the inference-time code of the batch's activations."""
    x = self.activations(frozen, batch) * task_state["norm_scale"]
    return self.model.apply(self.variables(params, task_state), x, True,
                            method=self.model.encode)

  def evaluate(self, params, frozen, batch, task_state):
    return sae_lib.eval_sums(self.lm, {"params": frozen["lm"]}, batch["tokens"], self.site,
                             self.model, self.variables(params, task_state),
                             norm_scale=task_state["norm_scale"], **self._lm_kwargs(batch))

  def flops_per_token(self):
    cfg = self.model.config
    return 6 * 2 * cfg.d_in * cfg.num_latents + (
        self.lm.config.flops_per_token(self.seq_len) / 3 if self.cache is None else 0)


def text_ids(ids: np.ndarray, config, vocab_size: int) -> np.ndarray:
  """``ids`` up to the first EOS, without special ids the tokenizer does not have."""
  eos = np.flatnonzero(ids == config.eos_token_id)
  ids = ids[:eos[0]] if len(eos) else ids
  return ids[ids < vocab_size]


class _Rows:
  """Fixed rows in the ``TokenStream`` interface that ``data_lib.batches`` reads."""

  def __init__(self, rows: dict[str, np.ndarray]):
    self.rows = rows

  def num_rows(self, row_len, stride):
    del row_len, stride
    return len(self.rows["tokens"])

  def row(self, k, row_len, stride):
    del row_len, stride
    return {name: r[k] for name, r in self.rows.items()}


def sft_rows(pattern: str, tokenizer, seq_len: int, *, eos_id: int):
  """(train, eval) SFT rows from JSONL files ``pattern``: ``tokens`` (prompt, response, EOS
  padding) and ``prompt_mask`` (1 on the prompt). Every tenth example is held out."""
  paths = sorted(glob.glob(pattern))
  if not paths:
    raise ValueError(f"config.diffusion.sft_data={pattern!r}: no files match this glob")
  tokens, prompt_mask = [], []
  for path in paths:
    with open(path) as f:
      for line_no, line in enumerate(f, 1):
        if not line.strip():
          continue
        where = f"config.diffusion.sft_data: {path}:{line_no}"
        try:
          example = json.loads(line)
          prompt, response = example["prompt"], example["response"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
          raise ValueError(f"{where}: need a JSON object with 'prompt' and 'response' ({e})")
        p, r = tokenizer.encode(prompt), tokenizer.encode(response)
        if len(p) + len(r) + 1 > seq_len:
          raise ValueError(f"{where}: prompt and response take {len(p) + len(r)} tokens; "
                           f"seq_len={seq_len} must leave room for at least one EOS")
        row = np.full(seq_len, eos_id, np.int32)
        row[:len(p) + len(r)] = np.concatenate([p, r])
        tokens.append(row)
        prompt_mask.append((np.arange(seq_len) < len(p)).astype(np.int32))
  held_out = np.arange(len(tokens)) % 10 == 9
  tokens, prompt_mask = np.stack(tokens), np.stack(prompt_mask)
  return (_Rows({"tokens": tokens[~held_out], "prompt_mask": prompt_mask[~held_out]}),
          _Rows({"tokens": tokens[held_out], "prompt_mask": prompt_mask[held_out]}))


# Token ids of needle rows: below the filler range, so byte-vocabulary models can read them.
NEEDLE_PAIR, NEEDLE_QUERY, NEEDLE_KEYS, NEEDLE_VALUES, NEEDLE_FILLER = 1, 2, 16, 64, 128


def needle_rows(rng: np.random.Generator, batch: int, length: int, *, num_pairs: int,
                num_keys: int, num_values: int, region: float) -> np.ndarray:
  """``[batch, length]`` int32 needle rows (see ``NeedleTask``): pairs in the first ``region``
  of the row before the queries, ``num_pairs`` ``QUERY k v`` triples at its end."""
  if not 1 <= num_pairs <= num_keys <= NEEDLE_VALUES - NEEDLE_KEYS:
    raise ValueError(f"config.needle: need 1 <= num_pairs={num_pairs} <= num_keys={num_keys} "
                     f"<= {NEEDLE_VALUES - NEEDLE_KEYS}")
  if not 1 <= num_values <= NEEDLE_FILLER - NEEDLE_VALUES:
    raise ValueError(f"config.needle.num_values={num_values} must be in "
                     f"[1, {NEEDLE_FILLER - NEEDLE_VALUES}]")
  queries = 3 * num_pairs
  slots = int(region * (length - queries)) // 3  # room for PAIR k v triples before the queries
  if not 0 < region <= 1 or slots < num_pairs:
    raise ValueError(f"config.needle.region={region}: rows of {length} tokens hold {max(slots, 0)}"
                     f" pairs in their first {region:.0%}, fewer than num_pairs={num_pairs}")
  rows = rng.integers(NEEDLE_FILLER, 256, size=(batch, length)).astype(np.int32)
  for row in rows:
    keys = NEEDLE_KEYS + rng.choice(num_keys, num_pairs, replace=False)
    values = NEEDLE_VALUES + rng.integers(0, num_values, num_pairs)
    for slot, k, v in zip(np.sort(rng.choice(slots, num_pairs, replace=False)), keys, values):
      row[3 * slot:3 * slot + 3] = (NEEDLE_PAIR, k, v)
    for i, asked in enumerate(rng.permutation(num_pairs)):
      row[length - queries + 3 * i:length - queries + 3 * i + 3] = (
          NEEDLE_QUERY, keys[asked], values[asked])
  return rows


TASKS: dict[str, Callable[[Any], Task]] = {"lm": LMTask.from_config,
                                           "needle": NeedleTask.from_config,
                                           "diffusion": DiffusionTask.from_config,
                                           "sae": SAETask.from_config,
                                           "lora": LoRATask.from_config}


def build(config) -> Task:
  if config.task not in TASKS:
    raise ValueError(f"config.task={config.task!r} is not one of {sorted(TASKS)}")
  return TASKS[config.task](config)
