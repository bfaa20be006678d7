"""Knowledge distillation of a trained teacher run into a student: ``task="distill"``.

``config.distill``: ``teacher_workdir`` (a flaxseed run: its ``config.json`` gives the teacher
model, its latest checkpoint the weights, frozen; or a Hugging Face folder: its ``config.json``
and safetensors, its tokenizer file the tokenizer to share), ``alpha``, ``temperature``,
``divergence`` (``forward_kl``, ``reverse_kl`` or ``jsd``), ``beta`` (JSD's mixture weight) and
``top_k`` (0: the full vocabulary). The student is ``config.model``, trained on the LM task's data
(the same corpus rows, packed) with, per target token,
``alpha * T² * D(teacher / T, student / T) + (1 - alpha) * CE(student, target)``
(``training/losses/distillation.py``). Teacher and student may differ in width and depth but must
share the tokenizer: a teacher with another ``vocab_size`` or ``data.tokenizer`` is refused
before compiling.

Logged: ``loss``, ``distill/soft`` (the divergence), ``distill/ce`` (the student's cross-entropy),
``accuracy``; evaluation adds the student's ``loss``/``bpb``/``accuracy`` (the LM task's) and
``distill/soft``.
"""

import os

import jax.numpy as jnp

from flaxseed.models import hf
from flaxseed.training import checkpoint
from flaxseed.training.losses import distillation
from flaxseed.training.tasks import base
from flaxseed.training.tasks import lm


class DistillTask(lm.LMTask):
  """The LM task's data and evaluation, with a frozen teacher's soft targets in the loss."""

  def __init__(self, model, teacher, *, seq_len, data_config, options: dict):
    super().__init__(model, seq_len=seq_len, data_config=data_config)
    self.teacher = teacher
    self.options = options

  @classmethod
  def from_config(cls, config) -> "DistillTask":
    if "distill" not in config:
      raise ValueError("config.task='distill' needs a config.distill section (configs/distill.py)")
    options = config.distill.to_dict()
    key = "config.distill.teacher_workdir"
    if not options["teacher_workdir"]:
      raise ValueError(f"{key} is empty: the flaxseed run to distill from")
    path = options["teacher_workdir"]
    teacher = base.model_from(path, key)
    model = base.build_model(config)
    teacher_vocab, vocab = teacher.config.vocab_size, model.config.vocab_size
    if hf.is_folder(path):
      teacher_tokenizer = hf.tokenizer_file(path)
    else:
      teacher_tokenizer = checkpoint.run_config(path).data.tokenizer
    if teacher_vocab != vocab or not _same_tokenizer(teacher_tokenizer, config.data.tokenizer):
      raise ValueError(
        f"{key}={options['teacher_workdir']!r}: the teacher's vocabulary (vocab_size="
        f"{teacher_vocab}, tokenizer {teacher_tokenizer!r}) is not the student's (vocab_size="
        f"{vocab}, config.data.tokenizer={config.data.tokenizer!r}); teacher and student must "
        "share the tokenizer"
      )
    try:
      distillation.check(
        options["divergence"],
        temperature=options["temperature"],
        alpha=options["alpha"],
        beta=options["beta"],
        top_k=options["top_k"],
        vocab=vocab,
      )
    except ValueError as e:
      raise ValueError(f"config.distill: {e}") from e
    return cls(model, teacher, seq_len=config.seq_len, data_config=config.data, options=options)

  def init(self, rng, batch):
    inputs = batch["tokens"][:, :-1]
    student = self.model.init(rng, inputs)["params"]
    teacher = self.teacher.init(rng, inputs)["params"]  # shapes only: load_frozen fills it
    return student, {"teacher": teacher}

  def load_frozen(self, abstract_frozen):
    params, _ = base.load_params(
      self.options["teacher_workdir"],
      self.teacher,
      abstract_frozen["teacher"],
      "config.distill.teacher_workdir",
    )
    return {"teacher": params}

  def _logits(self, model, params, batch):
    return model.apply(
      {"params": params},
      batch["tokens"][:, :-1],
      segment_ids=batch["segment_ids"][:, :-1],
      positions=batch["positions"][:, :-1],
    )

  def _terms(self, params, frozen, batch):
    """Per-token (loss, soft, hard, correct) and the LM task's target weights."""
    o = self.options
    student = self._logits(self.model, params, batch)
    teacher = self._logits(self.teacher, frozen["teacher"], batch)
    targets = batch["tokens"][:, 1:]
    total, soft, hard = distillation.loss(
      teacher,
      student,
      targets,
      alpha=o["alpha"],
      kind=o["divergence"],
      beta=o["beta"],
      temperature=o["temperature"],
      top_k=o["top_k"],
    )
    segments = batch["segment_ids"]
    weights = ((segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] != 0)).astype(jnp.float32)
    correct = (jnp.argmax(student, axis=-1) == targets).astype(jnp.float32)
    return total, soft, hard, correct, weights

  def loss(self, params, frozen, batch, rng):
    del rng
    total, soft, hard, correct, weights = self._terms(params, frozen, batch)
    count = jnp.maximum(weights.sum(), 1.0)
    mean = lambda x: (x * weights).sum() / count  # noqa: E731
    loss = mean(total)
    return loss, {
      "loss": loss,
      "distill/soft": mean(soft),
      "distill/ce": mean(hard),
      "accuracy": mean(correct),
    }

  def evaluate(self, params, frozen, batch, task_state):
    sums = super().evaluate(params, frozen, batch, task_state)  # the student as an LM
    _, soft, _, _, weights = self._terms(params, frozen, batch)
    sums["distill/soft"] = ((soft * weights).sum(), weights.sum())
    return sums

  def flops_per_token(self):
    teacher = self.teacher.config.flops_per_token(self.seq_len)
    return self.model.config.flops_per_token(self.seq_len) + teacher / 3  # + a forward pass


def _same_tokenizer(a: str | None, b: str) -> bool:
  """Whether two tokenizer specs (``"byte"`` or files) are one tokenizer: the same spec or two
  files with the same bytes (an HF folder's ``tokenizer.json`` copied elsewhere). ``a`` is
  ``None`` for a Hugging Face folder without a tokenizer file (an exported byte-level model):
  only its vocabulary size can be compared."""
  if a is None or a == b:
    return True
  if not (os.path.isfile(a) and os.path.isfile(b)):
    return False
  with open(a, "rb") as fa, open(b, "rb") as fb:
    return fa.read() == fb.read()
