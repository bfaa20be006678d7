"""Checkpoints: one orbax ``CheckpointManager`` per run, items ``state`` and ``data``.

``state`` is the ``TrainState`` (restored straight into its shardings), ``data`` the grain
iterator position. Saves are asynchronous: ``save`` returns once the arrays are copied off the
devices, and the files are written in the background. Orbax writes each step into a temporary
directory and renames it when complete, so a crash or ``kill -9`` mid-save leaves the previous
checkpoint as the latest complete one, which is what ``restore_latest`` picks up.
"""

import grain
import orbax.checkpoint as ocp


class Checkpointer:

  def __init__(self, directory: str, *, max_to_keep: int, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(directory, item_names=("state", "data"),
                                          options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, data_iterator) -> bool:
    """Starts saving ``state`` and the iterator position at ``step`` (no-op if already saved)."""
    if step in self._manager.all_steps():
      return False
    return self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator)), force=True)

  def restore_latest(self, abstract_state, data_iterator):
    """(state, step) from the latest complete checkpoint, or ``(None, None)`` if there is none.

    ``abstract_state`` is a tree of ``jax.ShapeDtypeStruct`` with shardings; ``data_iterator`` is
    moved to the saved position in place.
    """
    step = self.latest_step()
    if step is None:
      return None, None
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(data_iterator)))
    return restored["state"], step

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()
