"""Checkpoints: one orbax ``CheckpointManager`` per run, items ``state`` and ``data``.

``state`` is the ``TrainState`` (restored straight into its shardings), ``data`` the grain
iterator position. Saves are asynchronous: ``save`` returns once the arrays are copied off the
devices, and the files are written in the background. Orbax writes each step into a temporary
directory and renames it when complete, so a crash or ``kill -9`` mid-save leaves the previous
checkpoint as the latest complete one.

Restoring trusts nothing: a step directory counts only with orbax's commit marker
(``commit_success.txt``, written last; a half-finished copy lacks it), and a step whose files turn
out damaged (a truncated array, a missing data file) is skipped with a warning naming it and the
error; the previous step is tried next. Skipped steps are moved to
``<workdir>/damaged_checkpoints/`` (kept for inspection, out of orbax's way) once a resume has
succeeded.
"""

import json
import os
import pathlib
import shutil

from absl import logging
import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

COMMIT_MARKER = "commit_success.txt"


def _steps(directory: str) -> list[int]:
  """Step directories under ``directory``, newest first (complete or not)."""
  if not os.path.isdir(directory):
    return []
  return sorted((int(n) for n in os.listdir(directory) if n.isdigit()), reverse=True)


def _complete(directory: str, step: int) -> bool:
  return os.path.exists(os.path.join(directory, str(step), COMMIT_MARKER))


def _first_line(e: Exception) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _restore_newest(directory: str, restore_one) -> tuple:
  """``(restore_one(step), step, skipped)`` for the newest step that is complete and restores;
  ``skipped`` maps each newer step to why it was passed over. ``(None, None, skipped)`` if no step
  exists; a ``ValueError`` listing every failure if steps exist but none restores."""
  skipped = {}
  for step in _steps(directory):
    if not _complete(directory, step):
      skipped[step] = f"no {COMMIT_MARKER} (an interrupted save or copy)"
    else:
      try:
        restored = restore_one(step)
      except Exception as e:  # pylint: disable=broad-except  (tensorstore/orbax/grain errors)
        skipped[step] = f"damaged: {_first_line(e)}"
      else:
        for bad, why in skipped.items():
          logging.warning("checkpoint step %d in %s skipped: %s", bad, directory, why)
        return restored, step, skipped
  if skipped:
    raise ValueError(
      f"no intact checkpoint in {directory}: "
      + "; ".join(f"step {s}: {why}" for s, why in skipped.items())
    )
  return None, None, skipped


class Checkpointer:
  def __init__(self, directory: str, *, max_to_keep: int, async_save: bool = True):
    self.directory = directory
    self._options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save
    )
    self._manager = self._make_manager()

  def _make_manager(self):
    return ocp.CheckpointManager(
      self.directory, item_names=("state", "data"), options=self._options
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, data_iterator) -> bool:
    """Starts saving ``state`` and the iterator position at ``step`` (no-op if already saved)."""
    if step in self._manager.all_steps():
      return False
    return self._manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator)
      ),
      force=True,
    )

  def restore_latest(self, abstract_state, data_iterator):
    """(state, step) from the newest complete and intact checkpoint, or ``(None, None)`` if there
    is none; newer steps that are incomplete or damaged are skipped with a warning and moved to
    ``damaged_checkpoints/``.

    ``abstract_state`` is a tree of ``jax.ShapeDtypeStruct`` with shardings; ``data_iterator`` is
    moved to the saved position in place.
    """

    def restore_one(step):
      restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          data=grain.checkpoint.CheckpointRestore(data_iterator),
        ),
      )
      return restored["state"]

    state, step, skipped = _restore_newest(self.directory, restore_one)
    if skipped:
      self._set_aside(skipped)
    return state, step

  def _set_aside(self, steps) -> None:
    """Moves skipped step directories out of orbax's way (process 0; all processes wait)."""
    if jax.process_index() == 0:
      aside = os.path.join(os.path.dirname(self.directory.rstrip("/")), "damaged_checkpoints")
      os.makedirs(aside, exist_ok=True)
      for step in steps:
        shutil.move(os.path.join(self.directory, str(step)), os.path.join(aside, str(step)))
        logging.warning("moved checkpoint step %d to %s", step, aside)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

      multihost_utils.sync_global_devices("flaxseed: damaged checkpoints set aside")
    self._manager.close()
    self._manager = self._make_manager()

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


def run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run in ``workdir`` was trained with (its ``config.json``)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise ValueError(f"{path} does not exist: {workdir!r} is not a flaxseed run's workdir")
  try:
    with open(path, encoding="utf-8") as f:
      return ml_collections.ConfigDict(json.load(f))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from e


def has_checkpoint(workdir: str) -> bool:
  """Whether ``workdir/checkpoints`` holds a step directory (complete or not)."""
  return bool(_steps(os.path.join(workdir, "checkpoints")))


def require_checkpoint(workdir: str, what: str) -> None:
  """A ``ValueError`` naming ``what`` (e.g. ``config.init_from``) if the run in ``workdir`` has no
  complete checkpoint: checked before compiling, where reading its parameters would fail later."""
  directory = os.path.join(workdir, "checkpoints")
  if not any(_complete(directory, s) for s in _steps(directory)):
    raise ValueError(f"{what}={workdir!r} has no complete checkpoint in {directory}")


def check_params_match(workdir: str, abstract_params, what: str) -> None:
  """A ``ValueError`` naming ``what`` if the newest complete checkpoint of ``workdir`` does not
  hold exactly the parameter paths and shapes of ``abstract_params`` (read from orbax's
  metadata, before anything compiles)."""
  require_checkpoint(workdir, what)
  directory = os.path.join(workdir, "checkpoints")
  step = next(s for s in _steps(directory) if _complete(directory, s))
  handler = ocp.StandardCheckpointHandler()  # the item's tree metadata; nothing is read
  metadata = handler.metadata(pathlib.Path(directory) / str(step) / "state")
  stored = getattr(metadata, "item_metadata", metadata)["params"]

  def shapes(tree):
    return {
      jax.tree_util.keystr(path, simple=True, separator="/"): tuple(leaf.shape)
      for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }

  have, want = shapes(stored), shapes(abstract_params)
  problems = [f"{p}: missing" for p in sorted(set(want) - set(have))]
  problems += [f"{p}: not in this model" for p in sorted(set(have) - set(want))]
  problems += [
    f"{p}: shape {have[p]} != {want[p]}"
    for p in sorted(set(have) & set(want))
    if have[p] != want[p]
  ]
  if problems:
    more = f" (and {len(problems) - 6} more)" if len(problems) > 6 else ""
    raise ValueError(
      f"{what}={workdir!r}: its parameters (step {step}) do not fit this model: "
      + "; ".join(problems[:6])
      + more
    )


def restore_params(workdir: str, abstract_params):
  """(params, step) of the newest intact checkpoint of the run in ``workdir``: only the trained
  parameters, restored straight into the shardings of ``abstract_params`` (a tree of
  ``jax.ShapeDtypeStruct``); the optimizer state is never read."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise ValueError(f"no checkpoint in {directory}")
  manager = ocp.CheckpointManager(
    directory, item_names=("state", "data"), options=ocp.CheckpointManagerOptions(create=False)
  )
  item = {"params": abstract_params}

  def restore_one(step):
    restored = manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
          item=item,
          restore_args=ocp.checkpoint_utils.construct_restore_args(item),
          partial_restore=True,
        )
      ),
    )
    return restored["state"]["params"]

  try:
    params, step, _ = _restore_newest(directory, restore_one)
  finally:
    manager.close()
  if params is None:
    raise ValueError(f"no checkpoint in {directory}")
  return params, step
