"""Launches one training run.

    python experiments/main.py --config=configs/lm.py:tiny --workdir=DIR

Flags: ``--config`` (a config file and ``:variant``; unknown ``--config.<key>`` overrides are
errors), ``--workdir`` (checkpoints, metrics.jsonl, TensorBoard; rerunning resumes), and for
multi-process runs ``--coordinator_address``, ``--num_processes``, ``--process_id`` (on TPU pods
and SLURM these may be left out: ``jax.distributed.initialize`` finds them itself).
"""

import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from flaxseed import training

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Experiment config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and metrics go.")
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", None, "host:port of process 0 for a multi-process run."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_DISTRIBUTED = flags.DEFINE_bool(
  "distributed",
  False,
  "Call jax.distributed.initialize() with auto-detection "
  "(TPU pods, SLURM) even without --coordinator_address.",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    # The run prints its own progress; library INFO logs (orbax writes many) only on request.
    logging.set_verbosity(logging.WARNING)
  if _COORDINATOR.value or _DISTRIBUTED.value:
    # Cross-process collectives of the CPU backend (simulated pods); no effect on GPU/TPU.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
      coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value,
    )
  logging.info(
    "process %d/%d, devices: %s", jax.process_index(), jax.process_count(), jax.devices()
  )
  try:
    training.train(_CONFIG.value, _WORKDIR.value)
  except ValueError as e:  # a bad config or input: say which key, exit non-zero
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except training.NonFiniteLossError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(3)


if __name__ == "__main__":
  app.run(main)
