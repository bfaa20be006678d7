"""The SAE task in the shared loop: decoder constraint, data-dependent init, task state through
resume and sharding, a trained model from another run, and cached == on-the-fly activations."""

import json

import jax
import numpy as np
import pytest

from flaxseed import training
from flaxseed.configs import common
from flaxseed.configs import lm as lm_configs
from flaxseed.configs import sae as sae_configs
from flaxseed.models import sae
from flaxseed.models import sites
from flaxseed.training import activations
from flaxseed.training import tasks
from flaxseed.training import trainer


def _config(**overrides):
  return common.override(sae_configs.get_config("test"), **overrides)


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
  """A corpus small enough to cache whole: a few generated text files."""
  root = tmp_path_factory.mktemp("corpus")
  rng = np.random.default_rng(0)
  words = ["alpha", "beta", "gamma", "delta", "def", "return", "(x)", "the", "of", "\n"]
  for i in range(3):
    (root / f"doc{i}.txt").write_text(" ".join(rng.choice(words, 4000)))
  return str(root / "*.txt")


def _setup(config):
  """(setup, train batches on device) of ``config`` in this process."""
  s = trainer.setup(config)
  train, _ = s.task.datasets(
    global_batch=config.batch_size,
    rows=(0, config.batch_size),
    train_batches=config.steps,
    eval_batches=config.eval_batches,
    seed=config.seed,
  )
  batches = [
    {k: jax.device_put(v, s.batch_spec[k].sharding) for k, v in train[t].items()}
    for t in range(config.steps)
  ]
  return s, batches


def test_decoder_stays_unit_norm_b_dec_starts_at_the_median_and_the_sae_learns():
  config = _config(steps=40, **{"mesh.data": 1, "optim.lr": 1e-2})
  s, batches = _setup(config)
  with s.context():
    state, frozen = s.init(), s.frozen()
    state = s.prepare(state, frozen, batches[0])
    x = s.task.activations(frozen, batches[0])
    np.testing.assert_allclose(state.params["b_dec"], sae.geometric_median(x), atol=1e-6)
    step = s.train_step.lower(s.abstract_state, s.abstract_frozen, s.batch_spec).compile()
    losses = []
    for batch in batches:
      state, metrics = step(state, frozen, batch)
      norms = np.linalg.norm(np.asarray(state.params["w_dec"]), axis=-1)
      np.testing.assert_allclose(norms, 1.0, atol=1e-5)
      assert float(metrics["l0"]) == 4.0  # TopK: exactly k
      losses.append(float(metrics["mse"]))
  assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:5]), losses  # learns (about 0.5)
  since = np.asarray(state.task_state["tokens_since_fired"])
  assert since.shape == (128,) and since.min() == 0 and since.max() <= 40 * 8 * 32


def test_resume_equals_uninterrupted_with_the_task_state(tmp_path, losses):
  shared = {
    "steps": 6,
    "checkpoint_every": 3,
    "optim.decay_steps": 6,
    "mesh.data": 1,
    "model.arch": "batch_topk",
    "sae.dead_window": 64,
  }
  training.train(_config(**shared), str(tmp_path / "whole"))
  training.train(_config(**{**shared, "steps": 3}), str(tmp_path / "split"))
  training.train(_config(**shared), str(tmp_path / "split"))
  assert losses(tmp_path / "whole") == losses(tmp_path / "split")
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  states = [
    ocp.StandardCheckpointer().restore(tmp_path / run / "checkpoints" / "6" / "state")["task_state"]
    for run in ("whole", "split")
  ]
  for key in ("tokens_since_fired", "threshold", "norm_scale"):
    np.testing.assert_array_equal(states[0][key], states[1][key])
  assert float(states[0]["threshold"]) > 0  # BatchTopK's inference threshold moved


def test_sharded_mesh_gives_the_same_losses(tmp_path, losses):
  overrides = {"steps": 3, "model.normalize_activations": "constant_norm_rescale"}
  training.train(_config(**overrides, **{"mesh.data": 1}), str(tmp_path / "one"))
  training.train(
    _config(**overrides, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}),
    str(tmp_path / "mesh"),
  )
  one, mesh = losses(tmp_path / "one"), losses(tmp_path / "mesh")
  assert list(one) == [1, 2, 3]
  for step in one:
    assert mesh[step] == pytest.approx(one[step], rel=1e-5), (step, one, mesh)


def test_reads_a_trained_model_from_its_workdir(tmp_path):
  lm_config = common.override(
    lm_configs.get_config("test"),
    **{"model.scan_layers": False, "steps": 2, "sample_tokens": 0, "mesh.data": 1},
  )
  training.train(lm_config, str(tmp_path / "lm"))
  config = _config(**{"sae.lm_workdir": str(tmp_path / "lm"), "mesh.data": 1})
  restored = trainer.restore(lm_config, str(tmp_path / "lm"))
  s, _ = _setup(config)
  frozen = s.frozen()
  assert s.task.lm.config.d_model == 32 and not s.task.lm.config.scan_layers
  for want, got in zip(jax.tree.leaves(restored.params), jax.tree.leaves(frozen["lm"])):
    np.testing.assert_array_equal(want, got)
  summary = training.train(config, str(tmp_path / "sae"))
  assert 0 < summary["eval/fvu"] < 2 and summary["eval/l0"] == 4.0

  with pytest.raises(ValueError, match="config.json"):
    tasks.build(_config(**{"sae.lm_workdir": str(tmp_path / "nothing")}))
  with pytest.raises(ValueError, match="config.model.d_in=16"):
    trainer.setup(_config(**{"model.d_in": 16}))
  with pytest.raises(ValueError, match="layers_9/resid_post"):
    bad = _config(**{"sae.site": "layers_9/resid_post"})
    trainer.setup(bad)


def test_cached_activations_equal_those_computed_on_the_fly(tmp_path, small_corpus, losses):
  shared = {"data.corpus": small_corpus, "steps": 3, "mesh.data": 1}
  meta = activations.write(_config(**shared), str(tmp_path / "cache"))
  assert meta["rows"]["train"] > 100 and meta["site"] == "layers_0/resid_post"
  cached = _config(**shared, **{"sae.activations": str(tmp_path / "cache")})
  s_fly, fly = _setup(_config(**shared))
  _, from_cache = _setup(cached)
  with s_fly.context():
    frozen = s_fly.frozen()
    for a, b in zip(fly, from_cache):
      np.testing.assert_array_equal(a["tokens"], b["tokens"])  # the same rows, same order
      want = sites.capture(
        s_fly.task.lm,
        {"params": frozen["lm"]},
        a["tokens"],
        "layers_0/resid_post",
        segment_ids=a["segment_ids"],
        positions=a["positions"],
      )
      np.testing.assert_allclose(b["acts"], want, atol=1e-5)
  training.train(_config(**shared), str(tmp_path / "fly"))
  training.train(cached, str(tmp_path / "cached"))
  fly_losses, cached_losses = losses(tmp_path / "fly"), losses(tmp_path / "cached")
  for step in fly_losses:
    assert cached_losses[step] == pytest.approx(fly_losses[step], rel=1e-5)

  subset = activations.write(_config(**shared), str(tmp_path / "subset"), max_rows=20)
  assert subset["rows"] == {"train": 20, "validation": 20}
  rows = np.load(tmp_path / "subset" / "train.rows.npy")
  assert rows[0] == 0 and rows[-1] > meta["rows"]["train"] // 2  # spread over the split
  with pytest.raises(ValueError, match="config.sae.activations.*seq_len=32"):
    tasks.build(common.override(cached, seq_len=16))
  with pytest.raises(ValueError, match="config.sae.activations.*meta.json"):
    tasks.build(_config(**{"sae.activations": str(tmp_path)}))
  assert json.loads((tmp_path / "cache" / "meta.json").read_text())["d_in"] == 32
