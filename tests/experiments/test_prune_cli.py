"""``experiments/prune.py``: prunes a trained run into a Hugging Face folder with its masks."""

import json
import subprocess
import sys

import numpy as np
import pytest

from flaxseed import training
from flaxseed.configs import common
from flaxseed.configs import lm as lm_configs
from flaxseed.models import hf


def test_prunes_a_run_into_a_folder(tmp_path, repo, child_env):
  pytest.importorskip("safetensors")
  config = common.override(
    lm_configs.get_config("test"),
    **{"steps": 2, "sample_tokens": 0, "mesh.data": 1, "model.scan_layers": False},
  )
  training.train(config, str(tmp_path / "run"))
  out = subprocess.run(
    [
      sys.executable,
      f"{repo}/experiments/prune.py",
      f"--workdir={tmp_path / 'run'}",
      f"--output={tmp_path / 'pruned'}",
      "--method=sparsegpt",
      "--nm=2:4",
      "--calibration_rows=8",
      "--eval_rows=8",
    ],
    env=child_env(1),
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.loads((tmp_path / "pruned" / "prune.json").read_text())
  assert summary["pruned_fraction"] == pytest.approx(0.5)
  assert {"bpb", "accuracy"} <= set(summary["after"])
  masks = np.load(tmp_path / "pruned" / "masks.npz")
  _, params = hf.from_pretrained(str(tmp_path / "pruned"), scan_layers=False)
  kernel = params["layers_1"]["mlp"]["up"]["kernel"]
  np.testing.assert_array_equal(np.asarray(kernel)[~masks["layers_1/mlp/up/kernel"]], 0.0)
