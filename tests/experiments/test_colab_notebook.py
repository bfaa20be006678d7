"""``experiments/colab/quickstart.ipynb`` runs headless: its code cells, in order, as one script
(shell and magic lines, which only a notebook understands, are left out), with the quick
settings the notebook reads from the environment."""

import json
import subprocess
import sys


def test_quickstart_notebook_runs(tmp_path, repo, child_env):
  with open(f"{repo}/experiments/colab/quickstart.ipynb", encoding="utf-8") as f:
    notebook = json.load(f)
  assert notebook["nbformat"] == 4
  cells = ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]
  assert len(cells) >= 5
  lines = [
    line for cell in cells for line in cell.splitlines() if not line.lstrip().startswith(("!", "%"))
  ]
  script = tmp_path / "quickstart.py"
  script.write_text("\n".join(lines) + "\n")
  env = {
    **child_env(1),
    "FLAXSEED_NOTEBOOK_QUICK": "1",
    "MPLBACKEND": "Agg",
    "FLAXSEED_NOTEBOOK_DIR": str(tmp_path / "runs"),
  }
  out = subprocess.run(
    [sys.executable, str(script)],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
    cwd=tmp_path,
  )
  assert out.returncode == 0, out.stderr[-4000:]
  assert "LoRA eval loss on code:" in out.stdout
  for name in ("lm", "sae", "lora"):
    assert (tmp_path / "runs" / name / "metrics.jsonl").exists()
