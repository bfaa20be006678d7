"""``experiments/generate.py``: from a trained run and from a Hugging Face folder."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from flaxseed import training
from flaxseed.configs import common
from flaxseed.configs import lm as lm_configs
from flaxseed.models import hf
from flaxseed.models import transformer


def _run(repo, child_env, *args):
  return subprocess.run([sys.executable, f"{repo}/experiments/generate.py", *args],
                        env=child_env(1), capture_output=True, text=True, timeout=300,
                        check=False)


def test_generates_from_a_run_and_from_a_hugging_face_folder(tmp_path, repo, child_env):
  config = common.override(lm_configs.get_config("test"), **{"steps": 2, "sample_tokens": 0,
                                                             "mesh.data": 1})
  training.train(config, str(tmp_path / "run"))
  out = _run(repo, child_env, f"--workdir={tmp_path / 'run'}", "--prompt=def f(",
             "--prompt=The quick brown fox", "--max_new_tokens=7", "--temperature=0")
  assert out.returncode == 0, out.stderr[-3000:]
  rows = out.stdout.split("=" * 20 + "\n")[1:]
  assert [r.startswith(p) for r, p in zip(rows, ("def f(", "The quick brown fox"))] == [True] * 2

  pytest.importorskip("safetensors")
  model = transformer.Transformer(transformer.TransformerConfig(
      vocab_size=256, d_model=32, num_layers=1, num_heads=2, mlp_dim=64))
  params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  hf.to_pretrained(model, params, str(tmp_path / "hf"))
  out = _run(repo, child_env, f"--hf_dir={tmp_path / 'hf'}", "--tokenizer=byte",  # no .json
             "--prompt=ab", "--max_new_tokens=3", "--top_p=0.9")
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.split("=" * 20 + "\n")[1].startswith("ab")
