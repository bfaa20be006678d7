"""Checkpoints: one orbax ``CheckpointManager`` per run, items ``state`` and ``data``.

``state`` is the ``TrainState`` (restored straight into its shardings), ``data`` the grain
iterator position. Saves are asynchronous: ``save`` returns once the arrays are copied off the
devices, and the files are written in the background. Orbax writes each step into a temporary
directory and renames it when complete, so a crash or ``kill -9`` mid-save leaves the previous
checkpoint as the latest complete one, which is what ``restore_latest`` picks up.
"""

import json
import os

import grain
import ml_collections
import orbax.checkpoint as ocp


class Checkpointer:
  def __init__(self, directory: str, *, max_to_keep: int, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save
    )
    self._manager = ocp.CheckpointManager(directory, item_names=("state", "data"), options=options)

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
    """(state, step) from the latest complete checkpoint, or ``(None, None)`` if there is none.

    ``abstract_state`` is a tree of ``jax.ShapeDtypeStruct`` with shardings; ``data_iterator`` is
    moved to the saved position in place.
    """
    step = self.latest_step()
    if step is None:
      return None, None
    restored = self._manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(data_iterator),
      ),
    )
    return restored["state"], step

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
  with open(path, encoding="utf-8") as f:
    return ml_collections.ConfigDict(json.load(f))


def restore_params(workdir: str, abstract_params):
  """(params, step) of the latest checkpoint of the run in ``workdir``: only the trained
  parameters, restored straight into the shardings of ``abstract_params`` (a tree of
  ``jax.ShapeDtypeStruct``); the optimizer state is never read."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise ValueError(f"no checkpoint in {directory}")
  manager = ocp.CheckpointManager(
    directory, item_names=("state", "data"), options=ocp.CheckpointManagerOptions(create=False)
  )
  try:
    step = manager.latest_step()
    if step is None:
      raise ValueError(f"no checkpoint in {directory}")
    item = {"params": abstract_params}
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
  finally:
    manager.close()
  return restored["state"]["params"], step
