"""Next-token prediction on packed rows of a text corpus: the language-model task."""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxseed.data import corpus as corpus_lib
from flaxseed.data import pipeline
from flaxseed.models import sampling
from flaxseed.training.tasks import base


class LMTask(base.Task):
  """Next-token prediction on packed rows of a text corpus.

  A batch holds rows of ``seq_len + 1`` tokens: the model reads the first ``seq_len`` and predicts
  the next token at each place where it belongs to the same document piece. ``z_loss`` adds
  ``z_loss * logsumexp(logits)^2`` (PaLM) to keep the softmax normalizer near 1.

  A model with multi-token heads (``model.mtp_heads = K``) also learns them: head k predicts the
  token ``k + 1`` ahead under the same document rule (a target in another document, or past the
  row, does not count), and the loss is ``main + mtp_weight * mean over heads of each head's
  mean cross-entropy`` (DeepSeek-V3's form; Gloeckle et al.'s unweighted sum is
  ``mtp_weight = K``). The metrics report each head's ``mtp_k/loss`` and ``mtp_k/accuracy``;
  ``loss`` stays the main head's, comparable with a model without heads.

  ``mtp_freeze_trunk`` (Medusa-1): only the heads train; the rest of the model is frozen, read at
  every start from ``config.init_from`` (a run or a Hugging Face folder of the same model without
  heads), so the main head's predictions never change.
  """

  def __init__(
    self,
    model: nn.Module,
    *,
    seq_len: int,
    data_config,
    z_loss: float = 0.0,
    mtp_weight: float = 0.3,
    trunk_from: str | None = None,
  ):
    self.model = model
    self.seq_len = seq_len
    self.data_config = data_config
    self.z_loss = z_loss
    self.mtp_weight = mtp_weight
    self.trunk_from = trunk_from  # set: the heads train on this frozen trunk (Medusa-1)
    # init_from fills the frozen trunk then, read at every start (Task.init_from_sets)
    self.init_from_sets = ("frozen",) if trunk_from else ("params",)

  @staticmethod
  def lm_options(config, model: nn.Module) -> dict:
    """The LM keys of ``config`` (checked): every task built on this one reads them. A run
    written before a key existed gets its default."""
    options = {"z_loss": config.get("z_loss", 0.0), "mtp_weight": config.get("mtp_weight", 0.3)}
    for key, value in options.items():
      if not value >= 0:  # NaN fails too
        raise ValueError(f"config.{key}={value} must be >= 0")
    if config.get("mtp_freeze_trunk", False):
      if not getattr(model.config, "mtp_heads", 0):
        raise ValueError("config.mtp_freeze_trunk=True trains heads: set config.model.mtp_heads")
      if not config.get("init_from"):
        raise ValueError(
          "config.mtp_freeze_trunk=True needs config.init_from: the run or Hugging Face folder "
          "whose model the heads learn to extend"
        )
      base.check_weights(config.init_from, _trunk_model(model), "config.init_from")
      options["trunk_from"] = config.init_from
    return options

  @classmethod
  def from_config(cls, config) -> "LMTask":
    model = base.build_model(config)
    return cls(
      model,
      seq_len=config.seq_len,
      data_config=config.data,
      **cls.lm_options(config, model),
    )

  @property
  def mtp_heads(self) -> int:
    return getattr(self.model.config, "mtp_heads", 0)

  @functools.cached_property
  def corpus(self) -> corpus_lib.Corpus:
    return corpus_lib.build_corpus(self.data_config, self.model.config.vocab_size)

  @property
  def tokenizer(self):
    return self.corpus.tokenizer

  def batch_spec(self, global_batch):
    shape = (global_batch, self.seq_len + 1)
    return {
      k: jax.ShapeDtypeStruct(shape, jnp.int32) for k in ("tokens", "segment_ids", "positions")
    }

  def datasets(self, *, global_batch, rows, train_batches, eval_batches, seed):
    return pipeline.train_and_eval(
      self.corpus.train,
      self.corpus.validation,
      global_batch=global_batch,
      rows=rows,
      row_len=self.seq_len + 1,
      stride=self.seq_len,
      train_batches=train_batches,
      eval_batches=eval_batches,
      seed=seed,
    )

  def init(self, rng, batch):
    inputs = batch["tokens"][:, :-1]
    params = self.model.init(rng, inputs)["params"]
    if not self.trunk_from:
      return params, {}
    heads = {k: v for k, v in params.items() if k.startswith("mtp_")}
    return heads, {k: v for k, v in params.items() if not k.startswith("mtp_")}

  def model_params(self, params, frozen):
    return {**frozen, **params} if self.trunk_from else params

  def load_frozen(self, abstract_frozen):
    """The frozen trunk (Medusa-1): ``init_from``'s parameters, in the trunk's shardings."""
    if not self.trunk_from:
      return None
    params, _ = base.load_params(
      self.trunk_from, _trunk_model(self.model), abstract_frozen, "config.init_from"
    )
    return params

  def _heads(self, params, frozen, batch):
    """Per head (the main one first, then each multi-token head): per-token negative
    log-likelihood, logsumexp, correctness and target weights, all ``[B, L]``."""
    tokens, segments = batch["tokens"], batch["segment_ids"]
    out = self.model.apply(
      {"params": self.model_params(params, frozen)},
      tokens[:, :-1],
      segment_ids=segments[:, :-1],
      positions=batch["positions"][:, :-1],
      **({"mtp": True} if self.mtp_heads else {}),
    )
    logits_per_head = [out[0], *out[1]] if self.mtp_heads else [out]
    length = self.seq_len
    # Head k (0: main) predicts the token k + 1 ahead; rows are padded with segment 0 so that
    # targets past the row never count.
    pad = ((0, 0), (0, self.mtp_heads))
    tokens_pad, segments_pad = jnp.pad(tokens, pad), jnp.pad(segments, pad)
    loss_mask = batch.get("loss_mask")  # only some targets count (chat SFT: the assistant's)
    heads = []
    for k, logits in enumerate(logits_per_head):
      targets = tokens_pad[:, 1 + k : 1 + k + length]
      target_segments = segments_pad[:, 1 + k : 1 + k + length]
      weights = (target_segments == segments[:, :-1]) & (target_segments != 0)
      if loss_mask is not None:
        weights = weights & (jnp.pad(loss_mask, pad)[:, 1 + k : 1 + k + length] != 0)
      lse = jax.nn.logsumexp(logits, axis=-1)
      target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
      correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
      heads.append((lse - target_logit, lse, correct, weights.astype(jnp.float32)))
    return heads

  def loss(self, params, frozen, batch, rng):
    del rng
    heads = self._heads(params, frozen, batch)
    nll, lse, correct, weights = heads[0]
    count = jnp.maximum(weights.sum(), 1.0)
    loss = (nll * weights).sum() / count
    metrics = {"loss": loss, "accuracy": (correct * weights).sum() / count}
    if self.z_loss:
      z = (jnp.square(lse) * weights).sum() / count
      metrics["z_loss"] = z
      loss = loss + self.z_loss * z
    if self.mtp_heads:
      head_losses = []
      for k, (nll, _, correct, weights) in enumerate(heads[1:], start=1):
        count = jnp.maximum(weights.sum(), 1.0)
        head_losses.append((nll * weights).sum() / count)
        metrics[f"mtp_{k}/loss"] = head_losses[-1]
        metrics[f"mtp_{k}/accuracy"] = (correct * weights).sum() / count
      loss = loss + self.mtp_weight * sum(head_losses) / len(head_losses)
    return loss, metrics

  def evaluate(self, params, frozen, batch, task_state):
    del task_state
    heads = self._heads(params, frozen, batch)
    nll, _, correct, weights = heads[0]
    count = weights.sum()
    nll_sum = (nll * weights).sum()
    sums = {"loss": (nll_sum, count), "accuracy": ((correct * weights).sum(), count)}
    if self.bytes_per_token is not None:
      sums["bpb"] = (nll_sum / math.log(2) / self.bytes_per_token, count)
    for k, (nll, _, correct, weights) in enumerate(heads[1:], start=1):
      sums[f"mtp_{k}/loss"] = ((nll * weights).sum(), weights.sum())
      sums[f"mtp_{k}/accuracy"] = ((correct * weights).sum(), weights.sum())
    return sums

  @property
  def bytes_per_token(self) -> float | None:
    """Turns nats per token into bits per byte (``None``: no ``bpb`` metric)."""
    return self.corpus.bytes_per_token

  def flops_per_token(self):
    return self.model.config.flops_per_token(self.seq_len)

  def sample(
    self, params, prompt: str, *, max_new_tokens: int, temperature: float, rng, frozen=None
  ) -> str:
    """Continues ``prompt`` with the KV cache; returns prompt + continuation as text."""
    prompt_tokens = np.asarray(self.tokenizer.encode(prompt), np.int32)[None]
    out = sampling.generate(
      self.model,
      self.model_params(params, frozen),
      prompt_tokens,
      max_new_tokens=max_new_tokens,
      temperature=temperature,
      rng=rng,
    )
    return self.tokenizer.decode(np.asarray(out[0]))


def _trunk_model(model: nn.Module) -> nn.Module:
  """``model`` without its multi-token heads (what a frozen trunk is loaded as)."""
  return type(model)(dataclasses.replace(model.config, mtp_heads=0))
