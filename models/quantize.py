"""Post-training quantization of any zoo model's parameters.

    from flaxseed.models import quantize
    qparams = quantize.quantize_params(params, fmt="int4", group_size=128,
                                       targets=r".*(attn|mlp).*kernel")
    logits = model.apply({"params": qparams}, tokens)      # the same model, quantized weights

Each selected kernel becomes a ``kernels.QuantizedWeight`` leaf; ``layers.Dense`` sees the leaf
type and calls ``kernels.quantized_matmul`` instead of a float matmul, so there is no second
model class. A Dense kernel ``[in..., out...]`` is quantized as the matrix
``[prod(in), prod(out)]`` it multiplies by: the zoo's kernels contract their leading axis, except
attention output projections (``.../attn/o/kernel``, ``[H, E, D]``), which contract two. Layers
stacked by ``nn.scan`` (paths under ``layers/``) carry a leading layer axis: each layer's matrix
is quantized on its own and the ``QuantizedWeight`` leaves keep the layer axis, so the scan
slices them like any parameter (``models/params.py`` says which axes are inputs and stacked). Pass
``num_in`` / ``stacked`` for layouts of your own.
"""

import re
from typing import Callable

import flax.linen as nn
import jax
import numpy as np

from flaxseed import kernels
from flaxseed.models import params as params_lib


def quantize_params(
  params,
  fmt: str = "int8",
  group_size: int | None = None,
  targets: str = r".*(attn|mlp).*kernel",
  num_in: Callable[[str], int] = params_lib.zoo_num_in,
  stacked: Callable[[str], int] = params_lib.zoo_stacked,
):
  """Returns ``params`` with every leaf whose path fully matches ``targets`` quantized.

  Raises ``ValueError`` listing the available paths when nothing matches, and naming the
  parameter when one cannot be quantized in this format (e.g. a group size that does not divide
  its contraction dim).
  """
  params = nn.unbox(params)
  pattern = re.compile(targets)
  matched = []

  def convert(key_path, leaf):
    path = params_lib.path_string(key_path)
    if not pattern.fullmatch(path):
      return leaf
    matched.append(path)
    s, n = stacked(path), num_in(path)
    shape = leaf.shape
    lead, inner = shape[:s], shape[s:]
    matrices = leaf.reshape(lead + (int(np.prod(inner[:n])), int(np.prod(inner[n:]))))
    quantize = lambda m: kernels.quantize_weight(m, fmt, group_size)  # noqa: E731
    for _ in range(s):
      quantize = jax.vmap(quantize)
    try:
      return quantize(matrices)
    except ValueError as e:
      raise ValueError(
        f"cannot quantize {path} (shape {shape}, as {len(lead)} stacked "
        f"[{matrices.shape[-2]}, {matrices.shape[-1]}]): {e}"
      ) from None

  out = jax.tree_util.tree_map_with_path(convert, params)
  if not matched:
    raise ValueError(
      f"targets={targets!r} matches no parameter; the paths are:\n  "
      + "\n  ".join(params_lib.param_paths(params))
    )
  return out


def weight_bytes(params) -> int:
  """Bytes of all parameters as stored (quantized leaves count their packed codes and scales,
  packed 2:4 leaves their values and positions)."""
  total = 0
  packed = (kernels.QuantizedWeight, kernels.Sparse24Weight)
  for leaf in jax.tree.leaves(nn.unbox(params), is_leaf=lambda x: isinstance(x, packed)):
    if isinstance(leaf, packed):
      total += leaf.nbytes
    else:
      total += leaf.size * leaf.dtype.itemsize
  return int(total)
