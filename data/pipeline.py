"""Batches: rows of a split -> this process's part of global batch ``t`` -> a grain dataset.

Global batch ``t`` is rows ``order[t * B : (t + 1) * B]``, where ``order`` is a seeded permutation
of the split's rows, reshuffled every epoch (grain ``shuffle`` + ``repeat``). A process builds only
the rows of the batch that its devices hold, so a run's global batches are identical on 1 device,
8 devices or several processes. The grain iterator's state (the next ``t``) is saved with every
checkpoint.

A split is anything with ``num_rows(row_len, stride)`` and ``row(k, row_len, stride)``: a corpus's
``TokenStream`` (``data/corpus.py``) cuts rows from a token stream, ``Rows`` holds fixed rows (SFT
examples, activation caches).
"""

import grain
import numpy as np


class Rows:
  """Fixed rows: ``arrays[name][k]`` is row ``k``'s ``name``; every array has one row per index.

  ``row_len`` is checked against the rows' length when ``check_len`` is set (an activation cache
  holds rows of one length); otherwise it is ignored (SFT rows are already padded to length).
  """

  def __init__(self, arrays: dict[str, np.ndarray], *, check_len: bool = False):
    self.arrays = arrays
    self.check_len = check_len

  def num_rows(self, row_len: int, stride: int) -> int:
    del stride
    length = self.arrays["tokens"].shape[1]
    if self.check_len and row_len != length:
      raise ValueError(f"the rows hold {length} tokens each, not {row_len}")
    return len(self.arrays["tokens"])

  def row(self, k: int, row_len: int, stride: int) -> dict[str, np.ndarray]:
    del row_len, stride
    return {name: np.asarray(a[k]) for name, a in self.arrays.items()}


def process_rows(sharding, global_batch: int) -> tuple[int, int]:
  """The rows ``[start, stop)`` of a global batch that this process's devices hold."""
  index_map = sharding.addressable_devices_indices_map((global_batch, 1))
  starts = sorted({idx[0].start or 0 for idx in index_map.values()})
  stops = sorted(
    {global_batch if idx[0].stop is None else idx[0].stop for idx in index_map.values()}
  )
  start, stop = starts[0], stops[-1]
  held = set()
  for idx in index_map.values():
    held.update(range(idx[0].start or 0, global_batch if idx[0].stop is None else idx[0].stop))
  if held != set(range(start, stop)):
    raise ValueError(
      "this process holds non-contiguous batch rows; put the 'tensor' axis within a process"
    )
  return start, stop


def _stack(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def batches(
  stream,
  *,
  num_batches: int,
  global_batch: int,
  rows: tuple[int, int],
  row_len: int,
  stride: int,
  seed: int | None,
  name: str,
):
  """A grain ``MapDataset``: element ``t`` is this process's rows of global batch ``t``.

  ``seed=None`` keeps the rows in order (evaluation); otherwise rows are shuffled with ``seed``
  and reshuffled each epoch.
  """
  n = stream.num_rows(row_len, stride)
  if n < global_batch:
    raise ValueError(
      f"the {name} split has {n} rows of {row_len} tokens, fewer than "
      f"batch_size={global_batch}; use a larger corpus or a smaller batch/seq_len"
    )
  if seed is None and num_batches * global_batch > n:
    raise ValueError(
      f"config.eval_batches={num_batches} x batch_size={global_batch} needs "
      f"{num_batches * global_batch} rows; the {name} split has {n}"
    )
  order = grain.MapDataset.range(n)
  if seed is not None:
    order = order.shuffle(seed=seed).repeat(None)
  start, stop = rows

  def local_batch(t):
    return _stack(
      [stream.row(order[t * global_batch + j], row_len, stride) for j in range(start, stop)]
    )

  return grain.MapDataset.range(num_batches).map(local_batch)


def train_and_eval(
  train,
  evaluation,
  *,
  global_batch: int,
  rows: tuple[int, int],
  row_len: int,
  stride: int | None = None,
  train_batches: int,
  eval_batches: int,
  seed: int,
):
  """(train, eval) ``batches`` of two splits: the train rows shuffled with ``seed``, the eval rows
  in order (what a task's ``datasets`` returns). ``stride`` defaults to ``row_len`` (rows that do
  not overlap; fixed ``Rows`` ignore it)."""
  stride = row_len if stride is None else stride
  common = dict(global_batch=global_batch, rows=rows, row_len=row_len, stride=stride)
  return (
    batches(train, num_batches=train_batches, seed=seed, name="train", **common),
    batches(evaluation, num_batches=eval_batches, seed=None, name="validation", **common),
  )


def train_iterator(dataset: grain.MapDataset):
  """A checkpointable iterator with background prefetching."""
  return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)))
