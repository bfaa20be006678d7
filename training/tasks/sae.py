"""A sparse autoencoder on a frozen model's activations at one site (``models/sae.py``)."""

import functools

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxseed import models
from flaxseed.data import activations
from flaxseed.data import corpus as corpus_lib
from flaxseed.data import pipeline
from flaxseed.models import sae as sae_lib
from flaxseed.models import sites
from flaxseed.training import checkpoint
from flaxseed.training.tasks import base


class SAETask(base.Task):
  """A sparse autoencoder (``models/sae.py``) on a frozen model's activations at a site.

  ``config.model`` is the SAE; ``config.sae`` names the model it reads and how:

  * ``lm_workdir``: a flaxseed run whose latest checkpoint (parameters only) and ``config.json``
    give the model; empty: ``lm_family``/``lm_model`` with fresh random weights (tests, smoke runs).
  * ``site``: an activation site (``models/sites.py``), e.g. ``layers_1/resid_post``.
  * ``activations``: empty to compute activations on the fly from the corpus rows of
    ``config.data`` (``seq_len`` tokens each, documents attend within themselves), or a cache
    directory written by ``training/activations.py`` (read by ``data/activations.py``) for this
    model and site: the same rows with their activations, read back with grain (a cached run
    sees the batches an on-the-fly run would).
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
      raise ValueError(
        "config.sae: the model scans its layers (scan_layers=True); activation "
        "sites need a model trained with scan_layers=False"
      )
    if self.options["dead_window"] <= 0:
      raise ValueError(f"config.sae.dead_window={self.options['dead_window']} must be positive")
    self.cache = None
    if self.options["activations"]:
      self.cache = activations.Cache(
        self.options["activations"], site=self.site, seq_len=seq_len, d_in=model.config.d_in
      )

  @classmethod
  def from_config(cls, config) -> "SAETask":
    if "sae" not in config:
      raise ValueError(
        "config.task='sae' needs a config.sae section (site, lm_workdir, "
        "lm_family, lm_model, dead_window, activations)"
      )
    options = config.sae
    if options.lm_workdir:
      lm = base.model_from_run(options.lm_workdir, "config.sae.lm_workdir")
    else:
      logging.warning(
        "config.sae.lm_workdir is empty: the SAE reads a randomly initialized %s", options.lm_family
      )
      try:
        lm = models.build(options.lm_family, options.lm_model.to_dict())
      except (TypeError, ValueError) as e:
        raise ValueError(f"config.sae.lm_model: {e}") from e
    return cls(
      base.build_model(config),
      lm,
      seq_len=config.seq_len,
      data_config=config.data,
      sae_config=options,
    )

  @functools.cached_property
  def corpus(self) -> corpus_lib.Corpus:
    return corpus_lib.build_corpus(self.data_config, self.lm.config.vocab_size)

  def batch_spec(self, global_batch):
    shape = (global_batch, self.seq_len)
    spec = {
      k: jax.ShapeDtypeStruct(shape, jnp.int32) for k in ("tokens", "segment_ids", "positions")
    }
    if self.cache is not None:
      spec["acts"] = jax.ShapeDtypeStruct(shape + (self.model.config.d_in,), jnp.float32)
    return spec

  def datasets(self, *, global_batch, rows, train_batches, eval_batches, seed):
    if self.cache is not None:
      train, evaluation = self.cache.split("train"), self.cache.split("validation")
    else:
      train, evaluation = self.corpus.train, self.corpus.validation
    return pipeline.train_and_eval(
      train,
      evaluation,
      global_batch=global_batch,
      rows=rows,
      row_len=self.seq_len,
      train_batches=train_batches,
      eval_batches=eval_batches,
      seed=seed,
    )

  def init(self, rng, batch):
    lm_rng, sae_rng = jax.random.split(rng)
    lm_params = self.lm.init(lm_rng, batch["tokens"])["params"]
    # Traced abstractly by the loop's setup: a bad site or width fails here, before compiling.
    width = sites.capture(self.lm, {"params": lm_params}, batch["tokens"], self.site).shape[-1]
    if width != self.model.config.d_in:
      raise ValueError(
        f"config.model.d_in={self.model.config.d_in} must equal the width of the "
        f"activations at config.sae.site={self.site!r} ({width})"
      )
    x = jnp.zeros((1, self.model.config.d_in), jnp.float32)
    return self.model.init(sae_rng, x)["params"], {"lm": lm_params}

  def load_frozen(self, abstract_frozen):
    """The model's trained parameters from ``lm_workdir`` (fresh random ones without it)."""
    if not self.options["lm_workdir"]:
      return None
    params, _ = checkpoint.restore_params(self.options["lm_workdir"], abstract_frozen["lm"])
    return {"lm": params}

  def init_state(self):
    return {
      "tokens_since_fired": jnp.zeros((self.model.config.num_latents,), jnp.int32),
      "threshold": jnp.zeros((), jnp.float32),
      "norm_scale": jnp.ones((), jnp.float32),
    }

  def wrap_optimizer(self, optimizer):
    return sae_lib.decoder_constraint(optimizer)

  def _lm_kwargs(self, batch):
    return {"segment_ids": batch["segment_ids"], "positions": batch["positions"]}

  def activations(self, frozen, batch):
    """``[B * L, d_in]`` float32 activations of the batch's rows (cached or computed)."""
    if "acts" in batch:
      acts = batch["acts"]
    else:
      acts = sites.capture(
        self.lm, {"params": frozen["lm"]}, batch["tokens"], self.site, **self._lm_kwargs(batch)
      )
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
    loss, metrics, f = sae_lib.loss_and_code(
      self.model, self.variables(params, task_state), x, dead_F=dead
    )
    fired = (f != 0).any(0)
    since = jnp.where(fired, 0, jnp.minimum(since + x.shape[0], self.DEAD_CAP))
    task_state = {**task_state, "tokens_since_fired": since}
    if cfg.arch == "batch_topk":
      task_state["threshold"] = sae_lib.update_threshold(
        task_state["threshold"], f, cfg.threshold_lr
      )
    metrics["dead_frac"] = (since >= self.options["dead_window"]).mean()
    return loss, (metrics, task_state)

  def encode(self, params, frozen, batch, task_state):
    """``[B * L, num_latents]``: the inference-time code of the batch's activations."""
    x = self.activations(frozen, batch) * task_state["norm_scale"]
    return self.model.apply(self.variables(params, task_state), x, True, method=self.model.encode)

  def evaluate(self, params, frozen, batch, task_state):
    return sae_lib.eval_sums(
      self.lm,
      {"params": frozen["lm"]},
      batch["tokens"],
      self.site,
      self.model,
      self.variables(params, task_state),
      norm_scale=task_state["norm_scale"],
      **self._lm_kwargs(batch),
    )

  def flops_per_token(self):
    cfg = self.model.config
    return 6 * 2 * cfg.d_in * cfg.num_latents + (
      self.lm.config.flops_per_token(self.seq_len) / 3 if self.cache is None else 0
    )
