"""Chat supervised fine-tuning of a causal LM: ``task="sft"``.

``config.sft``: ``data`` (a glob of JSONL conversations, ``data/chat.py``), ``chat_template``
(``""``: the tokenizer folder's Hugging Face template where it has one, else the built-in;
``"builtin"``; or a ``.jinja`` / ``tokenizer_config.json`` path: ``chat.load_template``) and
``pad_id``. The
model starts from ``config.init_from`` (a pre-training run) and learns the assistant's turns: the
LM task's next-token loss, weighted by ``loss_mask`` (the assistant's content and its end marker)
on packed rows whose ``segment_ids`` keep conversations apart. It reports ``loss`` and
``accuracy`` over the assistant's tokens (no ``bpb``: that needs the bytes of those tokens).
The masked-diffusion LM has its own SFT (``task="diffusion"`` with ``config.diffusion.sft_data``).
"""

from absl import logging
import jax
import jax.numpy as jnp

from flaxseed.data import chat
from flaxseed.data import pipeline
from flaxseed.data import tokenizers
from flaxseed.training.tasks import base
from flaxseed.training.tasks import lm


class SFTTask(lm.LMTask):
  """The LM task on packed chat rows, with the loss on the assistant's tokens only."""

  def __init__(
    self, model, *, seq_len, data_config, options: dict, template=chat.BUILTIN, **lm_options
  ):
    super().__init__(model, seq_len=seq_len, data_config=data_config, **lm_options)
    self.options = options
    self.template = template

  @classmethod
  def from_config(cls, config) -> "SFTTask":
    if "sft" not in config:
      raise ValueError("config.task='sft' needs a config.sft section (configs/sft.py)")
    options = config.sft.to_dict()
    if not options["data"]:
      raise ValueError("config.sft.data is empty: a glob of JSONL files of conversations")
    model = base.build_model(config)
    if not 0 <= options["pad_id"] < model.config.vocab_size:
      raise ValueError(
        f"config.sft.pad_id={options['pad_id']} is outside [0, {model.config.vocab_size})"
      )
    template = chat.load_template(options["chat_template"], config.data.tokenizer)
    return cls(
      model,
      seq_len=config.seq_len,
      data_config=config.data,
      options=options,
      template=template,
      **cls.lm_options(config, model),
    )

  @property
  def tokenizer(self):
    return tokenizers.load(self.data_config.tokenizer)

  @property
  def bytes_per_token(self):
    return None

  def batch_spec(self, global_batch):
    shape = (global_batch, self.seq_len + 1)
    keys = ("tokens", "segment_ids", "positions", "loss_mask")
    return {k: jax.ShapeDtypeStruct(shape, jnp.int32) for k in keys}

  def datasets(self, **batching):
    train, evaluation, skipped = chat.chat_rows(
      self.options["data"],
      self.tokenizer,
      self.seq_len,
      pad_id=self.options["pad_id"],
      template=self.template,
    )
    logging.info("config.sft.data rendered with the %s chat template", self.template.name)
    skipped.warn("config.sft.data", self.seq_len + 1)
    return pipeline.train_and_eval(train, evaluation, row_len=self.seq_len + 1, **batching)
