"""Needle rows: associative recall beyond an attention window (the Titans study's probe).

A row of ``length`` tokens is random filler with ``num_pairs`` key-value pairs written as
``PAIR k v`` in its first ``region`` fraction (before the queries), ending in ``QUERY k v`` for
every key, in a random order (multi-query associative recall): after each ``QUERY k`` a model must
emit that key's value. ``rows`` makes rows of any length, so a model trained at one length can be
evaluated at others. The task that trains on them is ``training/tasks/needle.py``.
"""

import numpy as np

# Token ids: below the filler range, so byte-vocabulary models can read them.
PAIR, QUERY, KEYS, VALUES, FILLER = 1, 2, 16, 64, 128


def rows(
  rng: np.random.Generator,
  batch: int,
  length: int,
  *,
  num_pairs: int,
  num_keys: int,
  num_values: int,
  region: float,
) -> np.ndarray:
  """``[batch, length]`` int32 needle rows: pairs in the first ``region`` of the row before the
  queries, ``num_pairs`` ``QUERY k v`` triples at its end."""
  if not 1 <= num_pairs <= num_keys <= VALUES - KEYS:
    raise ValueError(
      f"config.needle: need 1 <= num_pairs={num_pairs} <= num_keys={num_keys} <= {VALUES - KEYS}"
    )
  if not 1 <= num_values <= FILLER - VALUES:
    raise ValueError(f"config.needle.num_values={num_values} must be in [1, {FILLER - VALUES}]")
  queries = 3 * num_pairs
  slots = int(region * (length - queries)) // 3  # room for PAIR k v triples before the queries
  if not 0 < region <= 1 or slots < num_pairs:
    raise ValueError(
      f"config.needle.region={region}: rows of {length} tokens hold {max(slots, 0)}"
      f" pairs in their first {region:.0%}, fewer than num_pairs={num_pairs}"
    )
  out = rng.integers(FILLER, 256, size=(batch, length)).astype(np.int32)
  for row in out:
    keys = KEYS + rng.choice(num_keys, num_pairs, replace=False)
    values = VALUES + rng.integers(0, num_values, num_pairs)
    for slot, k, v in zip(np.sort(rng.choice(slots, num_pairs, replace=False)), keys, values):
      row[3 * slot : 3 * slot + 3] = (PAIR, k, v)
    for i, asked in enumerate(rng.permutation(num_pairs)):
      row[length - queries + 3 * i : length - queries + 3 * i + 3] = (
        QUERY,
        keys[asked],
        values[asked],
      )
  return out


def answer_positions(length: int, num_pairs: int) -> np.ndarray:
  """Indices of the values asked for in a row of ``length`` tokens (the last of each triple)."""
  return length - 1 - 3 * np.arange(num_pairs)
