"""What the study scripts share (``experiments/studies.py``): reports and result caching."""

import pytest

from flaxseed.experiments import studies

SCRIPT = "experiments/x/run.py"


def test_a_rerun_replaces_only_the_generated_section(tmp_path):
  path = str(tmp_path / "report.md")
  studies.write_report(path, "| a |\n|---|\n| 1 |", script=SCRIPT)
  assert studies.generated_section(path).strip() == "| a |\n|---|\n| 1 |"
  with open(path, encoding="utf-8") as f:
    text = f.read()
  with open(path, "w", encoding="utf-8") as f:  # the reading, written by hand around the tables
    f.write("# Study\n\n" + text + "\n## Reading\n\nThe number is small.\n")
  studies.write_report(path, "| a |\n|---|\n| 2 |", script=SCRIPT)
  with open(path, encoding="utf-8") as f:
    text = f.read()
  assert text.startswith("# Study\n\n") and text.endswith("## Reading\n\nThe number is small.\n")
  assert "| 2 |" in text and "| 1 |" not in text


def test_a_report_without_one_section_is_never_overwritten(tmp_path):
  path = tmp_path / "report.md"
  path.write_text("# Study\n\nAll written by hand.\n")
  with pytest.raises(ValueError, match="exactly one generated section"):
    studies.write_report(str(path), "| a |", script=SCRIPT)
  assert path.read_text() == "# Study\n\nAll written by hand.\n"


def test_cached_results_are_computed_once_unless_fresh(tmp_path):
  calls = []

  def run():
    calls.append(1)
    return {"acc": len(calls)}

  assert studies.cached(str(tmp_path), "r", run) == {"acc": 1}
  assert studies.cached(str(tmp_path), "r", run) == {"acc": 1}  # read back, not rerun
  assert studies.cached(str(tmp_path), "r", run, fresh=True) == {"acc": 2}
