"""Next-token prediction on packed rows of a text corpus: the language-model task."""

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
    return cls(
      base.build_model(config),
      seq_len=config.seq_len,
      data_config=config.data,
      z_loss=config.z_loss,
    )

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
    return self.model.init(rng, inputs)["params"], {}

  def _nll(self, params, frozen, batch):
    """Per-token negative log-likelihood, logsumexp, correctness and target weights."""
    tokens, segments = batch["tokens"], batch["segment_ids"]
    logits = self.model.apply(
      {"params": self.model_params(params, frozen)},
      tokens[:, :-1],
      segment_ids=segments[:, :-1],
      positions=batch["positions"][:, :-1],
    )
    targets = tokens[:, 1:]
    weights = ((segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] != 0)).astype(jnp.float32)
    if "loss_mask" in batch:  # only some targets count (chat SFT: the assistant's tokens)
      weights = weights * batch["loss_mask"][:, 1:].astype(jnp.float32)
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

  def evaluate(self, params, frozen, batch, task_state):
    del task_state
    nll, _, correct, weights = self._nll(params, frozen, batch)
    count = weights.sum()
    nll_sum = (nll * weights).sum()
    sums = {"loss": (nll_sum, count), "accuracy": ((correct * weights).sum(), count)}
    if self.bytes_per_token is not None:
      sums["bpb"] = (nll_sum / math.log(2) / self.bytes_per_token, count)
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
