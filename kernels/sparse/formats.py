"""The packed 2:4 format: a weight ``W [K, N]`` with at most 2 nonzeros in every 4 consecutive rows
of each column (what ``models/prune.py`` leaves with ``nm="2:4"``), stored as

- ``values [2, K / 4, N]``: the first and the second kept weight of each group of 4 rows (a
  group with fewer than two nonzeros keeps zeros), in the weight's dtype;
- ``meta [K / 8, N]`` uint8: each group's two positions ``p0 < p1`` in ``0..3`` as a nibble
  ``p0 | p1 << 2``; byte row ``r`` holds group ``r`` in its low nibble and group ``r + K / 8`` in
  its high nibble (the segment layout of the quantized formats, so a kernel unpacks a tile with
  shifts and no interleaving).

So ``W`` costs half its values plus 4 bits per group: 53% of a float32 weight, 56% of bfloat16.
The matmul needs no interleaving either: ``x W = sum over r of x[:, r::4] W_r`` where ``W_r [K/4,
N]`` holds the kept weights at position ``r`` of their group (zeros elsewhere).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Sparse24Weight:
  """A packed 2:4 weight (module docstring). A pytree: ``values`` and ``meta`` are leaves,
  ``shape`` static, so it passes through ``jit``, sharding and checkpoints like a parameter."""

  values: jax.Array  # [2, K / 4, N]
  meta: jax.Array  # [K / 8, N] uint8
  shape: tuple[int, int] = dataclasses.field(metadata=dict(static=True))  # the dense [K, N]

  @property
  def nbytes(self) -> int:
    """Bytes of the packed values and positions (what a matmul reads)."""
    return int(self.values.size * self.values.dtype.itemsize + self.meta.size)


def pack_24(w, name: str = "w") -> Sparse24Weight:
  """The packed form of a 2:4-sparse ``w [K, N]`` (``K`` a multiple of 8); a ``ValueError``
  naming ``name`` if a group of 4 rows holds more than two nonzeros (nothing is dropped)."""
  w = np.asarray(w)
  if w.ndim != 2 or w.shape[0] % 8:
    raise ValueError(f"{name}: a 2:4 weight is [K, N] with K a multiple of 8, got {w.shape}")
  k, n = w.shape
  groups = w.reshape(k // 4, 4, n)  # [G, 4, N]
  nonzero = groups != 0
  if (nonzero.sum(1) > 2).any():
    g, col = np.argwhere(nonzero.sum(1) > 2)[0]
    raise ValueError(
      f"{name} is not 2:4 sparse: rows {4 * g}..{4 * g + 3} of column {col} hold "
      f"{int(nonzero[g, :, col].sum())} nonzeros (prune it with nm='2:4' first)"
    )
  # positions: the nonzeros first (in order), then the zero slots (in order); keep the first two
  order = np.argsort(~nonzero, axis=1, kind="stable")[:, :2]  # [G, 2, N]
  p0, p1 = np.sort(order, axis=1).transpose(1, 0, 2)
  values = np.stack([np.take_along_axis(groups, p[:, None], 1)[:, 0] for p in (p0, p1)])
  nibbles = (p0 | (p1 << 2)).astype(np.uint8)  # [G, N]
  half = k // 8
  meta = nibbles[:half] | (nibbles[half:] << 4)
  return Sparse24Weight(jnp.asarray(values), jnp.asarray(meta, jnp.uint8), (k, n))


def positions(meta):
  """``(p0, p1)``, each ``[K / 4, N]`` int32, from the packed ``meta [K / 8, N]``."""
  nib = meta.astype(jnp.int32)
  nibbles = jnp.concatenate([nib & 15, nib >> 4], axis=0)
  return nibbles & 3, nibbles >> 2


def position_weights(values, p0, p1, r: int, dtype):
  """``W_r``: the kept weights at position ``r`` of their group, zeros elsewhere."""
  zero = jnp.zeros((), dtype)
  return jnp.where(p0 == r, values[0].astype(dtype), zero) + jnp.where(
    p1 == r, values[1].astype(dtype), zero
  )


def unpack_24(sw: Sparse24Weight, dtype=jnp.float32):
  """The dense ``W [K, N]``."""
  p0, p1 = positions(sw.meta)
  rows = [position_weights(sw.values, p0, p1, r, dtype) for r in range(4)]  # each [K/4, N]
  return jnp.stack(rows, axis=1).reshape(sw.shape)
