"""One-shot pruning of any zoo model: magnitude, Wanda and SparseGPT, unstructured or N:M.

    from flaxseed.models import prune
    pruned, masks = prune.prune(model, params, calibration_tokens, method="wanda", sparsity=0.5)
    pruned, masks = prune.prune(model, params, calibration_tokens, method="sparsegpt", nm="2:4")
    logits = model.apply({"params": pruned}, tokens)          # the same model, zeros written

Every Dense kernel whose path matches ``targets`` (default: the attention and MLP projections,
as quantization's) is viewed as the matrix ``W [in, out]`` it multiplies by (``y = x W``). A
pruned output unit (a column of ``W``, a row in PyTorch's layout) loses exactly
``floor(sparsity * in)`` of its inputs, or, under ``nm=(n, m)``, keeps ``n`` of every ``m``
consecutive inputs (2:4 and 4:8 are 50%). The methods differ in which inputs go:

- ``magnitude``: the smallest ``|W|`` of the whole matrix (Wanda's baseline; the only method
  whose per-unit counts vary; under N:M it is per group, like the others);
- ``magnitude_row``: the smallest ``|W|`` of each output unit;
- ``wanda`` (Sun et al. 2023): the smallest ``|W_ij| * ||X_i||`` per output unit, ``X`` the
  layer's calibration inputs;
- ``sparsegpt`` (Frantar & Alistarh 2023): optimal-brain-surgeon pruning with the inputs'
  Hessian ``H = X^T X``: columns processed in blocks of ``blocksize``, each block's mask chosen
  by ``w^2 / [H^-1]_ii^2``, and every pruned weight's error compensated in the weights not yet
  processed; ``percdamp`` adds that fraction of ``mean(diag H)`` to the diagonal. Deviation from
  the reference: the reference picks a block's unstructured mask across all output units at once;
  here each unit's count per block is chosen so that its total is exact, as the other methods'.

Calibration-based methods prune the model block by block in call order (``layers_0`` before
``layers_1``): each block's inputs are captured (``flax.linen.intercept_methods`` on its Dense
calls) from a forward of the calibration tokens through the blocks already pruned, so later
blocks see the pruned model's activations (the reference implementations' re-propagation). The
statistics are accumulated on the host in float64 over batches of ``batch_size`` rows.

Returns ``(params, masks)``: ``masks[path]`` is the boolean keep-mask of each pruned kernel (its
shape), for a sparse fine-tune that keeps it (``apply_masks``) or for export.

Zeros alone save nothing. ``pack(params)`` turns every 2:4-sparse kernel into a
``kernels.Sparse24Weight`` (half the values and 4 bits of positions per group of 4: 53% of the
float32 bytes); ``layers.Dense`` multiplies by it with ``kernels.sparse24_matmul``, so the same
model runs on the packed parameters (``quantize.weight_bytes`` counts what they hold).
"""

import collections
import math
import re

import flax.linen as nn
import jax
import numpy as np

from flaxseed.models import layers
from flaxseed.models import params as params_lib
from flaxseed.models import sites

METHODS = ("magnitude", "magnitude_row", "wanda", "sparsegpt")
CALIBRATED = ("wanda", "sparsegpt")


def parse_nm(nm) -> tuple[int, int] | None:
  """``"2:4"`` or ``(2, 4)`` -> ``(2, 4)``: keep ``n`` of every ``m`` consecutive inputs."""
  if nm is None:
    return None
  try:
    n, m = (int(x) for x in (nm.split(":") if isinstance(nm, str) else nm))
  except (TypeError, ValueError):
    raise ValueError(f"nm={nm!r}: 'n:m' (keep n of every m inputs), e.g. '2:4'") from None
  if not 0 < n < m:
    raise ValueError(f"nm={nm!r}: need 0 < n < m (keep n of every m inputs)")
  return n, m


def check_sparsity(sparsity) -> float:
  if not (isinstance(sparsity, (int, float)) and 0 <= sparsity < 1):  # NaN fails too
    raise ValueError(f"sparsity={sparsity!r} must be in [0, 1)")
  return float(sparsity)


def select(scores_OI, sparsity: float, nm=None) -> np.ndarray:
  """The keep-mask ``[O, I]`` that drops the lowest scores of each row: ``floor(sparsity * I)``
  of them, or all but ``n`` of every ``m`` consecutive ones under ``nm``. Ties go to the
  earlier input (a stable sort), so the counts are exact."""
  scores_OI = np.asarray(scores_OI)
  out, inp = scores_OI.shape
  if nm is not None:
    n, m = nm
    groups = scores_OI.reshape(out, inp // m, m)
    rank = np.argsort(np.argsort(-groups, axis=-1, kind="stable"), axis=-1, kind="stable")
    return (rank < n).reshape(out, inp)
  drop = int(math.floor(sparsity * inp))
  rank = np.argsort(np.argsort(scores_OI, axis=-1, kind="stable"), axis=-1, kind="stable")
  return rank >= drop


def magnitude_matrix(w_OI, sparsity: float) -> np.ndarray:
  """The keep-mask dropping the ``floor(sparsity * size)`` smallest ``|W|`` of the matrix."""
  flat = np.abs(np.asarray(w_OI)).reshape(-1)
  drop = int(math.floor(sparsity * flat.size))
  rank = np.argsort(np.argsort(flat, kind="stable"), kind="stable")
  return (rank >= drop).reshape(w_OI.shape)


def sparsegpt(
  w_OI, hessian_II, sparsity: float, nm=None, *, blocksize: int = 128, percdamp: float = 0.01
):
  """``(pruned W [O, I], keep-mask)`` by SparseGPT (module docstring), in float64."""
  w = np.array(w_OI, np.float64)
  h = np.array(hessian_II, np.float64)
  out, inp = w.shape
  dead = np.diag(h) == 0  # inputs never active: no information, any weight is as good
  h[dead, dead] = 1.0
  h[np.diag_indices(inp)] += percdamp * np.mean(np.diag(h))
  # The upper Cholesky factor of H^-1: row i holds the OBS update of the columns after i.
  hinv = np.linalg.cholesky(np.linalg.inv(h)).T
  keep = np.ones((out, inp), bool)
  for i1 in range(0, inp, blocksize):
    i2 = min(i1 + blocksize, inp)
    w1, hinv1 = w[:, i1:i2].copy(), hinv[i1:i2, i1:i2]
    err1 = np.zeros_like(w1)
    saliency = w1**2 / np.diag(hinv1)[None, :] ** 2
    if nm is None:
      # each row drops its share of this block so that its total is exactly floor(s * I)
      drop = int(math.floor(sparsity * i2)) - int(math.floor(sparsity * i1))
      rank = np.argsort(np.argsort(saliency, axis=-1, kind="stable"), axis=-1, kind="stable")
      keep1 = rank >= drop
    else:
      keep1 = np.ones_like(w1, bool)
    for i in range(i2 - i1):
      if nm is not None and i % nm[1] == 0:  # the group's mask, from the weights as updated
        group = w1[:, i : i + nm[1]] ** 2 / np.diag(hinv1)[i : i + nm[1]][None, :] ** 2
        keep1[:, i : i + nm[1]] = select(group, 0.0, nm)
      q = np.where(keep1[:, i], w1[:, i], 0.0)
      err = (w1[:, i] - q) / hinv1[i, i]
      w1[:, i:] -= np.outer(err, hinv1[i, i:])
      w1[:, i] = q
      err1[:, i] = err
    w[:, i1:i2] = w1
    w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    keep[:, i1:i2] = keep1
  return w * keep, keep


def prune_matrix(w_IO, method: str, sparsity: float, nm=None, stats=None, **sparsegpt_kw):
  """``(pruned W [I, O], keep-mask [I, O])`` of one matrix in flaxseed's layout (``y = x W``).
  ``stats``: the calibration inputs' ``{"sq": sum_t x_ti^2 [I], "xtx": X^T X [I, I]}``."""
  w_OI = np.asarray(w_IO, np.float64).T
  if method == "sparsegpt":
    pruned_OI, keep_OI = sparsegpt(w_OI, stats["xtx"], sparsity, nm, **sparsegpt_kw)
    return pruned_OI.T, keep_OI.T
  if method == "magnitude" and nm is None:
    keep_OI = magnitude_matrix(w_OI, sparsity)
  elif method in ("magnitude", "magnitude_row"):
    keep_OI = select(np.abs(w_OI), sparsity, nm)
  elif method == "wanda":
    keep_OI = select(np.abs(w_OI) * np.sqrt(stats["sq"])[None, :], sparsity, nm)
  else:
    raise ValueError(f"method={method!r} is not one of {METHODS}")
  return (w_OI * keep_OI).T, keep_OI.T


def prune(
  model,
  params,
  tokens,
  *,
  method: str,
  sparsity: float = 0.0,
  nm=None,
  targets: str = r".*(attn|mlp).*kernel",
  batch_size: int = 16,
  blocksize: int = 128,
  percdamp: float = 0.01,
  **apply_kwargs,
):
  """``(pruned params, {path: keep-mask})`` (module docstring). ``tokens`` ``[N, L]`` are the
  calibration rows (unused by the magnitude methods); ``apply_kwargs`` go to ``model.apply``.
  ``sparsity`` and ``nm`` are exclusive: under ``nm`` the sparsity is ``1 - n / m``."""
  if method not in METHODS:
    raise ValueError(f"method={method!r} is not one of {METHODS}")
  nm = parse_nm(nm)
  sparsity = check_sparsity(sparsity)
  if nm is not None and sparsity:
    raise ValueError(f"sparsity={sparsity} and nm={nm}: an N:M pattern fixes the sparsity")
  sites.check_unscanned(model, "prune")
  params = nn.unbox(params)
  pattern = re.compile(targets)
  kernels = {
    p: params_lib.get(params, p) for p in params_lib.param_paths(params) if pattern.fullmatch(p)
  }
  if not kernels:
    raise ValueError(
      f"targets={targets!r} matches no parameter; the paths are:\n  "
      + "\n  ".join(params_lib.param_paths(params))
    )
  shapes = {}
  for path, kernel in kernels.items():
    n_in = params_lib.zoo_num_in(path)
    rows = int(np.prod(kernel.shape[:n_in]))
    shapes[path] = (rows, int(np.prod(kernel.shape[n_in:])))
    if nm is not None and rows % nm[1]:
      raise ValueError(
        f"nm={nm[0]}:{nm[1]}: m={nm[1]} does not divide the input width {rows} of {path} "
        f"(shape {kernel.shape})"
      )
  tokens = np.asarray(tokens)
  if method in CALIBRATED and (tokens.ndim != 2 or not tokens.size):
    raise ValueError(f"method={method!r} needs calibration tokens [N, L], got {tokens.shape}")

  masks = {}
  for paths in _blocks(model, params, tokens[:1], list(kernels), apply_kwargs).values():
    stats = (
      _statistics(model, params, tokens, paths, batch_size, method == "sparsegpt", apply_kwargs)
      if method in CALIBRATED
      else {}
    )
    for path in paths:
      kernel = params_lib.get(params, path)
      w_IO = np.asarray(kernel, np.float64).reshape(shapes[path])
      pruned, keep = prune_matrix(
        w_IO,
        method,
        sparsity,
        nm,
        stats.get(path),
        **({"blocksize": blocksize, "percdamp": percdamp} if method == "sparsegpt" else {}),
      )
      masks[path] = keep.reshape(kernel.shape)
      value = jax.numpy.asarray(pruned.reshape(kernel.shape), kernel.dtype)
      params = params_lib.update(params, path, lambda _, v=value: v)
  return params, masks


def pack(params, targets: str = r".*(attn|mlp).*kernel"):
  """``params`` with every kernel matching ``targets`` packed as a ``kernels.Sparse24Weight``
  (as the ``[in, out]`` matrix it multiplies by); a ``ValueError`` names a kernel that is not
  2:4 sparse along its inputs (prune it with ``nm="2:4"``) or a scanned stack (unpacked layers
  only)."""
  from flaxseed import kernels  # pylint: disable=g-import-not-at-top

  params = nn.unbox(params)
  pattern = re.compile(targets)
  paths = [p for p in params_lib.param_paths(params) if pattern.fullmatch(p)]
  if not paths:
    raise ValueError(f"targets={targets!r} matches no parameter")
  for path in paths:
    if params_lib.zoo_stacked(path):
      raise ValueError(f"{path}: a scanned stack; pack models with scan_layers=False")
    kernel = np.asarray(params_lib.get(params, path))
    n_in = params_lib.zoo_num_in(path)
    matrix = kernel.reshape(int(np.prod(kernel.shape[:n_in])), -1)
    packed = kernels.pack_24(matrix, name=path)
    params = params_lib.update(params, path, lambda _, v=packed: v)
  return params


def apply_masks(params, masks):
  """``params`` with every masked kernel's dropped weights set to zero (after a fine-tuning
  update, so the sparsity pattern stays)."""
  for path, keep in masks.items():
    params = params_lib.update(params, path, lambda w, k=keep: w * k.astype(w.dtype))
  return params


def _dense_path(context) -> str | None:
  if context.method_name != "__call__" or not isinstance(context.module, layers.Dense):
    return None
  return "/".join(context.module.path) + "/kernel"


def _blocks(model, params, tokens, paths, apply_kwargs):
  """The target kernels grouped by their top-level block, blocks in the order the model calls
  them (one forward of one row)."""
  order = []

  def record(next_fun, args, kw, context):
    path = _dense_path(context)
    if path in paths and path not in order:
      order.append(path)
    return next_fun(*args, **kw)

  with nn.intercept_methods(record):
    model.apply({"params": params}, tokens, **apply_kwargs)
  order += [p for p in paths if p not in order]  # not called on this input: pruned last
  blocks = collections.OrderedDict()
  for path in order:
    blocks.setdefault(path.split("/")[0], []).append(path)
  return blocks


def _statistics(model, params, tokens, paths, batch_size, hessian, apply_kwargs):
  """``{path: {"sq", "xtx"}}``: each kernel's calibration inputs, summed over every token
  (``X^T X`` only when ``hessian``)."""
  stats = {}

  def capture(next_fun, args, kw, context):
    path = _dense_path(context)
    if path in paths:
      n_in = params_lib.zoo_num_in(path)
      x = np.asarray(args[0], np.float64)
      x = x.reshape(-1, int(np.prod(x.shape[x.ndim - n_in :])))
      s = stats.setdefault(path, {"sq": 0.0, "xtx": 0.0})
      s["sq"] = s["sq"] + (x**2).sum(0)
      if hessian:
        s["xtx"] = s["xtx"] + x.T @ x
    return next_fun(*args, **kw)

  for start in range(0, len(tokens), batch_size):
    with nn.intercept_methods(capture):
      # eager (not jitted): the interceptor reads concrete inputs
      model.apply({"params": params}, tokens[start : start + batch_size], **apply_kwargs)
  return stats
