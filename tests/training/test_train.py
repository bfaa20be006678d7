"""The training loop: learning, resume exactness, sharding invariance, errors, divergence."""

import json
import os
import struct

import jax
import numpy as np
import pytest

from flaxseed import training
from flaxseed.configs import common
from flaxseed.configs import lm
from flaxseed.training import metrics as metrics_lib
from flaxseed.training import trainer


def _config(**overrides):
  """The ``test`` variant of configs/lm.py with dotted-key overrides."""
  return common.override(lm.get_config("test"), **overrides)


def _tensorboard_tags(path):
  """Scalar tags in a TFRecord file of tensorboard Event protos (parsed without TensorFlow)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top

  tags = set()
  with open(path, "rb") as f:
    while header := f.read(12):
      (length,) = struct.unpack("<Q", header[:8])
      event = event_pb2.Event.FromString(f.read(length))
      f.read(4)
      tags.update(v.tag for v in event.summary.value)
  return tags


def test_tiny_model_learns_the_default_corpus(tmp_path, capsys, train_metrics):
  config = _config(
    **{
      "steps": 150,
      "batch_size": 16,
      "seq_len": 64,
      "log_every": 25,
      "eval_batches": 4,
      "model.d_model": 64,
      "model.num_heads": 4,
      "model.mlp_dim": 192,
      "optim.lr": 3e-3,
      "optim.warmup_steps": 20,
      "sample_tokens": 32,
    }
  )
  summary = training.train(config, str(tmp_path))
  # A byte-level model starts at ln(256) = 5.55 nats; learning the corpus means far below it.
  assert summary["eval/loss"] < 3.0, summary
  assert summary["eval/bpb"] == pytest.approx(summary["eval/loss"] / np.log(2), rel=1e-5)
  rows = train_metrics(tmp_path)
  assert rows[1]["loss"] > 5.0 and rows[150]["loss"] < 3.0
  for key in ("loss", "grad_norm", "learning_rate", "tokens_per_s", "step_time", "mfu"):
    assert key in rows[150], key
  tb_files = os.listdir(tmp_path / "tensorboard")
  assert {"loss", "eval/loss", "eval/bpb"} <= _tensorboard_tags(
    tmp_path / "tensorboard" / tb_files[0]
  )
  assert (tmp_path / "checkpoints" / "150").is_dir()
  assert json.loads((tmp_path / "config.json").read_text())["steps"] == 150
  out = capsys.readouterr().out
  assert "step 150/150 | loss" in out and "tok/s" in out and "MFU" in out
  assert "--- sample at step 150 ---\ndef " in out


def test_resume_equals_uninterrupted_bit_for_bit(tmp_path, losses):
  common = {"steps": 6, "checkpoint_every": 3, "optim.decay_steps": 6, "mesh.data": 1}
  training.train(_config(**common), str(tmp_path / "whole"))
  # The same run, stopped after 3 steps (same schedule), then restarted.
  training.train(_config(**{**common, "steps": 3}), str(tmp_path / "split"))
  training.train(_config(**common), str(tmp_path / "split"))
  whole, split = losses(tmp_path / "whole"), losses(tmp_path / "split")
  assert list(whole) == [1, 2, 3, 4, 5, 6]
  assert whole == split  # bit for bit, which also means the same data in the same order
  # And the final parameters are identical.
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  params = [
    ocp.StandardCheckpointer().restore(tmp_path / run / "checkpoints" / "6" / "state")["params"]
    for run in ("whole", "split")
  ]
  np.testing.assert_array_equal(params[0]["embed"]["embedding"], params[1]["embed"]["embedding"])


def test_a_resumed_run_drops_the_metrics_rows_it_redoes(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text(
    "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6))
    + '{"step": 6, "lo'
  )  # torn by a crash mid-write
  writer = metrics_lib.MetricsWriter(str(tmp_path), start_step=3)
  writer.write(4, {"loss": 0.5})
  writer.close()
  rows = [json.loads(line) for line in path.read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["loss"] == 0.5


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
  full = training.train(_config(steps=2, **{"mesh.data": 1}), str(tmp_path / "full"))
  accum = training.train(
    _config(steps=2, **{"mesh.data": 1, "optim.accum_steps": 4}), str(tmp_path / "accum")
  )
  # Micro-batch means of equal-sized micro-batches: same loss as the full batch up to rounding.
  assert accum["loss"] == pytest.approx(full["loss"], abs=1e-5)


def test_sharded_mesh_gives_the_same_losses(tmp_path, losses):
  one = losses(_run(tmp_path / "one", **{"mesh.data": 1}))
  mesh = losses(_run(tmp_path / "mesh", **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}))
  assert list(one) == [1, 2, 3]
  for step in one:
    assert mesh[step] == pytest.approx(one[step], abs=1e-5), (step, one, mesh)


def _run(workdir, **overrides):
  training.train(_config(steps=3, **overrides), str(workdir))
  return workdir


def test_divergence_stops_without_touching_the_last_good_checkpoint(tmp_path):
  training.train(_config(steps=4, checkpoint_every=2), str(tmp_path))
  # Resume with an absurd learning rate: parameters overflow within a step or two.
  with pytest.raises(training.NonFiniteLossError, match=r"last good checkpoint \(step 4\)"):
    training.train(_config(steps=8, checkpoint_every=1, **{"optim.lr": 1e30}), str(tmp_path))
  assert sorted(int(p) for p in os.listdir(tmp_path / "checkpoints")) == [2, 4]
  # The intact checkpoint still restores.
  restored = training.restore(_config(steps=4), str(tmp_path))
  assert restored.step == 4
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored.params))


@pytest.fixture
def no_compile(monkeypatch):
  """Fails the test if the train step would be compiled."""

  def refuse(*a, **k):
    raise AssertionError("compiled before rejecting the config")

  monkeypatch.setattr(trainer, "compile_train_step", refuse)


@pytest.mark.parametrize(
  "overrides,match",
  [
    ({"batch_size": 0}, r"config\.batch_size=0 must be positive"),
    ({"seq_len": -4}, r"config\.seq_len=-4 must be positive"),
    ({"model.d_model": -8}, r"config\.model: d_model must be positive"),
    ({"model.num_heads": 3}, r"num_heads=3 must divide d_model=32"),
    ({"mesh.data": 3}, r"config\.mesh=.* needs a multiple of 3 devices; there are 8"),
    ({"mesh.tensor": 0}, r"config\.mesh\.tensor=0"),
    ({"mesh.data": 4, "batch_size": 6}, r"config\.batch_size=6 must be divisible by mesh"),
    ({"optim.lr": -1.0}, r"config\.optim\.lr=-1\.0"),
    (
      {"mesh.tensor": 2, "mesh.data": 1, "model.mlp_dim": 63},
      r"parameter \['layers'\]\['mlp'\]\['down'\]\['kernel'\] "
      r"of shape \(2, 63, 32\) cannot be split 2",
    ),
    ({"data.corpus": "/nonexistent/*.txt"}, r"config\.data\.corpus='/nonexistent/\*\.txt'"),
    ({"data.tokenizer": "/nonexistent/tokenizer.json"}, r"config\.data\.tokenizer="),
    ({"model.vocab_size": 100}, r"vocab_size=100"),
    ({"model_family": "nope"}, r"unknown model family 'nope'"),
    ({"task": "nope"}, r"config\.task='nope'"),
  ],
)
def test_bad_config_is_rejected_before_compiling(tmp_path, no_compile, overrides, match):
  with pytest.raises(ValueError, match=match):
    training.train(_config(**overrides), str(tmp_path))


_PATTERN_RUN = {
  "steps": 3,
  "sample_tokens": 0,
  "seq_len": 48,
  "model.attention_pattern": ("sliding_window:16", "global"),
  "model.attention_interpret": True,
}


@pytest.fixture(scope="module")
def xla_pattern_run(tmp_path_factory):
  """The XLA-attention run the Pallas runs below follow (trained once for all of them)."""
  workdir = tmp_path_factory.mktemp("xla")
  training.train(_config(**_PATTERN_RUN, **{"model.attention_impl": "xla"}), str(workdir))
  return workdir


@pytest.mark.parametrize(
  "implementation,mesh",
  [
    ("pallas_tpu", (1, 1, 1)),
    ("pallas_gpu", (1, 1, 1)),
    ("pallas_tpu", (2, 2, 2)),  # batch and heads sharded: the kernel runs under shard_map
  ],
)
def test_pallas_attention_trains_like_xla(tmp_path, losses, xla_pattern_run, implementation, mesh):
  """The transformer with Pallas attention (interpret mode) follows the XLA run step for step;
  the layers alternate a sliding window and global attention (one scanned period of two)."""
  sharded = dict(zip(("mesh.data", "mesh.fsdp", "mesh.tensor"), mesh))
  training.train(
    _config(**_PATTERN_RUN, **sharded, **{"model.attention_impl": implementation}),
    str(tmp_path / implementation),
  )
  want, got = losses(xla_pattern_run), losses(tmp_path / implementation)
  assert sorted(got) == sorted(want) == [1, 2, 3]
  np.testing.assert_allclose(
    [got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=1e-5
  )


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """``(config, workdir, summary)`` of a finished 3-step run on one device."""
  workdir = tmp_path_factory.mktemp("finished")
  config = _config(steps=3, **{"mesh.data": 1})
  return config, str(workdir), training.train(config, str(workdir))


def test_restore_evaluates_like_the_end_of_training(tmp_path, finished_run):
  """``training.restore`` loads the last checkpoint; its eval equals the run's final eval, and it
  evaluates other parameter pytrees (here: the params quantized to int8) with the same batches."""
  from flaxseed.models import quantize  # pylint: disable=g-import-not-at-top

  config, workdir, summary = finished_run
  restored = training.restore(config, workdir)
  assert restored.step == 3
  metrics = restored.evaluate()
  assert metrics["eval/loss"] == pytest.approx(summary["eval/loss"], abs=1e-5)
  int8 = restored.evaluate(quantize.quantize_params(restored.params, fmt="int8"))
  assert int8["eval/loss"] == pytest.approx(metrics["eval/loss"], rel=0.01)
  assert int8["eval/loss"] != metrics["eval/loss"]
  with pytest.raises(ValueError, match="no checkpoint in"):
    training.restore(config, str(tmp_path / "empty"))


def test_init_from_another_run_starts_from_its_parameters(tmp_path, losses, finished_run):
  base_config, base_dir, _ = finished_run
  training.train(_config(steps=2, init_from=base_dir, **{"mesh.data": 1}), str(tmp_path / "tuned"))
  # The tuned run's first loss is the base's final parameters' loss on that run's first batch.
  restored = trainer.restore(base_config, base_dir)
  task = restored.setup.task
  train, _ = task.datasets(global_batch=8, rows=(0, 8), train_batches=1, eval_batches=1, seed=0)
  want, _ = task.loss(restored.params, {}, train[0], None)
  assert losses(tmp_path / "tuned")[1] == pytest.approx(float(want), rel=1e-5)
  with pytest.raises(ValueError, match="config.init_from='/nowhere'"):
    training.train(_config(steps=2, init_from="/nowhere"), str(tmp_path / "bad"))
