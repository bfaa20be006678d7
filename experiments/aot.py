"""Compiles the real train step for a TPU topology on a machine without a TPU.

    python experiments/aot.py --config=configs/lm.py:1b --topology=v5e:4x4 [--json=out.json]

Needs libtpu (``pip install -e '.[tpu]'``). Builds the mesh of ``config.mesh`` over the topology's
devices, lowers and compiles ``train_step`` exactly as ``train`` does, and prints the compiled
memory analysis (per-device bytes and whether they fit in HBM) and the compiler's FLOP estimate.
The same check as MaxText's ``train_compile.py``: a config that does not fit fails here, in
seconds, instead of on the pod.
"""

import json
import sys

from absl import flags
from ml_collections import config_flags

from flaxseed.experiments import cli

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Experiment config file.", lock_config=True
)
_TOPOLOGY = flags.DEFINE_string(
  "topology",
  "v5e:2x2",
  "A TPU topology libtpu knows, e.g. v5e:2x2, v5e:4x4, v4:2x2x2, v5p:2x2x2, v6e:4x4.",
)
_JSON = flags.DEFINE_string("json", None, "Also write the report as JSON to this path.")
flags.mark_flags_as_required(["config"])

# HBM per chip (GiB), from the data sheets.
HBM_GIB = {"TPU v4": 32, "TPU v5 lite": 16, "TPU v5": 95, "TPU v6 lite": 32, "TPU v3": 16}


def compile_for_topology(config, topology: str) -> dict:
  """Lowers and compiles the train step of ``config`` for ``topology``; returns the report."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  from flaxseed.training import trainer  # pylint: disable=g-import-not-at-top

  try:
    devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
  except Exception as e:  # pylint: disable=broad-except  (libtpu missing or unknown name)
    raise ValueError(
      f"--topology={topology!r}: libtpu could not describe it ({e}); "
      "is libtpu installed (pip install -e '.[tpu]')?"
    ) from e
  s = trainer.setup(config, devices=devices)
  task, mesh = s.task, s.mesh
  kind = devices[0].device_kind
  hbm = next((gib * 2**30 for prefix, gib in HBM_GIB.items() if kind.startswith(prefix)), None)
  report = {
    "topology": topology,
    "device_kind": kind,
    "num_devices": len(devices),
    "mesh": dict(mesh.shape),
    "hbm_per_device_bytes": hbm,
    "model_flops_per_step": task.flops_per_token() * config.batch_size * config.seq_len,
  }
  try:
    compiled = trainer.compile_train_step(s)
  except Exception as e:  # pylint: disable=broad-except
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    # XLA refuses to compile what cannot fit: that is the answer, not a crash.
    return {**report, "fits_hbm": False, "error": str(e).splitlines()[0]}
  memory = trainer.memory_report(compiled) or {}
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {
    **report,
    "memory_per_device_bytes": memory,
    "fits_hbm": None if hbm is None or not memory else memory["total"] <= hbm,
    "compiler_flops_per_device": float(cost.get("flops", 0.0)) if cost else None,
  }


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  report = compile_for_topology(cli.config(_CONFIG), _TOPOLOGY.value)
  if _JSON.value:
    with open(_JSON.value, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=2)
  gib = lambda b: f"{b / 2**30:.3f} GiB"  # noqa: E731
  where = (
    f"{report['topology']} ({report['num_devices']} x {report['device_kind']}), "
    f"mesh {report['mesh']}"
  )
  if "error" in report:
    print(f"train step does NOT fit on {where}:\n  {report['error']}")
    sys.exit(1)
  mem = report["memory_per_device_bytes"]
  print(f"compiled train step for {where}")
  if mem:
    print(
      f"  per device: total {gib(mem['total'])} = arguments {gib(mem['argument'])} + "
      f"outputs {gib(mem['output'])} - aliased {gib(mem['alias'])} + temporaries "
      f"{gib(mem['temp'])} + code {gib(mem['generated_code'])}"
    )
  if report["hbm_per_device_bytes"]:
    print(
      f"  HBM per device {gib(report['hbm_per_device_bytes'])}: "
      f"{'fits' if report['fits_hbm'] else 'DOES NOT FIT'}"
    )
  print(
    f"  compiler FLOPs per device per step: {report['compiler_flops_per_device']:.4g}; "
    f"model FLOPs per step (all devices): {report['model_flops_per_step']:.4g}"
  )


if __name__ == "__main__":
  cli.run(main)
