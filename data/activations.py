"""Activation caches: a model's activations at a site, written to disk once, read back with grain.

This module reads a cache (``Cache``); ``training/activations.py`` writes one (it runs the model).

An SAE sweep trains many dictionaries on the same activations; a cache computes them once
(``training/activations.py``'s ``write``) and the SAE task reads them
(``config.sae.activations=DIR``) instead of running the model every step. A cache directory holds,
for the ``train`` and ``validation`` splits,

    {split}.tokens.npy, {split}.segment_ids.npy, {split}.positions.npy   int32 [N, seq_len]
    {split}.acts.npy                                                    float32 [N, seq_len, d_in]
    {split}.rows.npy                                                    int64 [N]
    meta.json   site, seq_len, d_in, the model it came from, rows per split

Cache row ``k`` is row ``rows[k]`` of the corpus split (rows of ``seq_len`` tokens, as the SAE task
cuts them). A full cache (``max_rows=None``) therefore gives ``pipeline.batches`` the same rows in
the same shuffled order as on-the-fly training, with their activations attached; a smaller one
takes rows evenly spaced over the split. ``meta.json`` is written last, so an interrupted write
leaves no cache that could be mistaken for a complete one.
"""

import json
import os

import numpy as np

from flaxseed.data import pipeline

KEYS = ("tokens", "segment_ids", "positions")
SPLITS = ("train", "validation")


class Cache:
  """A cache directory, checked against what the SAE task expects (errors name the key)."""

  def __init__(self, directory: str, *, site: str, seq_len: int, d_in: int):
    self.directory = directory
    path = os.path.join(directory, "meta.json")
    if not os.path.exists(path):
      raise ValueError(
        f"config.sae.activations={directory!r}: no complete activation cache "
        "(meta.json is missing); write one with experiments/sae/cache.py"
      )
    with open(path, encoding="utf-8") as f:
      self.meta = json.load(f)
    for key, want in (("site", site), ("seq_len", seq_len), ("d_in", d_in)):
      if self.meta[key] != want:
        raise ValueError(
          f"config.sae.activations={directory!r} holds {key}={self.meta[key]!r}; "
          f"this run needs {key}={want!r}"
        )

  def split(self, name: str) -> pipeline.Rows:
    """The rows of split ``name`` with their activations, memory-mapped."""
    arrays = {
      k: np.load(os.path.join(self.directory, f"{name}.{k}.npy"), mmap_mode="r")
      for k in KEYS + ("acts",)
    }
    return pipeline.Rows(arrays, check_len=True)
