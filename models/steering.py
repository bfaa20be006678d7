"""Representation reading and steering: a concept as a direction in a site's activations.

Read a direction from contrast pairs (activations of texts with and without an attribute), then
steer generation by changing the activation at that site along it (``models.generate``'s
``interventions``):

    acts = steering.activations(model, params, texts_BL, ["layers_2/resid_post"])  # last token
    d = steering.read(acts_pos["layers_2/resid_post"], acts_neg[...], "mean_diff",
                      site="layers_2/resid_post")
    out = models.generate(model, params, prompts, max_new_tokens=64,
                          interventions=[steering.steer(d, 4.0)])

**Readers** (``read``), each sign-fixed so that positives project higher:

- ``mean_diff``: ``mean(pos) - mean(neg)``, CAA's vector (ActAdd / steering-vectors' default),
  unnormalized: its norm is the attribute's typical displacement, so a coefficient of 1 moves a
  negative example to a positive one on average.
- ``pca``: the top principal direction of the paired differences ``pos_i - neg_i`` taken with
  both signs (uncentered PCA of ``+-d_i``: steering-vectors' PCA, and RepE's recentred PCA of
  randomly signed differences), unit norm.
- ``logistic``: the weight vector of an L2-regularized logistic regression of the label on the
  activations (trained with optax), unit norm.

**Operators** (``steer``), applied at every position of the prompt and of each decode step:

- ``add``: ``h + c v``;
- ``piecewise``: ``h + c sign(<h, v>) v`` (RepE's piecewise_linear);
- ``project``: ``h - c <h, v^> v^`` (``c = 1`` removes the component along ``v``: ablation);
- ``normalize=True`` rescales each result to the norm of ``h`` (repeng's option).

The coefficient and the vector travel to the compiled loop as data: a sweep over coefficients
compiles once. ``save``/``load`` keep a direction in a small safetensors file with its site,
reader and the model's width.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flaxseed.models import sites as sites_lib

READERS = ("mean_diff", "pca", "logistic")
OPERATORS = ("add", "piecewise", "project")


@dataclasses.dataclass(frozen=True)
class Direction:
  """A direction ``vector [D]`` at ``site``, read by ``reader``."""

  vector: np.ndarray
  site: str
  reader: str

  def project(self, acts_ND) -> np.ndarray:
    """Each activation's projection on the unit direction."""
    unit = self.vector / np.linalg.norm(self.vector)
    return np.asarray(acts_ND, np.float32) @ unit


def activations(model, params, tokens_BL, sites, *, index: int | None = -1, **kwargs) -> dict:
  """``{site: [B, D]}``: each site's activation at token ``index`` (the last by default, RepE's
  ``rep_token``; ``None``: the mean over all positions, for texts without an answer token),
  from one forward of ``tokens_BL``."""
  sites_lib.check_unscanned(model, f"sites {list(sites)}")
  with sites_lib.Interventions({s: lambda x: x for s in sites}) as record:
    model.apply({"params": params}, jnp.asarray(tokens_BL), **kwargs)
  record.check()
  pick = (lambda a: a.mean(1)) if index is None else (lambda a: a[:, index])
  return {s: np.asarray(pick(record.hits[s][0].astype(jnp.float32))) for s in sites}


def read(pos_ND, neg_ND, reader: str = "mean_diff", *, site: str, l2: float = 1e-3) -> Direction:
  """The direction that separates ``pos`` from ``neg`` activations (``[N, D]`` each; ``pca``
  pairs them row by row), sign-fixed so that positives project higher (module docstring)."""
  pos, neg = np.asarray(pos_ND, np.float32), np.asarray(neg_ND, np.float32)
  if pos.ndim != 2 or neg.ndim != 2 or pos.shape[1] != neg.shape[1]:
    raise ValueError(f"pos and neg must be [N, D] with one D, got {pos.shape} and {neg.shape}")
  if reader == "mean_diff":
    v = pos.mean(0) - neg.mean(0)
  elif reader == "pca":
    if pos.shape != neg.shape:
      raise ValueError(f"reader 'pca' pairs pos and neg row by row: {pos.shape} != {neg.shape}")
    d = pos - neg
    # Uncentered PCA of +-d: the top eigenvector of sum_i d_i d_i^T (the sign is fixed below).
    _, _, vt = np.linalg.svd(d, full_matrices=False)
    v = vt[0]
  elif reader == "logistic":
    v = _logistic(np.concatenate([pos, neg]), np.r_[np.ones(len(pos)), np.zeros(len(neg))], l2)
    v = v / np.linalg.norm(v)
  else:
    raise ValueError(f"reader={reader!r} is not one of {READERS}")
  if (pos @ v).mean() < (neg @ v).mean():
    v = -v
  return Direction(np.asarray(v, np.float32), site, reader)


def _logistic(x, y, l2: float, steps: int = 500) -> np.ndarray:
  """The weights of an L2-regularized logistic regression (standardized inputs, Adam)."""
  mean, scale = x.mean(0), x.std(0) + 1e-6
  z = jnp.asarray((x - mean) / scale)
  y = jnp.asarray(y, jnp.float32)

  def loss(p):
    logits = z @ p["w"] + p["b"]
    return optax.sigmoid_binary_cross_entropy(logits, y).mean() + l2 * jnp.sum(p["w"] ** 2)

  opt = optax.adam(0.05)
  params = {"w": jnp.zeros(x.shape[1]), "b": jnp.zeros(())}

  @jax.jit
  def run(params):
    def step(carry, _):
      p, s = carry
      g = jax.grad(loss)(p)
      u, s = opt.update(g, s, p)
      return (optax.apply_updates(p, u), s), None

    (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
    return params

  return np.asarray(run(params)["w"]) / scale  # back to the raw activations' axes


def accuracy(direction: Direction, pos_ND, neg_ND) -> float:
  """Reading accuracy: positives above, negatives below the midpoint of the two classes' mean
  projections."""
  p, n = direction.project(pos_ND), direction.project(neg_ND)
  threshold = (p.mean() + n.mean()) / 2
  return float(((p > threshold).sum() + (n <= threshold).sum()) / (len(p) + len(n)))


@dataclasses.dataclass(frozen=True)
class Operator:
  """An intervention function ``(h, {"v", "c"}) -> h'`` (module docstring); frozen, so equal
  operators reuse one compiled generation loop."""

  kind: str = "add"
  normalize: bool = False

  def __post_init__(self):
    if self.kind not in OPERATORS:
      raise ValueError(f"operator {self.kind!r} is not one of {OPERATORS}")

  def __call__(self, h, args):
    v, c = args["v"], args["c"]
    if v.shape[-1] != h.shape[-1]:
      raise ValueError(
        f"the direction has width {v.shape[-1]} but the activation at the site has {h.shape[-1]}"
      )
    v = v.astype(jnp.float32)[None, None, :]
    x = h.astype(jnp.float32)
    if self.kind == "add":
      out = x + c * v
    elif self.kind == "piecewise":
      out = x + c * jnp.sign(jnp.sum(x * v, -1, keepdims=True)) * v
    else:  # project
      unit = v / jnp.linalg.norm(v)
      out = x - c * jnp.sum(x * unit, -1, keepdims=True) * unit
    if self.normalize:
      norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
      out = out * norm / jnp.maximum(jnp.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
    return out.astype(h.dtype)


def steer(direction: Direction, coeff: float, operator: str = "add", *, normalize: bool = False):
  """The ``(site, fn, args)`` intervention for ``models.generate`` (or ``sites.splice`` with
  ``lambda h: fn(h, args)``)."""
  fn = Operator(operator, normalize)
  args = {"v": jnp.asarray(direction.vector), "c": jnp.float32(coeff)}
  return direction.site, fn, args


def save(path: str, direction: Direction) -> None:
  """A safetensors file: the vector and, as metadata, its site, reader and width."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  meta = {"site": direction.site, "reader": direction.reader, "width": str(direction.vector.size)}
  save_file({"direction": np.asarray(direction.vector, np.float32)}, path, metadata=meta)


def load(path: str, *, width: int | None = None) -> Direction:
  """The direction ``save`` wrote; ``width``: the model's, checked (a ``ValueError`` naming the
  file otherwise)."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top

  with safe_open(path, framework="numpy") as f:
    meta = f.metadata() or {}
    if "direction" not in f.keys() or "site" not in meta:
      raise ValueError(f"{path}: not a steering direction (no 'direction' tensor or site)")
    vector = f.get_tensor("direction")
  if width is not None and vector.size != width:
    raise ValueError(f"{path}: the direction has width {vector.size}, the model {width}")
  return Direction(vector, meta["site"], meta.get("reader", ""))
