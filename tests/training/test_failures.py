"""Failure modes of ``train`` (docs/reliability.md): what is refused before compiling, what a resume
may change, damaged checkpoints, the workdir lock, the schedule as configured."""

import json
import logging
import os
import shutil

import numpy as np
import pytest

from flaxseed import training
from flaxseed.configs import common
from flaxseed.configs import lm
from flaxseed.configs import lora as lora_configs
from flaxseed.training import optim
from flaxseed.training import trainer
from flaxseed.training import workdir as workdir_lib


def _config(**overrides):
  return common.override(lm.get_config("test"), **{"mesh.data": 1, **overrides})


@pytest.fixture
def no_compile(monkeypatch):
  """Fails the test if the train step would be compiled."""

  def refuse(*a, **k):
    raise AssertionError("compiled before rejecting the run")

  monkeypatch.setattr(trainer, "compile_train_step", refuse)


# Checkpoints at steps 3 and 6; the same schedule whatever `steps` a resume asks for.
_RUN = {"steps": 6, "checkpoint_every": 3, "optim.decay_steps": 6, "sample_tokens": 0}


@pytest.fixture(scope="module")
def run6(tmp_path_factory, losses):
  """``(workdir, losses)`` of an uninterrupted 6-step run; tests copy it before touching it."""
  workdir = tmp_path_factory.mktemp("run6")
  training.train(_config(**_RUN), str(workdir))
  return workdir, losses(workdir)


def _copy(run, tmp_path):
  shutil.copytree(run, tmp_path / "run")
  return tmp_path / "run"


@pytest.mark.parametrize(
  "overrides,named",
  [
    ({"model.num_layers": 3}, "model.num_layers: 2 -> 3"),
    ({"seq_len": 64}, "seq_len: 32 -> 64"),
    ({"batch_size": 16, "data.corpus": "default:prose"}, "data.corpus: 'default' ->"),
  ],
)
def test_resume_with_another_config_is_refused_before_compiling_and_keeps_config_json(
  tmp_path, run6, no_compile, overrides, named
):
  workdir = _copy(run6[0], tmp_path)
  stored = (workdir / "config.json").read_text()
  with pytest.raises(ValueError, match="holds a checkpoint of a run with another config") as e:
    training.train(_config(**_RUN, **overrides), str(workdir))
  assert named in str(e.value)
  if "batch_size" in overrides:  # every difference is listed, not only the first
    assert "batch_size: 8 -> 16" in str(e.value)
  assert (workdir / "config.json").read_text() == stored


def test_keys_a_resume_may_change():
  stored = json.loads(_config().to_json_best_effort())
  changed = _config(
    steps=99, eval_every=5, **{"mesh.data": 2, "sample_prompt": "x", "optim.lr": 0.1}
  )
  assert workdir_lib.config_differences(stored, json.loads(changed.to_json_best_effort())) == []
  assert workdir_lib.config_differences(stored, json.loads(_config(seed=1).to_json_best_effort()))


@pytest.mark.parametrize("damage", ["truncated array", "missing data file", "no commit marker"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(
  tmp_path, run6, losses, caplog, damage
):
  workdir = _copy(run6[0], tmp_path)
  step6 = workdir / "checkpoints" / "6"
  if damage == "truncated array":
    arrays = [p for p in (step6 / "state").rglob("*") if p.is_file()]
    biggest = max(arrays, key=lambda p: p.stat().st_size)
    os.truncate(biggest, 10)
  elif damage == "missing data file":
    (step6 / "data" / "process_0-of-1.json").unlink()
  else:  # a half copy: everything but the marker orbax writes last
    (step6 / "commit_success.txt").unlink()
  with caplog.at_level(logging.WARNING):
    training.train(_config(**_RUN), str(workdir))
  assert "checkpoint step 6" in caplog.text and "skipped" in caplog.text
  resumed = losses(workdir)
  assert resumed == run6[1]  # steps 4-6 redone from step 3 equal the uninterrupted run's
  assert (workdir / "damaged_checkpoints" / "6").is_dir()
  assert (workdir / "checkpoints" / "6" / "commit_success.txt").exists()


def test_no_intact_checkpoint_is_an_error_not_a_fresh_start(tmp_path, run6, no_compile):
  workdir = _copy(run6[0], tmp_path)
  for step in ("3", "6"):
    (workdir / "checkpoints" / step / "commit_success.txt").unlink()
  with pytest.raises(ValueError, match=r"no intact checkpoint in .*step 6: no commit_success"):
    training.train(_config(**_RUN), str(workdir))


def test_init_from_a_run_of_another_shape_is_refused_before_compiling(tmp_path, run6, no_compile):
  with pytest.raises(ValueError, match=r"config.init_from=.*do not fit this model.*missing"):
    training.train(
      _config(init_from=str(run6[0]), **{"model.num_layers": 3, "model.scan_layers": False}),
      str(tmp_path),
    )
  with pytest.raises(ValueError, match=r"config.init_from=.*shape \(256, 32\) != \(256, 48\)"):
    training.train(
      _config(init_from=str(run6[0]), **{"model.d_model": 48, "model.mlp_dim": 96}),
      str(tmp_path / "wide"),
    )


def test_lora_base_without_a_checkpoint_is_refused_before_compiling(tmp_path, run6, no_compile):
  base = tmp_path / "base"
  base.mkdir()
  shutil.copy(run6[0] / "config.json", base / "config.json")  # a run that never saved
  config = lora_configs.get_config("test")
  config.lora.base_workdir, config.mesh.data = str(base), 1
  with pytest.raises(ValueError, match=r"config.lora.base_workdir=.*no complete checkpoint"):
    training.train(config, str(tmp_path / "lora"))


def test_a_workdir_that_is_a_file_is_an_error(tmp_path, no_compile):
  path = tmp_path / "file"
  path.write_text("not a directory")
  with pytest.raises(ValueError, match=r"workdir '.*file' exists and is not a directory"):
    training.train(_config(), str(path))


def test_a_locked_workdir_is_refused_naming_the_holder(tmp_path, no_compile):
  with workdir_lib.Lock(str(tmp_path)):
    with pytest.raises(workdir_lib.WorkdirLockedError, match=rf"in use by pid {os.getpid()} on"):
      training.train(_config(), str(tmp_path))
  assert (tmp_path / "lock").read_text() == ""  # released


def test_a_stale_lock_is_broken_with_a_message(tmp_path, caplog):
  holder = {"pid": 2**22 + 7, "host": "gone", "started": "2026-01-01T00:00:00"}
  (tmp_path / "lock").write_text(json.dumps(holder))  # a run killed -9: no flock holds it
  with caplog.at_level(logging.WARNING):
    lock = workdir_lib.Lock(str(tmp_path))
  assert f"broke the stale lock of pid {holder['pid']} on gone" in caplog.text
  assert json.loads((tmp_path / "lock").read_text())["pid"] == os.getpid()
  lock.release()


def test_a_warmup_longer_than_the_schedule_is_honoured_not_clamped():
  config = _config(steps=5, **{"optim.warmup_steps": 10, "optim.lr": 1.0})
  lr = optim.schedule(config.optim, config.steps)
  np.testing.assert_allclose([lr(s) for s in (0, 5, 10)], [0.0, 0.5, 1.0], rtol=1e-6)
  # Within the schedule, the usual warmup then cosine decay.
  config = _config(steps=20, **{"optim.warmup_steps": 10, "optim.lr": 1.0})
  lr = optim.schedule(config.optim, config.steps)
  np.testing.assert_allclose([lr(5), lr(10), lr(20)], [0.5, 1.0, 0.1], rtol=1e-5)


def test_a_resume_may_lower_the_learning_rate_and_turn_off_clipping(tmp_path, run6, losses):
  workdir = _copy(run6[0], tmp_path)
  changed = {**_RUN, "steps": 8, "optim.lr": 1e-4, "optim.grad_clip": 0.0}
  training.train(_config(**changed), str(workdir))
  resumed = losses(workdir)
  assert [resumed[s] for s in range(1, 7)] == [run6[1][s] for s in range(1, 7)]
  assert sorted(resumed) == list(range(1, 9))
  assert json.loads((workdir / "config.json").read_text())["optim"]["lr"] == 1e-4


def test_a_run_config_that_is_not_json_is_named(tmp_path):
  from flaxseed.training import checkpoint  # pylint: disable=g-import-not-at-top

  (tmp_path / "config.json").write_text('{"model": {"d_model": 3')  # torn by a crash mid-write
  with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
    checkpoint.run_config(str(tmp_path))
