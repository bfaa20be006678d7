"""Writes activation caches: a model's activations at a site, computed once for an SAE sweep.

The cache layout and its reader are in ``data/activations.py``; the SAE task reads a cache with
``config.sae.activations=DIR`` instead of running the model every step.
"""

import copy
import json
import os

import jax
import numpy as np

from flaxseed.data import activations as cache_lib
from flaxseed.training import trainer


def write(config, directory: str, *, max_rows: int | None = None) -> dict:
  """Writes the activation cache of SAE config ``config`` (its model, ``config.sae.site``, corpus
  and ``seq_len``) to ``directory``; at most ``max_rows`` rows per split. Returns the metadata.
  One process; ``config.batch_size`` rows go through the model at a time."""
  if jax.process_count() > 1:
    raise ValueError("activations.write runs in one process")
  config = copy.deepcopy(config)
  config.sae.activations = ""  # compute them
  s = trainer.setup(config)
  task = s.task
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
    out = {
      k: np.lib.format.open_memmap(
        os.path.join(directory, f"{name}.{k}.npy"), mode="w+", dtype=np.int32, shape=(take, seq_len)
      )
      for k in cache_lib.KEYS
    }
    out["acts"] = np.lib.format.open_memmap(
      os.path.join(directory, f"{name}.acts.npy"),
      mode="w+",
      dtype=np.float32,
      shape=(take, seq_len, task.model.config.d_in),
    )
    for start in range(0, take, rows_per_call):
      chunk = index[start : start + rows_per_call]
      padded = np.concatenate([chunk, np.full(rows_per_call - len(chunk), chunk[-1])])
      rows = [stream.row(int(k), seq_len, seq_len) for k in padded]
      batch = {k: np.stack([r[k] for r in rows]) for k in cache_lib.KEYS}
      with s.context():
        acts = capture(
          frozen, {k: jax.device_put(v, s.batch_spec[k].sharding) for k, v in batch.items()}
        )
      acts = np.asarray(acts).reshape(rows_per_call, seq_len, -1)
      for k in cache_lib.KEYS:
        out[k][start : start + len(chunk)] = batch[k][: len(chunk)]
      out["acts"][start : start + len(chunk)] = acts[: len(chunk)]
    for a in out.values():
      a.flush()
    counts[name] = take
  meta = {
    "site": config.sae.site,
    "seq_len": seq_len,
    "d_in": task.model.config.d_in,
    "lm_workdir": config.sae.lm_workdir,
    "lm_family": config.sae.lm_family,
    "rows": counts,
  }
  with open(os.path.join(directory, "meta.json"), "w", encoding="utf-8") as f:
    json.dump(meta, f, indent=2)
  return meta
