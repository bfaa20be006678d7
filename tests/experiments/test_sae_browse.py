"""experiments/sae/browse.py on a small SAE run: the page, its PNGs and what it claims."""

import json
import re
import subprocess
import sys

import pytest

from flaxseed import training
from flaxseed.configs import common
from flaxseed.configs import sae as sae_configs


def test_browser_shows_the_top_contexts_of_each_feature(tmp_path, repo, child_env):
  pytest.importorskip("matplotlib")
  config = common.override(sae_configs.get_config("test"), **{"steps": 6, "mesh.data": 1})
  training.train(config, str(tmp_path / "sae"))
  out = subprocess.run(
    [
      sys.executable,
      f"{repo}/experiments/sae/browse.py",
      f"--workdir={tmp_path / 'sae'}",
      "--features=5",
      "--rows=16",
      "--contexts=3",
    ],
    env=child_env(1),
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  browser = tmp_path / "sae" / "browser"
  summary = json.loads((browser / "summary.json").read_text())
  assert len(summary["features"]) == 5 and summary["num_tokens"] == 16 * 32
  page = (browser / "index.html").read_text()
  for png in ["density.png"] + [f"feature_{f}.png" for f in summary["features"]]:
    assert (browser / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f'src="{png}"' in page
  for feature in summary["features"]:
    section = page.split(f'<section id="f{feature}">')[1].split("</section>")[0]
    top = float(re.search(r"max activation ([0-9.]+)", section)[1])
    contexts = re.findall(r"<li>(.*?)</li>", section)
    assert len(contexts) == 3
    outlined = [float(re.search(r'class="max"[^>]*data-act="([0-9.]+)"', c)[1]) for c in contexts]
    # Contexts are in decreasing order of the outlined activation, the first one the maximum.
    assert outlined == sorted(outlined, reverse=True) and outlined[0] == pytest.approx(
      top, abs=1e-3
    )
