"""Activation caches: a model's activations at a site, written to disk once, read back with grain.

An SAE sweep trains many dictionaries on the same activations; a cache computes them once
(``write``) and the SAE task reads them (``config.sae.activations=DIR``) instead of running the
model every step. A cache directory holds, for the ``train`` and ``validation`` splits,

    {split}.tokens.npy, {split}.segment_ids.npy, {split}.positions.npy   int32 [N, seq_len]
    {split}.acts.npy                                                    float32 [N, seq_len, d_in]
    {split}.rows.npy                                                    int64 [N]
    meta.json   site, seq_len, d_in, the model it came from, rows per split

Cache row ``k`` is row ``rows[k]`` of the corpus split (rows of ``seq_len`` tokens, as the SAE task
cuts them). A full cache (``max_rows=None``) therefore gives ``data_lib.batches`` the same rows in
the same shuffled order as on-the-fly training, with their activations attached; a smaller one
takes rows evenly spaced over the split. ``meta.json`` is written last, so an interrupted write
leaves no cache that could be mistaken for a complete one.
"""

import copy
import json
import os

import jax
import numpy as np

from flaxseed.training import mesh as mesh_lib
from flaxseed.training import tasks as tasks_lib
from flaxseed.training import trainer

KEYS = ("tokens", "segment_ids", "positions")
SPLITS = ("train", "validation")


class Cache:
  """A cache directory, checked against what the SAE task expects (errors name the key)."""

  def __init__(self, directory: str, *, site: str, seq_len: int, d_in: int):
    self.directory = directory
    path = os.path.join(directory, "meta.json")
    if not os.path.exists(path):
      raise ValueError(f"config.sae.activations={directory!r}: no complete activation cache "
                       "(meta.json is missing); write one with experiments/sae/cache.py")
    with open(path, encoding="utf-8") as f:
      self.meta = json.load(f)
    for key, want in (("site", site), ("seq_len", seq_len), ("d_in", d_in)):
      if self.meta[key] != want:
        raise ValueError(f"config.sae.activations={directory!r} holds {key}={self.meta[key]!r}; "
                         f"this run needs {key}={want!r}")

  def split(self, name: str) -> "CachedRows":
    return CachedRows({k: np.load(os.path.join(self.directory, f"{name}.{k}.npy"), mmap_mode="r")
                       for k in KEYS + ("acts",)})


class CachedRows:
  """Rows of a cache split in the ``TokenStream`` interface that ``data_lib.batches`` reads."""

  def __init__(self, arrays: dict[str, np.ndarray]):
    self.arrays = arrays

  def num_rows(self, row_len: int, stride: int) -> int:
    del stride
    if row_len != self.arrays["tokens"].shape[1]:
      raise ValueError(f"the cache has rows of {self.arrays['tokens'].shape[1]} tokens, not "
                       f"{row_len}")
    return len(self.arrays["tokens"])

  def row(self, k: int, row_len: int, stride: int) -> dict[str, np.ndarray]:
    del row_len, stride
    return {name: np.asarray(a[k]) for name, a in self.arrays.items()}


def write(config, directory: str, *, max_rows: int | None = None) -> dict:
  """Writes the activation cache of SAE config ``config`` (its model, ``config.sae.site``, corpus
  and ``seq_len``) to ``directory``; at most ``max_rows`` rows per split. Returns the metadata.
  One process; ``config.batch_size`` rows go through the model at a time."""
  if jax.process_count() > 1:
    raise ValueError("activations.write runs in one process")
  config = copy.deepcopy(config)
  config.sae.activations = ""  # compute them
  mesh = mesh_lib.make_mesh(config.mesh)
  trainer.validate(config, mesh)
  task = tasks_lib.build(config)
  s = trainer.setup(config, task, mesh)
  frozen = s.frozen()
  capture = jax.jit(lambda f, batch: task.activations(f, batch))
  os.makedirs(directory, exist_ok=True)
  if os.path.exists(os.path.join(directory, "meta.json")):
    os.remove(os.path.join(directory, "meta.json"))  # incomplete until rewritten at the end
  rows_per_call, seq_len = config.batch_size, config.seq_len
  counts = {}
  for name, stream in (("train", task.corpus.train), ("validation", task.corpus.validation)):
    n = stream.num_rows(seq_len, seq_len)
    take = n if max_rows is None else min(n, max_rows)
    index = np.arange(take, dtype=np.int64) * n // max(take, 1)
    np.save(os.path.join(directory, f"{name}.rows.npy"), index)
    out = {k: np.lib.format.open_memmap(os.path.join(directory, f"{name}.{k}.npy"), mode="w+",
                                        dtype=np.int32, shape=(take, seq_len)) for k in KEYS}
    out["acts"] = np.lib.format.open_memmap(
        os.path.join(directory, f"{name}.acts.npy"), mode="w+", dtype=np.float32,
        shape=(take, seq_len, task.model.config.d_in))
    for start in range(0, take, rows_per_call):
      chunk = index[start:start + rows_per_call]
      padded = np.concatenate([chunk, np.full(rows_per_call - len(chunk), chunk[-1])])
      rows = [stream.row(int(k), seq_len, seq_len) for k in padded]
      batch = {k: np.stack([r[k] for r in rows]) for k in KEYS}
      with s.context():
        acts = capture(frozen, {k: jax.device_put(v, s.batch_spec[k].sharding)
                                for k, v in batch.items()})
      acts = np.asarray(acts).reshape(rows_per_call, seq_len, -1)
      for k in KEYS:
        out[k][start:start + len(chunk)] = batch[k][:len(chunk)]
      out["acts"][start:start + len(chunk)] = acts[:len(chunk)]
    for a in out.values():
      a.flush()
    counts[name] = take
  meta = {"site": config.sae.site, "seq_len": seq_len, "d_in": task.model.config.d_in,
          "lm_workdir": config.sae.lm_workdir, "lm_family": config.sae.lm_family,
          "rows": counts}
  with open(os.path.join(directory, "meta.json"), "w", encoding="utf-8") as f:
    json.dump(meta, f, indent=2)
  return meta
