"""``experiments/generate.py``: end to end on a trained run, and its loader on a Hugging Face
folder (in process)."""

import importlib.util
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxseed import models
from flaxseed import training
from flaxseed.configs import common
from flaxseed.configs import lm as lm_configs
from flaxseed.models import hf
from flaxseed.models import transformer


def test_generates_from_a_trained_run(tmp_path, repo, child_env):
  config = common.override(
    lm_configs.get_config("test"), **{"steps": 2, "sample_tokens": 0, "mesh.data": 1}
  )
  training.train(config, str(tmp_path / "run"))
  out = subprocess.run(
    [
      sys.executable,
      f"{repo}/experiments/generate.py",
      f"--workdir={tmp_path / 'run'}",
      "--prompt=def f(",
      "--prompt=The quick brown fox",
      "--max_new_tokens=7",
      "--temperature=0",
    ],
    env=child_env(1),
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  rows = out.stdout.split("=" * 20 + "\n")[1:]
  assert [r.startswith(p) for r, p in zip(rows, ("def f(", "The quick brown fox"))] == [True] * 2


def test_loads_a_hugging_face_folder(tmp_path, repo):
  pytest.importorskip("safetensors")
  spec = importlib.util.spec_from_file_location("generate_cli", f"{repo}/experiments/generate.py")
  cli = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cli)
  model = transformer.Transformer(
    transformer.TransformerConfig(vocab_size=256, d_model=32, num_layers=1, num_heads=2, mlp_dim=64)
  )
  params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  hf.to_pretrained(model, params, str(tmp_path / "hf"))
  with pytest.raises(ValueError, match="no tokenizer.json or tokenizer.model"):
    cli.load(None, str(tmp_path / "hf"), None)
  with pytest.raises(ValueError, match="exactly one"):
    cli.load(str(tmp_path), str(tmp_path / "hf"), None)
  loaded, loaded_params, tok = cli.load(None, str(tmp_path / "hf"), "byte")
  prompt = [np.asarray(tok.encode("ab"))]
  np.testing.assert_array_equal(
    models.generate(loaded, loaded_params, prompt, max_new_tokens=3, temperature=0.0),
    models.generate(model, params, prompt, max_new_tokens=3, temperature=0.0),
  )
