"""Parameter paths: one way to name, find and update a leaf of a parameter tree.

A path is the ``/``-joined key path of a leaf (``layers/attn/q/kernel``): what quantization and
LoRA ``targets`` match, what the Hugging Face map (``models/hf.py``) translates, and what errors
name. The zoo's layout facts live here too: which axes of a Dense kernel ``[in..., out...]`` are
inputs (``zoo_num_in``) and whether a path is stacked by ``nn.scan`` (``zoo_stacked``).
"""

import re

import flax.linen as nn
import jax


def path_string(key_path) -> str:
  """The ``/``-joined form of a jax key path."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in key_path)


def param_paths(params) -> list[str]:
  """``/``-joined paths of every leaf (what ``targets`` patterns are matched against)."""
  return [path_string(kp) for kp, _ in jax.tree_util.tree_leaves_with_path(nn.unbox(params))]


def get(tree, path: str):
  """The entry of nested dict ``tree`` at ``path``."""
  for key in path.split("/"):
    tree = tree[key]
  return tree


def update(tree, path: str, fn):
  """A copy of nested dict ``tree`` with the entry at ``path`` set to ``fn(old entry or None)``
  (missing levels are created)."""
  key, _, rest = path.partition("/")
  new = dict(tree)
  new[key] = fn(tree.get(key)) if not rest else update(tree.get(key, {}), rest, fn)
  return new


def zoo_num_in(path: str) -> int:
  """How many axes (after any stacked layer axis) a zoo Dense kernel at ``path`` contracts: one,
  except attention output projections (``.../attn/o/kernel``, ``[H, E, D]``), which contract two."""
  return 2 if re.search(r"(^|/)attn/o/kernel$", path) else 1


def zoo_stacked(path: str) -> int:
  """Leading layer axes of a zoo parameter: 1 under ``layers/`` (``nn.scan``), else 0."""
  return 1 if path.startswith("layers/") else 0
