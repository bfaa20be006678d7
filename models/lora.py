"""LoRA as a transform over parameter trees: LoRA, rsLoRA, DoRA, PiSSA, QLoRA, merge and unmerge.

No model is copied or wrapped. Adapters are their own small pytree; ``apply`` puts a ``LoraWeight``
leaf where each targeted kernel was, and ``layers.Dense`` (the zoo's one projection layer) sees the
leaf type and adds the low-rank path to its matmul, quantized or not:

    from flaxseed.models import lora
    cfg = lora.LoraConfig(rank=8, alpha=16, targets=r".*attn.*(q|v).*kernel", variant="lora",
                          init="default")   # variant: lora | rslora | dora ; init: default | pissa
    adapters = lora.init(rng, params, cfg)            # small pytree, sharded like the base weights
    logits   = lora.apply(model, params, adapters, cfg, tokens)
    merged   = lora.merge(params, adapters, cfg)      # a plain param tree, params' structure
    params2  = lora.unmerge(merged, adapters, cfg)    # the base (lora, rslora; pissa: residual)
    hf.to_peft(adapters, cfg, "/out/adapter")         # peft's safetensors layout (models/hf.py)

A Dense kernel ``[in..., out...]`` multiplies as the matrix ``W [I, O]`` (``I = prod(in)``; which
axes are inputs follows ``models/params.py``: the zoo's kernels contract their leading axis, the
attention output projection two; layers stacked by ``nn.scan`` keep a leading layer axis, and so do
their adapters, which the scan slices like any parameter). The adapter of ``W`` is
``a [I, r]`` and ``b [r, O]`` (plus ``magnitude [O]`` for DoRA) and

* ``lora``:   ``y = x W + s (x a) b`` with ``s = alpha / r``; ``a`` he-uniform, ``b`` zeros, so a
  fresh adapter changes nothing (Hu et al.; peft, qwix and flax's defaults).
* ``rslora``: the same with ``s = alpha / sqrt(r)`` (Kalajdzievski; peft ``use_rslora``).
* ``dora``:   ``y = x V * (m / ||V||_col)`` with ``V = W + s a b``, the column norm over the input
  axis and the magnitude ``m`` initialized to ``||W||_col`` (Liu et al.; peft ``use_dora``).
* ``init="pissa"``: ``a = U_r sqrt(S_r / s)``, ``b = sqrt(S_r / s) V_r^T`` from the top-``r`` SVD
  ``W = U S V^T``, so ``s a b`` is the principal part of ``W``; the model must then run on the
  frozen residual ``W - s a b``, which is ``unmerge(params, adapters, cfg)`` (Meng et al.; peft
  ``init_lora_weights="pissa"``).
* QLoRA: the base may be quantized (``models/quantize.py``: int8, int4, NF4). The adapter's path
  adds to the quantized matmul of the base; only the adapters are differentiated. DoRA needs the
  base's column norms, so with a quantized base it dequantizes the weight.

Targets that match nothing raise a ``ValueError`` listing the available paths.
"""

import dataclasses
import math
import re
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from flaxseed import kernels
from flaxseed.models import params as params_lib

VARIANTS = ("lora", "rslora", "dora")
INITS = ("default", "pissa")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
  """Rank, scale, targets (a regex fully matching ``/``-joined parameter paths) and the variant."""

  rank: int = 8
  alpha: float = 16.0
  targets: str = r".*attn/(q|v)/kernel"
  variant: str = "lora"  # see VARIANTS
  init: str = "default"  # see INITS

  def __post_init__(self):
    if self.rank <= 0:
      raise ValueError(f"rank={self.rank} must be positive")
    if not (math.isfinite(self.alpha) and self.alpha > 0):  # NaN fails it, unlike `<= 0`
      raise ValueError(f"alpha={self.alpha} must be positive and finite")
    if self.variant not in VARIANTS:
      raise ValueError(f"variant={self.variant!r} is not one of {VARIANTS}")
    if self.init not in INITS:
      raise ValueError(f"init={self.init!r} is not one of {INITS}")
    try:
      re.compile(self.targets)
    except re.error as e:
      raise ValueError(f"targets={self.targets!r} is not a regular expression: {e}") from None

  @property
  def scale(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.variant == "rslora" else self.rank)


@flax.struct.dataclass
class LoraWeight:
  """A kernel with its adapter: what ``layers.Dense`` finds in place of ``kernel`` under
  ``apply``. ``base`` is the float kernel (its natural shape) or a ``kernels.QuantizedWeight``."""

  base: Any
  a: jax.Array  # [I, r]
  b: jax.Array  # [r, O]
  magnitude: jax.Array | None  # [O], DoRA only
  scale: float = flax.struct.field(pytree_node=False)

  def delta(self) -> jax.Array:
    """``s a b`` as ``[I, O]``."""
    return self.scale * (self.a @ self.b)

  def lora_matmul(
    self, x2, base_matmul: Callable[[jax.Array], jax.Array], kernel_2d: Callable[[], jax.Array]
  ):
    """``x2 [M, I]`` times the adapted weight. ``base_matmul(x2)``: ``x2 W`` with the layer's own
    (possibly quantized) matmul; ``kernel_2d()``: ``W`` as a float ``[I, O]`` (DoRA only)."""
    if self.magnitude is None:
      low_rank = (x2 @ self.a.astype(x2.dtype)) @ self.b.astype(x2.dtype)
      return base_matmul(x2) + (self.scale * low_rank).astype(x2.dtype)
    v = kernel_2d() + self.delta()
    norm = jnp.linalg.norm(v, axis=0)
    return (x2 @ v.astype(x2.dtype)) * (self.magnitude / norm).astype(x2.dtype)[None]


# ----------------------------------------------------------------------------------------------
# Paths


def _targets(params, cfg: LoraConfig, num_in, stacked) -> dict[str, tuple[int, int]]:
  """path -> (stacked axes, input axes) of every targeted kernel."""
  pattern = re.compile(cfg.targets)
  found = {}
  for key_path, _ in jax.tree_util.tree_leaves_with_path(
    nn.unbox(params), is_leaf=lambda x: isinstance(x, kernels.QuantizedWeight)
  ):
    path = params_lib.path_string(key_path)
    if pattern.fullmatch(path):
      found[path] = (stacked(path), num_in(path))
  if not found:
    raise ValueError(
      f"targets={cfg.targets!r} matches no parameter; the paths are:\n  "
      + "\n  ".join(params_lib.param_paths(params))
    )
  return found


def _matrix(leaf, s: int, n: int) -> jax.Array:
  """A kernel (float or quantized) as float ``[*stack, I, O]``."""
  if isinstance(leaf, kernels.QuantizedWeight):
    return kernels.dequantize_weight(leaf)
  lead, inner = leaf.shape[:s], leaf.shape[s:]
  return leaf.reshape(lead + (math.prod(inner[:n]), math.prod(inner[n:])))


# ----------------------------------------------------------------------------------------------
# The transform


def init(
  rng, params, cfg: LoraConfig, *, num_in=params_lib.zoo_num_in, stacked=params_lib.zoo_stacked
):
  """Adapters for every kernel of ``params`` whose path matches ``cfg.targets``: a nested dict
  with the params' structure holding ``{"a", "b"}`` (and ``"magnitude"`` for DoRA) at each
  targeted path. Boxed params (``nn.LogicallyPartitioned``, as ``model.init`` returns them) give
  boxed adapters whose input/output axes carry the kernel's leading input and output axis names,
  so they shard like the base weight; the rank axis is never sharded."""
  targets = _targets(params, cfg, num_in, stacked)
  adapters = {}
  for i, (path, (s, n)) in enumerate(sorted(targets.items())):
    boxed = params_lib.get(params, path)
    leaf = nn.unbox(boxed)
    w = _matrix(leaf, s, n)
    lead, (in_dim, out_dim) = w.shape[:-2], w.shape[-2:]
    if cfg.rank > min(in_dim, out_dim):
      raise ValueError(
        f"rank={cfg.rank} exceeds the smaller side of {path} ([{in_dim}, {out_dim}])"
      )
    if cfg.init == "pissa":
      u, sv, vt = jnp.linalg.svd(w.astype(jnp.float32), full_matrices=False)
      root = jnp.sqrt(sv[..., : cfg.rank] / cfg.scale)
      a = u[..., :, : cfg.rank] * root[..., None, :]
      b = root[..., :, None] * vt[..., : cfg.rank, :]
    else:
      # he-uniform over the input dimension; b = 0 so the adapter starts as the identity.
      bound = math.sqrt(6.0 / in_dim)
      a = jax.random.uniform(
        jax.random.fold_in(rng, i), lead + (in_dim, cfg.rank), jnp.float32, -bound, bound
      )
      b = jnp.zeros(lead + (cfg.rank, out_dim), jnp.float32)
    entry = {"a": a, "b": b}
    if cfg.variant == "dora":
      entry["magnitude"] = jnp.linalg.norm(w, axis=-2)
    if isinstance(boxed, nn.LogicallyPartitioned):
      names = tuple(boxed.names)
      stack, inner = names[:s], names[s:]
      in_name, out_name = inner[0], inner[n] if n < len(inner) else None
      axes = {
        "a": stack + (in_name, None),
        "b": stack + (None, out_name),
        "magnitude": stack + (out_name,),
      }
      entry = {
        k: nn.LogicallyPartitioned(v, axes[k], mesh=boxed.mesh, rules=boxed.rules)
        for k, v in entry.items()
      }
    adapters = params_lib.update(adapters, path, lambda _, e=entry: e)
  return adapters


def entries(adapters) -> dict[str, dict]:
  """path -> {"a", "b"[, "magnitude"]} of an adapter tree (the targeted kernels' paths)."""
  out = {}

  def walk(tree, prefix):
    if "a" in tree and "b" in tree and not isinstance(tree["a"], dict):
      out[prefix] = tree
      return
    for k, v in tree.items():
      walk(v, f"{prefix}/{k}" if prefix else k)

  walk(nn.unbox(adapters), "")
  return out


def inject(params, adapters, cfg: LoraConfig):
  """``params`` with each adapted kernel replaced by its ``LoraWeight`` (what ``apply`` runs)."""
  params = nn.unbox(params)
  for path, entry in entries(adapters).items():
    params = params_lib.update(
      params,
      path,
      lambda base, e=entry: LoraWeight(
        base=base, a=e["a"], b=e["b"], magnitude=e.get("magnitude"), scale=cfg.scale
      ),
    )
  return params


def apply(model: nn.Module, params, adapters, cfg: LoraConfig, *args, **kwargs):
  """``model.apply`` with the adapters in: ``lora.apply(model, params, adapters, cfg, tokens)``.
  Differentiate w.r.t. ``adapters`` (``params`` may be quantized; nothing flows into it)."""
  return model.apply({"params": inject(params, adapters, cfg)}, *args, **kwargs)


def merge(
  params, adapters, cfg: LoraConfig, *, num_in=params_lib.zoo_num_in, stacked=params_lib.zoo_stacked
):
  """A plain param tree with the adapters folded in (a quantized base comes back as float)."""

  def fold(path, entry, leaf):
    s, n = stacked(path), num_in(path)
    w = _matrix(leaf, s, n)
    v = w + cfg.scale * (entry["a"] @ entry["b"])
    if "magnitude" in entry:
      v = v * (entry["magnitude"] / jnp.linalg.norm(v, axis=-2))[..., None, :]
    return v.reshape(_natural_shape(leaf, path, s, n))

  return _map_targets(params, adapters, fold)


def unmerge(
  merged, adapters, cfg: LoraConfig, *, num_in=params_lib.zoo_num_in, stacked=params_lib.zoo_stacked
):
  """``merged`` without the adapters' low-rank part: the base again after ``merge`` (lora,
  rslora), or, applied to the original weights with fresh PiSSA adapters, PiSSA's residual.
  DoRA rescales each column by a norm of the merged weight, so it has no unmerge."""
  if cfg.variant == "dora":
    raise ValueError(
      "variant='dora' cannot be unmerged: its merge rescales columns by the norm "
      "of the adapted weight; keep the base parameters instead"
    )

  def subtract(path, entry, leaf):
    s, n = stacked(path), num_in(path)
    w = _matrix(leaf, s, n) - cfg.scale * (entry["a"] @ entry["b"])
    return w.reshape(_natural_shape(leaf, path, s, n))

  return _map_targets(merged, adapters, subtract)


def _natural_shape(leaf, path, s, n):
  if isinstance(leaf, kernels.QuantizedWeight):
    raise ValueError(
      f"{path} is quantized: a merged weight is float and has no natural "
      "[in..., out...] shape to return to; merge onto float parameters"
    )
  return leaf.shape


def _map_targets(params, adapters, fn):
  params = nn.unbox(params)
  for path, entry in entries(adapters).items():
    params = params_lib.update(params, path, lambda leaf, p=path, e=entry: fn(p, e, leaf))
  return params


def num_params(adapters) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nn.unbox(adapters))))
