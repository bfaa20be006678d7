"""The distillation task in the loop: zero loss against itself, resume, mesh, bad teachers."""

import pytest

from flaxseed import training
from flaxseed.configs import common
from flaxseed.configs import distill as distill_configs
from flaxseed.configs import lm
from flaxseed.configs import lora as lora_configs


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  """A finished 4-step run of configs/lm.py:test (the teacher, and the student's twin)."""
  workdir = tmp_path_factory.mktemp("teacher")
  config = common.override(lm.get_config("test"), **{"mesh.data": 1, "sample_tokens": 0})
  training.train(config, str(workdir))
  return str(workdir)


def _config(teacher, **overrides):
  c = distill_configs.get_config("test")
  c.distill.teacher_workdir = teacher
  return common.override(c, **{"mesh.data": 1, "sample_tokens": 0, **overrides})


@pytest.mark.parametrize("source,lora", [("run", False), ("hf", False), ("run", True)])
def test_a_student_equal_to_its_teacher_has_zero_loss_at_alpha_1(
  tmp_path, teacher, losses, source, lora
):
  """The loop feeds the loss the teacher's weights (every divergence is 0 at equality: see
  test_losses.py), from a run or a Hugging Face folder; as LoRA adapters on the teacher's weights
  (fresh adapters change nothing), the teacher is the wrapped task's own frozen entry."""
  if source == "hf":
    pytest.importorskip("safetensors")
    from flaxseed.models import hf  # pylint: disable=g-import-not-at-top

    restored = training.restore(_config(teacher), teacher)
    hf.to_pretrained(restored.setup.task.model, restored.params, str(tmp_path / "hf"))
    teacher = str(tmp_path / "hf")
  config = _config(
    teacher,
    steps=1,
    init_from=teacher,
    **{"distill.alpha": 1.0, "distill.temperature": 2.0, "distill.divergence": "jsd"},
  )
  if lora:
    config.lora = lora_configs.section()
  summary = training.train(config, str(tmp_path / "run"))
  tmp_path = tmp_path / "run"
  assert losses(tmp_path)[1] == pytest.approx(0.0, abs=1e-6)
  assert summary["distill/ce"] > 1.0  # the hard term is there, weighted 0


def test_resume_and_mesh_give_the_same_losses(tmp_path, teacher, resume_and_mesh):
  # A student narrower than its teacher, on the teacher's top 8 tokens.
  student = {"model.d_model": 16, "model.mlp_dim": 32, "distill.top_k": 8}
  run = {"steps": 4, "checkpoint_every": 2, "optim.decay_steps": 4, **student}
  resume_and_mesh(_config(teacher, **run), tmp_path, half=2)


@pytest.mark.parametrize(
  "overrides,match",
  [
    ({"model.vocab_size": 300}, r"teacher and student must share the tokenizer"),
    ({"distill.divergence": "kl"}, r"config.distill: divergence='kl' is not one of"),
    ({"distill.top_k": 999}, r"config.distill: top_k must be an integer in \[0, 256\]"),
    ({"distill.teacher_workdir": ""}, r"config.distill.teacher_workdir is empty"),
  ],
)
def test_bad_teachers_and_options_are_refused_before_compiling(
  tmp_path, teacher, overrides, match, monkeypatch
):
  from flaxseed.training import trainer  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(trainer, "compile_train_step", lambda *a: pytest.fail("compiled"))
  with pytest.raises(ValueError, match=match):
    training.train(_config(teacher, **overrides), str(tmp_path))
