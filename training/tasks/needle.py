"""Associative recall beyond the attention window (``data/needle.py``'s rows): Titans' probe."""

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np

from flaxseed.data import needle
from flaxseed.training.tasks import base


class NeedleTask(base.Task):
  """Associative recall beyond the attention window: a long-context probe (experiments/titans).

  A row is filler with ``num_pairs`` key-value pairs written as ``PAIR k v`` in its first
  ``region`` fraction, ending in ``QUERY k v`` for every key in a random order (multi-query
  associative recall): after each ``QUERY k`` the model must emit that key's value. Only those
  predictions are scored (``loss``, ``accuracy``). ``config.needle`` holds
  ``num_pairs``, ``num_keys``, ``num_values`` and ``region``; ``data.needle.rows`` makes rows of any
  length, so a model trained at one length can be evaluated at others.
  """

  def __init__(self, model: nn.Module, *, seq_len: int, needle_config):
    self.model = model
    self.seq_len = seq_len
    self.needle = dict(needle_config)
    needle.rows(np.random.default_rng(0), 1, seq_len + 1, **self.needle)  # validates the config

  @classmethod
  def from_config(cls, config) -> "NeedleTask":
    if "needle" not in config:
      raise ValueError(
        "config.task='needle' needs a config.needle section (num_pairs, num_keys, "
        "num_values, region)"
      )
    return cls(base.build_model(config), seq_len=config.seq_len, needle_config=config.needle)

  def batch_spec(self, global_batch):
    return {"tokens": jax.ShapeDtypeStruct((global_batch, self.seq_len + 1), jnp.int32)}

  def datasets(self, *, global_batch, rows, train_batches, eval_batches, seed):
    def make(offset, num_batches):
      def batch(t):
        rng = np.random.default_rng([offset, t])  # the global batch t, whoever asks for it
        tokens = needle.rows(rng, global_batch, self.seq_len + 1, **self.needle)
        return {"tokens": tokens[rows[0] : rows[1]]}

      return grain.MapDataset.range(num_batches).map(batch)

    return make(seed, train_batches), make(2**31 - 1, eval_batches)  # eval rows never trained on

  def init(self, rng, batch):
    return self.model.init(rng, batch["tokens"][:, :-1])["params"], {}

  def predictions(self, params, tokens):
    """(nll, correct) ``[B, num_pairs]`` of the values asked for at the end of rows
    ``[B, L + 1]``."""
    values = needle.answer_positions(tokens.shape[1], self.needle["num_pairs"])
    logits = self.model.apply({"params": params}, tokens[:, :-1])[:, values - 1]
    target = tokens[:, values]
    nll = (
      jax.nn.logsumexp(logits, axis=-1)
      - jnp.take_along_axis(logits, target[..., None], axis=-1)[..., 0]
    )
    return nll, (jnp.argmax(logits, axis=-1) == target).astype(jnp.float32)

  def loss(self, params, frozen, batch, rng):
    del frozen, rng
    nll, correct = self.predictions(params, batch["tokens"])
    return nll.mean(), {"loss": nll.mean(), "accuracy": correct.mean()}

  def evaluate(self, params, frozen, batch, task_state):
    del frozen, task_state
    nll, correct = self.predictions(params, batch["tokens"])
    count = jnp.asarray(nll.size, jnp.float32)
    return {"loss": (nll.sum(), count), "accuracy": (correct.sum(), count)}

  def flops_per_token(self):
    return self.model.config.flops_per_token(self.seq_len)
