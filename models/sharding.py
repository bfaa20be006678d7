"""Logical axis names: the vocabulary that connects model code to a device mesh.

Every parameter is created with ``nn.with_logical_partitioning(init, names)`` and activations are
constrained at block boundaries with ``constrain``. Models never name mesh axes; the config's
``logical_axis_rules`` table maps these names to mesh axes (``data``, ``fsdp``, ``tensor``).
Flax applies the rules in order and never uses a mesh axis twice in one array, so an activation
``(BATCH, LENGTH, EMBED)`` gets its batch sharded over ``("data", "fsdp")`` while the ``EMBED ->
fsdp`` rule, meant for weights, is skipped for it.
"""

import flax.linen as nn

BATCH = "batch"
LENGTH = "length"
EMBED = "embed"  # model width D
HEADS = "heads"  # query heads H
KV_HEADS = "kv_heads"  # key/value heads K
HEAD_DIM = "head_dim"  # E
MLP = "mlp"  # F
VOCAB = "vocab"  # V
LAYERS = "layers"  # the stacked axis that nn.scan adds
NORM = "norm"  # norm scales and biases (never sharded)

# The default table (configs/common.py copies it into every config, where it can be changed).
DEFAULT_RULES = (
  (BATCH, ("data", "fsdp")),
  (VOCAB, "tensor"),
  (HEADS, "tensor"),
  (KV_HEADS, "tensor"),
  (MLP, "tensor"),
  (EMBED, "fsdp"),
  (LENGTH, None),
  (HEAD_DIM, None),
  (LAYERS, None),
  (NORM, None),
)


def constrain(x, names):
  """Sharding constraint by logical names; a no-op outside ``nn.logical_axis_rules``."""
  return nn.with_logical_constraint(x, names)
