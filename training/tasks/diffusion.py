"""Masked-diffusion LM training (LLaDA / MDLM): pre-training on a corpus or SFT on JSONL rows."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxseed.data import corpus as corpus_lib
from flaxseed.data import pipeline
from flaxseed.data import sft
from flaxseed.data import tokenizers
from flaxseed.models import diffusion_lm
from flaxseed.training.tasks import base


class DiffusionTask(base.Task):
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
      raise ValueError(
        f"config.diffusion.random_length_prob={self.options['random_length_prob']}"
        " must be in [0, 1]"
      )
    self.sft = bool(self.options["sft_data"])

  @classmethod
  def from_config(cls, config) -> "DiffusionTask":
    if "diffusion" not in config:
      raise ValueError(
        "config.task='diffusion' needs a config.diffusion section (eps, "
        "antithetic, random_length_prob, sft_data)"
      )
    return cls(
      base.build_model(config),
      seq_len=config.seq_len,
      data_config=config.data,
      diffusion_config=config.diffusion,
    )

  @functools.cached_property
  def corpus(self) -> corpus_lib.Corpus:
    return corpus_lib.build_corpus(self.data_config, self.model.config.vocab_size)

  @functools.cached_property
  def tokenizer(self):
    return self.corpus.tokenizer if not self.sft else tokenizers.load(self.data_config.tokenizer)

  def batch_spec(self, global_batch):
    keys = ("tokens", "prompt_mask") if self.sft else ("tokens", "segment_ids", "positions")
    return {k: jax.ShapeDtypeStruct((global_batch, self.seq_len), jnp.int32) for k in keys}

  def datasets(self, *, global_batch, rows, train_batches, eval_batches, seed):
    if self.sft:
      train, evaluation = sft.sft_rows(
        self.options["sft_data"],
        self.tokenizer,
        self.seq_len,
        eos_id=self.model.config.eos_token_id,
      )
    else:
      train, evaluation = self.corpus.train, self.corpus.validation
    mask_id = self.model.config.mask_token_id
    for split in (train, evaluation):
      tokens = split.arrays["tokens"] if self.sft else split.tokens
      if tokens.size and (
        tokens.max() >= self.model.config.vocab_size or (tokens == mask_id).any()
      ):
        raise ValueError(
          f"the data has token ids equal to config.model.mask_token_id={mask_id} "
          f"or outside config.model.vocab_size={self.model.config.vocab_size}; "
          "the mask token must be an id the tokenizer never produces"
        )
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
      noise_rng,
      tokens,
      answer,
      mask_token_id=self.model.config.mask_token_id,
      eps=self.options["eps"],
      antithetic=self.options["antithetic"],
    )
    logits = self.model.apply({"params": params}, noisy, **model_kw)
    if self.sft:
      loss = diffusion_lm.sft_loss(logits, tokens, masked, p_mask, answer)
    else:
      loss = diffusion_lm.pretrain_loss(
        logits, tokens, masked, p_mask, num_tokens=jnp.maximum(answer.sum(), 1)
      )
    correct = (jnp.argmax(logits, axis=-1) == tokens) & masked
    return loss, {
      "loss": loss,
      "masked_accuracy": correct.sum() / jnp.maximum(masked.sum(), 1),
      "mask_rate": masked.sum() / jnp.maximum(answer.sum(), 1),
    }

  def evaluate(self, params, frozen, batch, task_state):
    del frozen, task_state
    tokens = batch["tokens"]
    answer, model_kw = self._inputs(batch)
    batch_size = tokens.shape[0]
    u_rng, mask_rng = jax.random.split(jax.random.fold_in(jax.random.key(0), tokens.sum()))
    # One mask per row; the rows are the strata: row b's count is 1 + floor(A (u + b / B mod 1)).
    u_B = jnp.mod(jax.random.uniform(u_rng, ()) + jnp.arange(batch_size) / batch_size, 1.0)
    masked, count = diffusion_lm.stratified_masks(mask_rng, u_B, jnp.zeros(1), 1, answer)
    nats = diffusion_lm.stratified_nats(
      self.model, params, tokens, masked, count, answer.sum(-1), **model_kw
    ).sum()
    scored = answer.sum().astype(jnp.float32)
    metrics = {"loss": (nats, scored)}
    if not self.sft:
      metrics["bpb"] = (nats / math.log(2) / self.corpus.bytes_per_token, scored)
    return metrics

  def flops_per_token(self):
    return self.model.config.flops_per_token(self.seq_len)

  def sample(
    self, params, prompt: str, *, max_new_tokens: int, temperature: float, rng, frozen=None
  ) -> str:
    """Prompt + ``max_new_tokens`` tokens of semi-autoregressive low-confidence sampling (blocks
    of 32 when that divides, one step per token), cut at the first EOS."""
    prompt_tokens = np.asarray(self.tokenizer.encode(prompt), np.int32)[None]
    block = 32 if max_new_tokens % 32 == 0 else max_new_tokens
    del frozen
    out = diffusion_lm.generate(
      self.model,
      params,
      prompt_tokens,
      gen_length=max_new_tokens,
      steps=max_new_tokens,
      block_length=block,
      temperature=temperature,
      rng=rng,
    )
    return self.tokenizer.decode(
      text_ids(np.asarray(out[0]), self.model.config, self.tokenizer.vocab_size)
    )


def text_ids(ids: np.ndarray, config, vocab_size: int) -> np.ndarray:
  """``ids`` up to the first EOS, without special ids the tokenizer does not have."""
  eos = np.flatnonzero(ids == config.eos_token_id)
  ids = ids[: eos[0]] if len(eos) else ids
  return ids[ids < vocab_size]
