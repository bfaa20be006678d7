"""A run's workdir: the lock that keeps a second run out, and what a resume may change.

``train(config, workdir)`` calls, in this order and before anything compiles:

1. ``prepare(workdir)``: creates the directory (an existing regular file is an error);
2. ``Lock(workdir)``: ``workdir/lock`` is held with ``flock`` for the run's lifetime and records
   who holds it (pid, host, start time). A second run on the same workdir fails naming the holder.
   The kernel drops the lock when its process dies, so the lock of a crashed or ``kill -9``-ed run
   is stale but not in the way: the next run takes it and says whose lock it broke;
3. ``check_resume(config, workdir)``: if the workdir already has a checkpoint, the requested config
   must agree with the stored ``config.json`` on every key except ``RESUMABLE`` ones (the run's
   length, the schedules of logging, evaluation and saving, the mesh, the optimizer's
   hyperparameters); otherwise a ``ValueError`` lists every differing key with both values.

``write_config`` stores ``config.json``; the loop calls it only after a successful restore (or a
fresh init), so a rejected or failed resume never overwrites the config of the run in the
workdir. In a multi-process run only process 0 locks and writes.
"""

import datetime
import fcntl
import json
import os
import socket

from absl import logging

# Keys a resumed run may change (dotted prefixes): everything that shapes the model, the task, the
# data or the loss must match the stored run. ``steps`` may change (extend or stop early; set
# ``optim.decay_steps`` to keep the learning rates of the steps already taken).
RESUMABLE = (
  "steps",
  "log_every",
  "eval_every",
  "eval_batches",
  "checkpoint_every",
  "max_to_keep",
  "sample_tokens",
  "sample_prompt",
  "sample_temperature",
  "init_from",  # used only by a run without a checkpoint of its own (Task.init_from_sets)
  "mesh",  # a checkpoint restores into any mesh's shardings
  "logical_axis_rules",
  # The optimizer's hyperparameters (resuming with a lower learning rate is the usual remedy for a
  # loss spike); its state has the same structure for every value (training/optim.py).
  "optim",
)


def prepare(workdir: str) -> None:
  """Creates ``workdir``; a path that exists and is not a directory is a ``ValueError``."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"workdir {workdir!r} exists and is not a directory")
  os.makedirs(workdir, exist_ok=True)


class WorkdirLockedError(ValueError):
  """Another live process holds the workdir's lock."""


class Lock:
  """``workdir/lock``, held (``flock``, exclusive) from construction until ``release``."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "lock")
    self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read_holder(self._fd)
      os.close(self._fd)
      raise WorkdirLockedError(
        f"workdir {workdir!r} is in use by {_describe(holder)} (lock file {self.path}); "
        "wait for that run to end or stop it, or use another --workdir"
      ) from None
    stale = _read_holder(self._fd)
    if stale:  # the holder died without releasing: the kernel dropped its flock
      logging.warning("workdir %s: broke the stale lock of %s", workdir, _describe(stale))
    me = {
      "pid": os.getpid(),
      "host": socket.gethostname(),
      "started": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    os.ftruncate(self._fd, 0)
    os.pwrite(self._fd, json.dumps(me).encode(), 0)

  def release(self) -> None:
    """Empties the lock file (the file stays: removing it would race a waiting process)."""
    if self._fd is None:
      return
    os.ftruncate(self._fd, 0)
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.release()


def _read_holder(fd) -> dict:
  text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
  if not text:
    return {}
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return {"unreadable": text[:80]}


def _describe(holder: dict) -> str:
  if "pid" not in holder:
    return f"an unknown process ({holder})"
  return f"pid {holder['pid']} on {holder.get('host', '?')} (since {holder.get('started', '?')})"


def _flatten(tree, prefix="") -> dict:
  out = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(_flatten(value, f"{path}."))
    else:
      out[path] = value
  return out


def _resumable(key: str, fixed=()) -> bool:
  return any(key == k or key.startswith(f"{k}.") for k in RESUMABLE if k not in fixed)


def config_differences(stored: dict, requested: dict, fixed=()) -> list[str]:
  """``"key: stored -> requested"`` for every non-resumable key whose values differ (``fixed``:
  keys of ``RESUMABLE`` that this run may not change). A key the stored config lacks (added to
  the code since) is not a difference."""
  stored, requested = _flatten(stored), _flatten(requested)
  diffs = []
  for key in sorted(set(stored) | set(requested)):
    if _resumable(key, fixed) or key not in stored:
      continue
    old, new = stored[key], requested.get(key, "<absent>")
    if old != new:
      diffs.append(f"{key}: {old!r} -> {new!r}")
  return diffs


def check_resume(config, workdir: str, has_checkpoint: bool, *, fixed=()) -> None:
  """If ``workdir`` holds a checkpoint, ``config`` must match its ``config.json`` on every key
  outside ``RESUMABLE`` (and on ``fixed``: ``init_from`` where the task reads it at every
  start); a ``ValueError`` lists the differences (before anything compiles)."""
  path = os.path.join(workdir, "config.json")
  if not has_checkpoint or not os.path.exists(path):
    return
  try:
    with open(path, encoding="utf-8") as f:
      stored = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: cannot read the stored config to resume: {e}") from e
  requested = json.loads(config.to_json_best_effort())
  diffs = config_differences(stored, requested, fixed)
  if diffs:
    raise ValueError(
      f"workdir {workdir!r} holds a checkpoint of a run with another config; a resume may change "
      f"only {', '.join(k for k in RESUMABLE if k not in fixed)}. Differences "
      f"(stored -> requested): {'; '.join(diffs)}. "
      "Use a new --workdir (with config.init_from to start from its parameters)"
    )


def write_config(config, workdir: str) -> None:
  """Writes ``workdir/config.json`` atomically (a crash mid-write leaves the old one)."""
  path = os.path.join(workdir, "config.json")
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(config.to_json_best_effort(indent=2))
  os.replace(tmp, path)
