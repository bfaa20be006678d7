"""The preference task in the loop: DPO's start at log 2, learning, resume, mesh, bad input."""

import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxseed import training
from flaxseed.configs import common
from flaxseed.configs import lm
from flaxseed.configs import preference as preference_configs
from flaxseed.data import preference as preference_data
from flaxseed.data import tokenizers
from flaxseed.training import trainer


def _write_pairs(path, n=200, seed=0):
  """``n`` pairs: a digit string, its sorted version chosen, a shuffled one rejected."""
  rng = np.random.default_rng(seed)
  with open(path, "w", encoding="utf-8") as f:
    for _ in range(n):
      digits = "".join(rng.choice(list("0123456789"), size=int(rng.integers(3, 7))))
      shuffled = "".join(rng.permutation(list(digits)))
      rejected = shuffled if shuffled != "".join(sorted(digits)) else digits[::-1] + "0"
      f.write(
        json.dumps(
          {"prompt": f"sort {digits}:", "chosen": "".join(sorted(digits)), "rejected": rejected}
        )
        + "\n"
      )
  return str(path)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
  return _write_pairs(tmp_path_factory.mktemp("pairs") / "pairs.jsonl")


def lm_test():
  return common.override(lm.get_config("test"), **{"mesh.data": 1, "sample_tokens": 0})


def _config(pairs, **overrides):
  c = preference_configs.get_config("test")
  c.preference.data = pairs
  return common.override(c, **{"mesh.data": 1, "sample_tokens": 0, **overrides})


def test_dpo_starts_at_log_2_learns_resumes_and_shards_exactly(tmp_path, pairs, resume_and_mesh):
  """40 steps; resumed at step 20 on one device and on the 2 x 2 x 2 mesh: the same losses (the
  frozen reference and the data position come back with the step)."""
  run = {"steps": 40, "checkpoint_every": 20, "optim.lr": 3e-3, "optim.decay_steps": 40}
  summary, whole = resume_and_mesh(_config(pairs, **run), tmp_path, half=20)
  assert whole[1] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 1
  assert whole[40] < 0.8 * math.log(2), whole  # the margin grows (beta=0.1: slowly)
  assert summary["eval/rewards/accuracy"] > 0.9, summary
  assert summary["eval/kl"] > 0


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
  """A pre-training run of the test model: the policy's (and reference's) ``init_from``."""
  workdir = tmp_path_factory.mktemp("base")
  training.train(lm_test(), str(workdir))
  return str(workdir)


def test_the_reference_is_the_init_from_run(tmp_path, pairs, base_run, losses):
  training.train(_config(pairs, steps=2, init_from=base_run), str(tmp_path / "dpo"))
  # The policy starts from the run's parameters and the reference is loaded from them: log 2.
  assert losses(tmp_path / "dpo")[1] == pytest.approx(math.log(2), abs=1e-6)
  # The reference is read again at every start: a resume may not point init_from elsewhere.
  shutil.copytree(base_run, tmp_path / "other")
  with pytest.raises(ValueError, match=r"init_from: '.*' -> '.*other'"):
    training.train(
      _config(pairs, steps=4, init_from=str(tmp_path / "other")), str(tmp_path / "dpo")
    )


def test_precomputed_reference_logps_give_the_frozen_references_losses(
  tmp_path, pairs, base_run, losses
):
  """``precompute_reference``: no reference in memory, the same losses (the reference's log-probs
  computed once, here on the 2 x 2 x 2 mesh, against the frozen reference on one device)."""
  run = {"steps": 3, "init_from": base_run}
  training.train(_config(pairs, **run), str(tmp_path / "frozen"))
  mesh = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
  config = _config(pairs, **run, **mesh, **{"preference.precompute_reference": True})
  assert trainer.setup(config).abstract_frozen == {}
  training.train(config, str(tmp_path / "precomputed"))
  want, got = losses(tmp_path / "frozen"), losses(tmp_path / "precomputed")
  assert got[1] == pytest.approx(math.log(2), abs=1e-6)
  assert list(got) == list(want)
  for step in want:
    assert got[step] == pytest.approx(want[step], abs=1e-5), (want, got)
  with pytest.raises(ValueError, match=r"precompute_reference: loss 'simpo' has no reference"):
    training.train(
      _config(
        pairs, **{**run, "preference.loss": "simpo", "preference.precompute_reference": True}
      ),
      str(tmp_path / "a"),
    )
  with pytest.raises(ValueError, match=r"precompute_reference needs config.init_from"):
    training.train(_config(pairs, **{"preference.precompute_reference": True}), str(tmp_path / "b"))


def _first_batch(s):
  train, _ = s.datasets()
  return {k: jax.device_put(v, s.batch_spec[k].sharding) for k, v in train[0].items()}


def test_gradients_reach_the_policy_never_the_reference(pairs):
  """The loss's gradient with respect to the frozen reference is exactly zero (it is read under
  ``stop_gradient``, and the loop differentiates only the trainable parameters)."""
  s = trainer.setup(_config(pairs))
  with s.context():
    frozen, params = s.frozen(), s.init().params
    batch = _first_batch(s)
    loss = lambda p, f: s.task.loss(p, f, batch, None)[0]  # noqa: E731
    to_policy, to_reference = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, frozen)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(to_policy)) > 0
  assert all(not np.asarray(g).any() for g in jax.tree.leaves(to_reference))


def test_dpo_on_lora_adapters_keeps_one_frozen_base(tmp_path, pairs, base_run, resume_and_mesh):
  """``configs/preference.py:test,lora``: only the adapters train; the reference is the frozen
  base with the initial adapters (no second copy), so DPO starts at log 2; resume and mesh as
  every task."""
  config = common.override(
    preference_configs.get_config("test,lora"),
    **{
      "preference.data": pairs,
      "init_from": base_run,
      "mesh.data": 1,
      "sample_tokens": 0,
      "steps": 4,
      "checkpoint_every": 2,
      "optim.decay_steps": 4,
      "optim.lr": 1e-2,
    },
  )
  s = trainer.setup(config)
  assert set(s.abstract_frozen) == {"base", "adapters0", "inner"}
  assert s.abstract_frozen["inner"] == {}  # the reference is not stored again
  assert {p[-1].key for p, _ in jax.tree_util.tree_leaves_with_path(s.abstract_state.params)} == {
    "a",
    "b",
  }
  base_size = sum(x.size for x in jax.tree.leaves(s.abstract_frozen["base"]))
  want = sum(x.size for x in jax.tree.leaves(trainer.restore(lm_test(), base_run).params))
  assert base_size == want  # one copy of the base
  _, whole = resume_and_mesh(config, tmp_path, half=2)
  assert whole[1] == pytest.approx(math.log(2), abs=1e-6)
  assert whole[4] < whole[1], whole
  # The frozen base the run trained against is the init_from run's parameters, untouched.
  restored = trainer.restore(config, str(tmp_path / "whole"))
  base_params = trainer.restore(lm_test(), base_run).params
  for a, b in zip(jax.tree.leaves(restored.frozen["base"]), jax.tree.leaves(base_params)):
    np.testing.assert_array_equal(a, b)


def test_a_reference_free_loss_holds_no_frozen_copy(tmp_path, pairs, losses):
  """SimPO (and ORPO) need no reference: the loop runs with empty frozen parameters. The other
  losses differ from DPO only in the formula, tested in test_losses.py."""
  config = _config(pairs, steps=3, **{"preference.loss": "simpo", "preference.beta": 2.0})
  assert trainer.setup(config).abstract_frozen == {}
  training.train(config, str(tmp_path))
  assert all(math.isfinite(v) for v in losses(tmp_path).values())


def test_pairs_that_do_not_fit_are_counted_not_cut(tmp_path):
  path = tmp_path / "p.jsonl"
  rows = [{"prompt": "p", "chosen": "ab", "rejected": "c"}] * 20
  rows += [{"prompt": "x" * 10, "chosen": "y" * 30, "rejected": "z"}] * 3
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  train, evaluation, skipped = preference_data.preference_rows(
    str(path), tokenizers.ByteTokenizer(), 15, eos_id=0
  )
  assert (skipped.count, skipped.total, skipped.longest) == (3, 23, 41)
  assert len(train.arrays["tokens"]) + len(evaluation.arrays["tokens"]) == 20
  # The chosen row: "p" then "ab" then EOS; the mask covers the completion and its EOS.
  np.testing.assert_array_equal(train.arrays["tokens"][0, 0, :4], [ord("p"), ord("a"), ord("b"), 0])
  np.testing.assert_array_equal(train.arrays["mask"][0, 0, :5], [0, 1, 1, 1, 0])
  with pytest.raises(ValueError, match=r"no pair fits seq_len \+ 1 = 2 tokens: 23 of 23 pairs"):
    preference_data.preference_rows(str(path), tokenizers.ByteTokenizer(), 1)
  (tmp_path / "empty.jsonl").write_text("\n")
  with pytest.raises(ValueError, match=r"empty.jsonl': the files hold no pairs"):
    preference_data.preference_rows(str(tmp_path / "empty.jsonl"), tokenizers.ByteTokenizer(), 15)


def test_bad_input_is_named(tmp_path, pairs):
  path = tmp_path / "bad.jsonl"
  path.write_text(
    '{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"\n'
  )
  with pytest.raises(ValueError, match=rf"config.preference.data: {path}:2: need a JSON object"):
    preference_data.preference_rows(str(path), tokenizers.ByteTokenizer(), 16)
  with pytest.raises(ValueError, match=r"config.preference.loss='dpo' is not one of"):
    training.train(_config(pairs, **{"preference.loss": "dpo"}), str(tmp_path / "a"))
  with pytest.raises(ValueError, match=r"config.preference.data is empty"):
    training.train(
      _config(
        "",
      ),
      str(tmp_path / "b"),
    )
  with pytest.raises(ValueError, match=r"config.preference: beta must be positive"):
    training.train(_config(pairs, **{"preference.beta": float("nan")}), str(tmp_path / "c"))


def test_kto_starts_at_one_half_and_reads_unpaired_examples(tmp_path, losses):
  """At the reference every log-ratio and the KL estimate are 0: each example's loss is
  w (1 - σ(0)) = 1/2 with unit weights (also the loop's first loss)."""
  rng = np.random.default_rng(1)
  path = tmp_path / "kto.jsonl"
  with open(path, "w", encoding="utf-8") as f:
    for i in range(200):
      digits = "".join(rng.choice(list("0123456789"), size=4))
      good = i % 2 == 0
      completion = "".join(sorted(digits)) if good else digits[::-1]
      f.write(json.dumps({"prompt": f"sort {digits}:", "completion": completion, "label": good}))
      f.write("\n")
  train, _, _ = preference_data.kto_rows(str(path), tokenizers.ByteTokenizer(), 32)
  # Row 1 is row 0's prompt with the next example's completion.
  assert (train.arrays["tokens"][0, 1, :10] == train.arrays["tokens"][0, 0, :10]).all()
  np.testing.assert_array_equal(train.arrays["label"][:4, 0], [1, 0, 1, 0])
  config = _config(str(path), steps=3, **{"preference.loss": "kto"})
  training.train(config, str(tmp_path / "run"))
  assert losses(tmp_path / "run")[1] == pytest.approx(0.5, abs=1e-6)
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "a", "completion": "b", "label": "yes"}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:1: label must be true or false"):
    preference_data.kto_rows(str(bad), tokenizers.ByteTokenizer(), 32)
