"""Test setup: 8 fake CPU devices, rank promotion errors, a compilation cache, shared helpers.

XLA_FLAGS must be set before jax initializes its backends, so this runs before any test imports
jax. Subprocess tests get the same environment through ``subprocess_env``.

Many tests compile the same program more than once (a run and its resumed half, one device and
its twin on a mesh, a subprocess and the in-process reference), so the session shares one
persistent compilation cache, fresh per session (nothing outlives it); on 2 cores it took
``tests/training/test_lora_task.py`` from 114 s to 88 s. Set ``JAX_COMPILATION_CACHE_DIR``
yourself to choose another place.
"""

import atexit
import json
import os
import shutil
import sys
import tempfile

# The suite compiles hundreds of small programs and runs each a few times, so XLA's CPU backend
# optimizes less (LLVM at -O0, without its expensive passes): compiles take about a fifth less
# time. Every comparison a test makes runs both sides under the same flags.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " " + FAST_COMPILE
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if os.environ["JAX_PLATFORMS"] == "cpu":
  # libtpu serves here only as a compiler for TPU topologies (no chip to share), so the test
  # processes (xdist workers, aot.py subprocesses) may all load it; by default the first to load
  # it locks everyone else out until it exits.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="flaxseed-test-jit-")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update("jax_numpy_rank_promotion", "raise")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_env(num_devices: int = 1) -> dict[str, str]:
  """Environment for a child process with ``num_devices`` fake CPU devices."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices} {FAST_COMPILE}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONUNBUFFERED"] = "1"
  return env


def main_command(*args: str) -> list[str]:
  return [sys.executable, os.path.join(REPO, "experiments", "main.py"), *args]


def read_train_metrics(workdir) -> dict[int, dict]:
  """step -> train-metrics row of ``metrics.jsonl``."""
  rows = {}
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    for line in f:
      row = json.loads(line)
      if "loss" in row:
        rows[row["step"]] = row
  return dict(sorted(rows.items()))


@pytest.fixture(scope="session")
def train_metrics():
  """``train_metrics(workdir)``: see ``read_train_metrics``."""
  return read_train_metrics


@pytest.fixture(scope="session")
def losses():
  """``losses(workdir)``: step -> loss of a run."""
  return lambda workdir: {s: r["loss"] for s, r in read_train_metrics(workdir).items()}


@pytest.fixture(scope="session")
def repo():
  return REPO


@pytest.fixture(scope="session")
def child_env():
  """``child_env(num_devices)``: environment for a subprocess with that many CPU devices."""
  return subprocess_env


@pytest.fixture(scope="session")
def main_cmd():
  """``main_cmd(*flags)``: the command line of ``experiments/main.py``."""
  return main_command


MESH = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}


def check_resume_and_mesh(config, tmp_path, *, half: int) -> tuple[dict, dict[int, float]]:
  """Trains ``config`` uninterrupted on one device, then the same run split at step ``half``,
  resumed (a) on one device: the uninterrupted losses bit for bit, and (b) from a copy of the
  split's checkpoint on the 2 x 2 x 2 mesh: the same losses within 1e-5 (sharding and resuming on
  another mesh at once). ``config`` must checkpoint at ``half`` and fix its schedule
  (``optim.decay_steps``). Returns the uninterrupted run's (summary, losses)."""
  from flaxseed import training  # pylint: disable=g-import-not-at-top
  from flaxseed.configs import common  # pylint: disable=g-import-not-at-top

  losses = lambda name: {s: r["loss"] for s, r in read_train_metrics(tmp_path / name).items()}  # noqa: E731
  copy = config.copy_and_resolve_references  # override sets keys in place
  summary = training.train(copy(), str(tmp_path / "whole"))
  training.train(common.override(copy(), steps=half), str(tmp_path / "split"))
  shutil.copytree(tmp_path / "split", tmp_path / "mesh")
  training.train(copy(), str(tmp_path / "split"))
  training.train(common.override(copy(), **MESH), str(tmp_path / "mesh"))
  whole, split, mesh = losses("whole"), losses("split"), losses("mesh")
  assert split == whole, (whole, split)  # bit for bit
  assert list(mesh) == list(whole), (whole, mesh)
  for step in whole:
    assert mesh[step] == pytest.approx(whole[step], abs=1e-5), (step, whole, mesh)
  return summary, whole


@pytest.fixture(scope="session")
def resume_and_mesh():
  """``resume_and_mesh(config, tmp_path, half=...)``: see ``check_resume_and_mesh``."""
  return check_resume_and_mesh
