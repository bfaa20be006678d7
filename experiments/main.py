"""Launches one training run.

    python experiments/main.py --config=configs/lm.py:tiny --workdir=DIR

Flags: ``--config`` (a config file and ``:variant``; unknown ``--config.<key>`` overrides are
errors), ``--workdir`` (checkpoints, metrics.jsonl, TensorBoard; rerunning resumes; locked while a
run holds it), and for multi-process runs ``--coordinator_address``, ``--num_processes``,
``--process_id`` (on TPU pods and SLURM these may be left out: ``jax.distributed.initialize``
finds them itself). Every config, flag or file problem is one ``error:`` line and exit 2
(``experiments/cli.py``); divergence exits 3; Ctrl-C saves a checkpoint and exits 130.
"""

from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from flaxseed import training
from flaxseed.experiments import cli

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
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  config = cli.config(_CONFIG)
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
    training.train(config, _WORKDIR.value)
  except training.NonFiniteLossError as e:
    cli.fail(str(e), code=3)
  except KeyboardInterrupt as e:  # Ctrl-C: the loop saved a checkpoint first (if it was running)
    cli.fail(f"interrupted{': ' + str(e) if str(e) else ''}", code=130)


if __name__ == "__main__":
  cli.run(main)
