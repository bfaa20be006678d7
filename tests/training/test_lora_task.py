"""The LoRA task in the shared loop: only adapters train, the base comes from another run,
fresh adapters leave the model's loss unchanged, resume and sharding invariance, QLoRA."""

import functools
import re
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from flaxseed import training
from flaxseed.configs import common
from flaxseed.configs import lm as lm_configs
from flaxseed.configs import lora as lora_configs
from flaxseed.configs import sae as sae_configs
from flaxseed.models import params as params_lib
from flaxseed.training import tasks
from flaxseed.training import trainer


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
  """A scanned two-layer model trained a few steps on the prose half."""
  workdir = tmp_path_factory.mktemp("base")
  config = common.override(
    lm_configs.get_config("test"),
    **{"steps": 3, "sample_tokens": 0, "mesh.data": 1, "data.corpus": "default:prose"},
  )
  training.train(config, str(workdir))
  return config, str(workdir)


def _config(**overrides):
  return common.override(lora_configs.get_config("test"), **{"sample_tokens": 0, **overrides})


def _first_batch(s, config):
  train, _ = s.task.datasets(
    global_batch=config.batch_size,
    rows=(0, config.batch_size),
    train_batches=1,
    eval_batches=1,
    seed=config.seed,
  )
  return {k: jax.device_put(v, s.batch_spec[k].sharding) for k, v in train[0].items()}


# The variants whose ``prepare`` depends on the real base: DoRA's norms, PiSSA's SVD (plain LoRA
# and rsLoRA differ from DoRA only by their scale; tests/models/test_lora.py covers each).
@pytest.mark.parametrize("variant,init", [("dora", "default"), ("lora", "pissa")])
def test_fresh_adapters_on_a_trained_base_leave_its_loss_unchanged(base_run, variant, init):
  base_config, base_dir = base_run
  config = _config(
    **{"lora.base_workdir": base_dir, "lora.variant": variant, "lora.init": init, "mesh.data": 1}
  )
  s = trainer.setup(config)
  restored = trainer.restore(base_config, base_dir)
  with s.context():
    frozen = s.frozen()
    batch = _first_batch(s, config)
    state = s.prepare(s.init(), frozen, batch)
    got, _ = s.task.loss(state.params, frozen, batch, None)
    want, _ = tasks.LMTask(s.task.model, seq_len=config.seq_len, data_config=config.data).loss(
      restored.params, {}, batch, None
    )
  np.testing.assert_allclose(got, want, rtol=1e-5)
  if init == "default":  # the frozen base is the trained model itself
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(frozen["base"])):
      np.testing.assert_array_equal(a, b)


def test_only_adapters_train_and_are_saved(base_run, tmp_path, losses):
  _, base_dir = base_run
  config = _config(**{"lora.base_workdir": base_dir, "steps": 6, "mesh.data": 1, "optim.lr": 1e-2})
  summary = training.train(config, str(tmp_path))
  saved = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / "6" / "state")
  adapter_shapes = sorted(x.shape for x in jax.tree.leaves(saved["params"]))
  assert set(saved["params"]["layers"]) == {"attn", "mlp"}
  assert all(
    set(leaf) <= {"a", "b"}
    for group in saved["params"]["layers"].values()
    for kernel in group.values()
    for leaf in kernel.values()
  )
  num_adapter = sum(np.prod(s) for s in adapter_shapes)
  # AdamW's two moments per adapter leaf and a step count: nothing of the base's size.
  opt_leaves = [x for x in jax.tree.leaves(saved["opt_state"]) if x.ndim]
  assert sorted(x.shape for x in opt_leaves) == sorted(adapter_shapes * 2)
  # rank x (in + out) for every attention and MLP kernel of the base, nothing else.
  base = ocp.StandardCheckpointer().restore(f"{base_dir}/checkpoints/3/state")["params"]
  want = 0
  for path in params_lib.param_paths(base):
    if re.fullmatch(config.lora.targets, path):
      shape = functools.reduce(lambda t, k: t[k], path.split("/"), base).shape[1:]
      n = params_lib.zoo_num_in(path)
      want += 2 * 8 * (np.prod(shape[:n]) + np.prod(shape[n:]))  # 2 stacked layers, rank 8
  assert num_adapter == want
  rows = losses(tmp_path)
  assert rows[6] < rows[1] and np.isfinite(summary["eval/loss"])


def test_resume_equals_uninterrupted(base_run, tmp_path, losses):
  _, base_dir = base_run
  shared = {
    "lora.base_workdir": base_dir,
    "lora.variant": "dora",
    "steps": 4,
    "checkpoint_every": 2,
    "optim.decay_steps": 4,
    "mesh.data": 1,
  }
  training.train(_config(**shared), str(tmp_path / "whole"))
  training.train(_config(**{**shared, "steps": 2}), str(tmp_path / "split"))
  training.train(_config(**shared), str(tmp_path / "split"))
  assert losses(tmp_path / "whole") == losses(tmp_path / "split")


def test_sharded_mesh_gives_the_same_losses(tmp_path, losses):
  """DoRA on an int4 base (the most moving parts) on a 2x2x2 mesh; plain LoRA adapters on a mesh
  are checked by test_preference_task.py's LoRA-DPO run."""
  shared = {
    "steps": 3,
    "lora.variant": "dora",
    "lora.quantize": "int4",
    "lora.quantize_group_size": 32,
  }
  training.train(_config(**shared, **{"mesh.data": 1}), str(tmp_path / "one"))
  training.train(
    _config(**shared, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}), str(tmp_path / "mesh")
  )
  one, mesh = losses(tmp_path / "one"), losses(tmp_path / "mesh")
  assert list(one) == [1, 2, 3]
  for step in one:
    assert mesh[step] == pytest.approx(one[step], rel=1e-5), (step, one, mesh)


def test_errors(tmp_path, base_run):
  _, base_dir = base_run
  with pytest.raises(ValueError, match="base_workdir=.* and config.init_from=.* both name"):
    tasks.build(_config(**{"lora.base_workdir": base_dir, "init_from": base_dir}))
  sae = sae_configs.get_config("test")
  sae.lora = lora_configs.section()
  with pytest.raises(ValueError, match="config.lora: LoRA adapters train tasks lm, sft, pref"):
    tasks.build(sae)
  with pytest.raises(
    ValueError, match=r"config.init_from=.*do not fit this model: embed/embedding: shape"
  ):
    tasks.build(_config(**{"init_from": base_dir, "model.d_model": 48}))
  with pytest.raises(ValueError, match="config.lora: variant='vera'"):
    tasks.build(_config(**{"lora.variant": "vera"}))
  with pytest.raises(ValueError, match="config.lora.quantize='fp8'"):
    tasks.build(_config(**{"lora.quantize": "fp8"}))
  with pytest.raises(ValueError, match="config.json"):
    tasks.build(_config(**{"lora.base_workdir": str(tmp_path)}))
  bad = _config(**{"lora.targets": r".*nothing.*"})
  with pytest.raises(ValueError, match=r"(?s)matches no parameter.*layers/attn/q/kernel"):
    trainer.setup(bad)


def test_export_for_hugging_face(base_run, tmp_path, repo, child_env):
  """A trained run exports as a Llama base plus a peft adapter; where transformers and peft are
  installed, peft's model gives the run's logits."""
  pytest.importorskip("safetensors")
  from flaxseed.models import hf  # pylint: disable=g-import-not-at-top
  from flaxseed.models import lora  # pylint: disable=g-import-not-at-top

  base_config, base_dir = base_run
  config = _config(
    **{
      "lora.base_workdir": base_dir,
      "lora.variant": "dora",
      "steps": 2,
      "mesh.data": 1,
      "optim.lr": 1e-2,
    }
  )
  training.train(config, str(tmp_path / "run"))
  out = subprocess.run(
    [
      sys.executable,
      f"{repo}/experiments/lora/export.py",
      f"--workdir={tmp_path / 'run'}",
      f"--out={tmp_path / 'hf'}",
    ],
    env=child_env(1),
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  model, base = hf.from_pretrained(str(tmp_path / "hf" / "base"))
  want_base = trainer.restore(base_config, base_dir).params
  for a, b in zip(jax.tree.leaves(want_base), jax.tree.leaves(base)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  run = trainer.restore(config, str(tmp_path / "run"))
  tokens = np.arange(24, dtype=np.int32).reshape(2, 12) * 7 % 256
  want = np.asarray(lora.apply(model, base, run.params, run.setup.task.cfg, tokens))
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  peft = pytest.importorskip("peft")
  theirs = peft.PeftModel.from_pretrained(
    transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf" / "base")),
    str(tmp_path / "hf" / "adapter"),
  ).eval()
  with torch.no_grad():
    got = theirs(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
  assert np.max(np.abs(got - want)) <= 1e-4
