"""The launchers as a user runs them: processes, signals, kills, CLI errors, TPU compilation."""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from flaxseed import training
from flaxseed.configs import lm

pytestmark = pytest.mark.slow

TEST_CONFIG = "--config=configs/lm.py:test"


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run(cmd, env, repo, timeout=300):
  return subprocess.run(cmd, env=env, cwd=repo, capture_output=True, text=True, timeout=timeout)


def test_two_processes_give_the_same_losses_as_one_device(
  tmp_path, repo, child_env, main_cmd, losses
):
  flags = [
    "--config.steps=3",
    "--config.mesh.data=2",
    "--config.mesh.fsdp=2",
    "--config.mesh.tensor=2",
    "--config.sample_tokens=0",
  ]
  port = _free_port()
  procs = [
    subprocess.Popen(
      main_cmd(
        TEST_CONFIG,
        f"--workdir={tmp_path / 'pod'}",
        *flags,
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
        f"--process_id={i}",
      ),
      env=child_env(4),
      cwd=repo,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  config = lm.get_config("test")
  config.steps, config.mesh.data, config.sample_tokens = 3, 1, 0
  training.train(config, str(tmp_path / "one"))
  one, pod = losses(tmp_path / "one"), losses(tmp_path / "pod")
  assert list(one) == [1, 2, 3] and list(pod) == [1, 2, 3]
  for step in one:
    assert pod[step] == pytest.approx(one[step], abs=1e-5), (one, pod)
  assert (tmp_path / "pod" / "checkpoints" / "3").is_dir()


# A run slow enough to be interrupted: checkpoints every 10 steps, a metrics line every step.
LONG = [
  "--config.steps=300",
  "--config.log_every=1",
  "--config.sample_tokens=0",
  "--config.optim.decay_steps=300",
]


@pytest.fixture(scope="module")
def reference_losses(tmp_path_factory, repo, child_env, main_cmd, losses):
  """Losses of the uninterrupted run that interrupted runs must reproduce exactly."""
  workdir = tmp_path_factory.mktemp("reference")
  cmd = main_cmd(TEST_CONFIG, f"--workdir={workdir}", "--config.checkpoint_every=0", *LONG)
  result = _run(cmd, child_env(1), repo)
  assert result.returncode == 0, result.stderr[-3000:]
  return losses(workdir)


def _wait_for(predicate, proc, timeout=120):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return
    assert proc.poll() is None, "the run ended before it could be interrupted"
    time.sleep(0.02)
  raise TimeoutError


def _lines(path):
  try:
    with open(path, encoding="utf-8") as f:
      return sum(1 for _ in f)
  except FileNotFoundError:
    return 0


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_a_signal_saves_then_resume_continues_exactly(
  tmp_path, repo, child_env, main_cmd, reference_losses, losses, signum, code
):
  """SIGTERM (preemption) and Ctrl-C both save at the current step; Ctrl-C then exits 130."""
  cmd = main_cmd(TEST_CONFIG, f"--workdir={tmp_path}", "--config.checkpoint_every=0", *LONG)
  proc = subprocess.Popen(
    cmd, env=child_env(1), cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )
  _wait_for(lambda: _lines(tmp_path / "metrics.jsonl") >= 20, proc)
  proc.send_signal(signum)
  out = proc.communicate(timeout=120)[0]
  assert proc.returncode == code, out[-3000:]
  assert "Traceback" not in out, out[-3000:]
  saved = [int(d) for d in os.listdir(tmp_path / "checkpoints")]
  assert len(saved) == 1 and 20 <= saved[0] < 300, saved
  if signum == signal.SIGTERM:
    assert f"SIGTERM: saved checkpoint at step {saved[0]}" in out
  else:
    assert f"error: interrupted: saved checkpoint at step {saved[0]}" in out
  result = _run(cmd, child_env(1), repo)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"resumed from checkpoint at step {saved[0]}" in result.stdout
  assert losses(tmp_path) == reference_losses


def test_kill_9_resumes_from_the_last_complete_checkpoint(
  tmp_path, repo, child_env, main_cmd, reference_losses, losses
):
  cmd = main_cmd(TEST_CONFIG, f"--workdir={tmp_path}", "--config.checkpoint_every=10", *LONG)
  proc = subprocess.Popen(
    cmd, env=child_env(1), cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )
  ckpt = tmp_path / "checkpoints"
  _wait_for(lambda: (ckpt / "20").is_dir() and _lines(tmp_path / "metrics.jsonl") >= 25, proc)
  proc.kill()
  proc.wait()
  complete = max(int(d) for d in os.listdir(ckpt) if d.isdigit())
  assert 20 <= complete < 300
  result = _run(cmd, child_env(1), repo)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"resumed from checkpoint at step {complete}" in result.stdout
  assert losses(tmp_path) == reference_losses  # steps redone after the kill match too
  steps = [
    json.loads(line)["step"]
    for line in open(tmp_path / "metrics.jsonl")
    if "loss" in json.loads(line)
  ]
  assert steps == sorted(set(steps)), "a redone step was logged twice"


@pytest.mark.parametrize(
  "flags,message",
  [
    (
      ["--config.stpes=10"],
      "--config.stpes: the config has no key 'stpes' (did you mean --config.steps",
    ),
    (
      ["--config=configs/sae.py:test", "--config.model.lm_workdir=/tmp/lm"],
      "(did you mean --config.sae.lm_workdir",
    ),
    (["--config=configs/nope.py"], "--config: no such config file: configs/nope.py"),
    (["--config=configs/lm.py:nope"], "unknown variant 'nope' of configs/lm.py"),
    (["--config.steps=ten"], "--config.steps=ten"),
    (["--config.model.num_heads=3"], "num_heads=3 must divide d_model=32"),
    (["--config.data.corpus=/nonexistent/*.txt"], "config.data.corpus='/nonexistent/*.txt'"),
  ],
)
def test_cli_rejects_bad_input_with_one_line(tmp_path, repo, child_env, main_cmd, flags, message):
  """Every config, flag or file problem: one ``error:`` line naming the key or path, exit 2."""
  result = _run(main_cmd(TEST_CONFIG, f"--workdir={tmp_path}", *flags), child_env(1), repo)
  assert result.returncode == 2, result.stderr[-3000:]
  assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
  assert message in result.stderr
  assert not (tmp_path / "checkpoints").exists()


def test_a_second_run_on_a_locked_workdir_exits_2_naming_the_holder(
  tmp_path, repo, child_env, main_cmd
):
  from flaxseed.training import workdir  # pylint: disable=g-import-not-at-top

  with workdir.Lock(str(tmp_path)):
    result = _run(main_cmd(TEST_CONFIG, f"--workdir={tmp_path}"), child_env(1), repo)
  assert result.returncode == 2, result.stderr[-3000:]
  assert f"is in use by pid {os.getpid()} on {socket.gethostname()}" in result.stderr
  assert not (tmp_path / "checkpoints").exists()


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
@pytest.mark.parametrize(
  "mesh",
  [
    [],
    # The Pallas TPU attention kernels (Mosaic) inside the sharded (data x tensor) step,
    # local/global layers.
    [
      "--config.mesh.data=2",
      "--config.mesh.tensor=2",
      "--config.model.attention_impl=pallas_tpu",
      "--config.model.attention_pattern=('sliding_window:16','global')",
    ],
    # Titans MAC: the memory's scan over segments, Pallas attention per segment, sharded heads.
    [
      "--config=configs/titans.py:mac-test",
      "--config.mesh.data=2",
      "--config.mesh.tensor=2",
      "--config.model.attention_impl=pallas_tpu",
    ],
    # The diffusion LM: bidirectional Pallas attention, the masking inside the step.
    [
      "--config=configs/diffusion_lm.py:test",
      "--config.mesh.data=2",
      "--config.mesh.tensor=2",
      "--config.model.attention_impl=pallas_tpu",
    ],
  ],
)
def test_train_step_compiles_for_a_tpu_topology(tmp_path, repo, child_env, mesh):
  out = tmp_path / "aot.json"
  config = [] if any(flag.startswith("--config=") for flag in mesh) else [TEST_CONFIG]
  cmd = [
    sys.executable,
    os.path.join(repo, "experiments", "aot.py"),
    *config,
    "--topology=v5e:2x2",
    f"--json={out}",
    *mesh,
  ]
  result = _run(cmd, child_env(1), repo)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["device_kind"].startswith("TPU v5") and report["num_devices"] == 4
  assert report["fits_hbm"] is True
  assert report["memory_per_device_bytes"]["total"] > 0
  assert report["compiler_flops_per_device"] > 0
  assert "compiled train step for v5e:2x2" in result.stdout
