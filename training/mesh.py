"""The device mesh: axes ``("data", "fsdp", "tensor")``, shape from ``config.mesh``.

``data`` replicates parameters and splits the batch; ``fsdp`` splits both the batch and the
parameters (ZeRO-3 style, gathered per layer by XLA); ``tensor`` splits heads and MLP width.
A size of ``-1`` means "all remaining devices". The same code builds a 1-CPU mesh, 8 fake CPU
devices, a multi-process CPU cluster, a GPU host or a TPU pod slice; it also builds meshes of
abstract TPU devices for ahead-of-time compilation (``experiments/aot.py``).
"""

from collections.abc import Mapping
from collections.abc import Sequence
import math

from absl import logging
import flax.linen as nn
import jax
from jax.sharding import AxisType
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import numpy as np

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both


def resolve_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Mesh shape for ``num_devices``; ``-1`` takes the rest. Errors name the offending key."""
  unknown = sorted(set(mesh_config) - set(AXES))
  if unknown:
    raise ValueError(f"config.mesh has unknown axes {unknown}; the axes are {AXES}")
  sizes = [int(mesh_config.get(a, 1)) for a in AXES]
  for axis, size in zip(AXES, sizes):
    if size == 0 or size < -1:
      raise ValueError(f"config.mesh.{axis}={size}: sizes must be positive or -1 (the rest)")
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh={dict(zip(AXES, sizes))}: at most one axis may be -1")
  fixed = math.prod(s for s in sizes if s != -1)
  if num_devices % fixed:
    raise ValueError(
      f"config.mesh={dict(zip(AXES, sizes))} needs a multiple of {fixed} devices; "
      f"there are {num_devices}"
    )
  return tuple(num_devices // fixed if s == -1 else s for s in sizes)


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence | None = None) -> Mesh:
  """A mesh over ``devices`` (default: all devices of all processes).

  A mesh smaller than the device count (no ``-1`` and a product that divides it) uses the first
  devices and says so in the log; this is how a test runs 1 device inside an 8-device process.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_shape(mesh_config, len(devices))
  used = math.prod(shape)
  if used < len(devices):
    if jax.process_count() > 1:
      raise ValueError(
        f"config.mesh {dict(zip(AXES, shape))} uses {used} of {len(devices)} "
        "devices; a multi-process run must use them all (set one axis to -1)"
      )
    logging.warning("mesh %s uses %d of %d devices", dict(zip(AXES, shape)), used, len(devices))
    devices = devices[:used]
  if devices[0].platform in ("tpu", "gpu") and used == len(devices):
    # Physical device order matters on accelerators (ICI rings); let jax choose it.
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)
  return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=(AxisType.Auto,) * len(AXES))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Leading (batch) dimension split over ``data`` and ``fsdp``, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def batch_divisor(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def logical_shardings(abstract_tree, mesh: Mesh, rules):
  """NamedShardings for a tree of ``nn.LogicallyPartitioned`` leaves (others replicated)."""
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, tuple(tuple(r) for r in rules))


def check_divisible(abstract_tree, shardings, *, what: str = "parameter") -> None:
  """Every sharded dimension must divide evenly over its mesh axes; names the offending leaf."""
  leaves = jax.tree_util.tree_leaves_with_path(abstract_tree)
  for (path, leaf), sharding in zip(leaves, jax.tree.leaves(shardings)):
    for dim, axes in zip(leaf.shape, sharding.spec):
      axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
      parts = math.prod(sharding.mesh.shape[a] for a in axes)
      if dim % parts:
        raise ValueError(
          f"{what} {jax.tree_util.keystr(path)} of shape {leaf.shape} cannot be "
          f"split {parts} ways over mesh axes {axes} (spec {sharding.spec}); "
          "change config.mesh or config.logical_axis_rules"
        )
