"""Sparse autoencoders (SAEs) on model activations: ReLU-L1, TopK, BatchTopK, JumpReLU and Gated.

An SAE rewrites an activation ``x [N, d_in]`` as a sparse code ``f [N, num_latents]`` and reads it
back with a dictionary of unit-norm directions:

    pre  = (x - b_dec) W_enc + b_enc            (b_dec subtracted when apply_b_dec_to_input)
    f    = sparsify(pre)                        (per architecture, below)
    x_hat = f W_dec + b_dec

    from flaxseed.models import sae
    cfg = sae.SAEConfig(d_in=512, num_latents=4096, arch="topk", k=32)
    m = sae.SAE(cfg)
    params = m.init(rng, acts)                   # acts: [N, d_in]
    feats = m.apply(params, acts, method=m.encode)
    recon = m.apply(params, feats, method=m.decode)
    loss, metrics = sae.loss(m, params, acts)    # the architecture's training loss

Architectures (``arch``) and their sparsity, following SAELens and Gao et al. 2024:

* ``relu_l1``: ``f = ReLU(pre)``; loss ``MSE + l1_coefficient * sum_i f_i ||W_dec,i||`` (the
  decoder-norm-weighted L1 of Anthropic and SAELens).
* ``topk``: keep the ``k`` largest pre-activations of each row (ReLU'd). Loss
  ``MSE + aux_coefficient * AuxK``: the ``aux_k`` largest pre-activations among *dead* latents (a
  mask the caller tracks, e.g. no activation over the last window of tokens) reconstruct the
  residual ``x - x_hat`` (gradient stopped through ``x_hat``), scaled by
  ``min(num_dead / aux_k, 1)``.
* ``batch_topk``: keep the ``k * N`` largest pre-activations of the whole batch (ReLU'd), so rows
  may use more or fewer than ``k``. For inference the batch dependence is replaced by a threshold
  (``encode(..., inference=True)``): the ``threshold`` variable, which ``batch_topk_threshold``
  moves toward the smallest activation kept in each training batch (collection ``batch_stats``,
  outside ``params`` so no optimizer touches it).
* ``jumprelu``: ``f = pre * H(pre - theta)`` with a learned per-latent ``theta = exp(log_theta)``;
  the step's gradient w.r.t. ``theta`` uses a rectangle kernel of width ``jumprelu_bandwidth``
  (straight-through), and the loss is ``MSE + l0_coefficient * L0``.
* ``gated``: a gate ``pi = pre`` decides which latents are on (``H(pi)``), a magnitude path with
  the same directions rescaled, ``(x - b_dec) W_enc exp(r_mag) + b_mag``, sets their values; loss
  ``MSE + l1_coefficient * sum ReLU(pi) ||W_dec,i|| + ||x - decode_frozen(ReLU(pi))||^2`` (the
  auxiliary term reconstructs from the gate with a frozen decoder).

``MSE`` is the squared error summed over ``d_in`` and averaged over rows. Training helpers (used
by the SAE task): ``unit_norm_decoder`` projects the decoder rows back to unit norm after each
step, ``remove_parallel_grads`` removes the gradient component parallel to them before it, and
``geometric_median`` initializes ``b_dec``. ``reconstruction_metrics`` gives L0, FVU, explained
variance and cosine similarity; ``evaluate`` adds the dead fraction, CE loss recovered and KL with
the reconstruction spliced into a model (``models/sites.py``).
"""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from flaxseed.models import sharding as sh
from flaxseed.models import sites

ARCHS = ("relu_l1", "topk", "batch_topk", "jumprelu", "gated")
NORMALIZATIONS = ("none", "constant_norm_rescale")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SAEConfig:
  """Shape, architecture and loss coefficients of ``SAE`` (defaults follow SAELens/openai)."""

  d_in: int
  num_latents: int
  arch: str = "topk"  # see ARCHS
  k: int = 32  # topk, batch_topk: active latents per row (on average for batch_topk)
  aux_k: int | None = None  # topk, batch_topk: dead latents in AuxK; None: d_in // 2
  aux_coefficient: float = 1 / 32
  l1_coefficient: float = 1.0  # relu_l1, gated
  l0_coefficient: float = 1.0  # jumprelu
  jumprelu_bandwidth: float = 0.05
  jumprelu_init_threshold: float = 0.01
  threshold_lr: float = 0.01  # batch_topk: the inference threshold's moving-average rate
  apply_b_dec_to_input: bool = True
  # "constant_norm_rescale": inputs scaled so that their mean squared norm is d_in (SAELens); the
  # scale is estimated from data by the caller (``norm_scale``) and passed to the loss/encode.
  normalize_activations: str = "none"
  decoder_init_norm: float = 1.0  # the decoder rows' norm at init (SAELens uses 0.1 for L1)

  def __post_init__(self):
    for name in ("d_in", "num_latents", "k"):
      if getattr(self, name) <= 0:
        raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
    if self.arch not in ARCHS:
      raise ValueError(f"arch={self.arch!r} is not one of {ARCHS}")
    if self.arch in ("topk", "batch_topk") and self.k > self.num_latents:
      raise ValueError(f"k={self.k} must be <= num_latents={self.num_latents}")
    if self.aux_k is not None and not 0 < self.aux_k <= self.num_latents:
      raise ValueError(f"aux_k={self.aux_k} must be in [1, num_latents={self.num_latents}]")
    if self.normalize_activations not in NORMALIZATIONS:
      raise ValueError(
        f"normalize_activations={self.normalize_activations!r} is not one of {NORMALIZATIONS}"
      )
    # Written so that NaN fails them: every comparison with NaN is False.
    for name in ("aux_coefficient", "l1_coefficient", "l0_coefficient"):
      value = getattr(self, name)
      if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be >= 0 and finite, got {value}")
    for name in ("jumprelu_bandwidth", "jumprelu_init_threshold", "decoder_init_norm"):
      value = getattr(self, name)
      if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be positive and finite, got {value}")

  @property
  def num_aux(self) -> int:
    return min(self.d_in // 2 if self.aux_k is None else self.aux_k, self.num_latents)

  @classmethod
  def tiny(cls, **kw):
    """An 8x SAE on the 128-wide residual stream of ``transformer-tiny``."""
    return cls(**{**dict(d_in=128, num_latents=1024, arch="topk", k=32), **kw})


PRESETS = {
  f"sae-{arch.replace('_', '-')}-tiny": functools.partial(SAEConfig.tiny, arch=arch)
  for arch in ARCHS
}


def _unit_rows_init(norm: float):
  def init(key, shape, dtype=jnp.float32):
    w = jax.random.normal(key, shape, dtype)
    return norm * w / jnp.linalg.norm(w, axis=-1, keepdims=True)

  return init


class SAE(nn.Module):
  """``__call__(x) -> (x_hat, f)``; ``encode`` and ``decode`` as in the module docstring."""

  config: SAEConfig

  def setup(self):
    cfg = self.config
    d, n = cfg.d_in, cfg.num_latents
    part = nn.with_logical_partitioning
    # The encoder starts as the decoder's transpose (SAELens, Gao et al.).
    self.w_dec = self.param(
      "w_dec", part(_unit_rows_init(cfg.decoder_init_norm), (sh.MLP, sh.EMBED)), (n, d)
    )
    self.w_enc = self.param(
      "w_enc", part(lambda key, shape: self.w_dec.T, (sh.EMBED, sh.MLP)), (d, n)
    )
    self.b_enc = self.param("b_enc", part(nn.initializers.zeros, (sh.MLP,)), (n,))
    self.b_dec = self.param("b_dec", part(nn.initializers.zeros, (sh.EMBED,)), (d,))
    if cfg.arch == "jumprelu":
      init = nn.initializers.constant(jnp.log(cfg.jumprelu_init_threshold))
      self.log_threshold = self.param("log_threshold", part(init, (sh.MLP,)), (n,))
    if cfg.arch == "gated":
      self.r_mag = self.param("r_mag", part(nn.initializers.zeros, (sh.MLP,)), (n,))
      self.b_mag = self.param("b_mag", part(nn.initializers.zeros, (sh.MLP,)), (n,))
    if cfg.arch == "batch_topk":
      # Not a parameter: a statistic that batch_topk_threshold moves (like BatchNorm's).
      self.threshold = self.variable("batch_stats", "threshold", jnp.zeros, ())

  def _check_width(self, name, x, field, width):
    """A ``ValueError`` (at trace time, before anything compiles) unless ``x``'s last axis is
    ``width``, the config's ``field``."""
    if x.ndim < 1 or x.shape[-1] != width:
      raise ValueError(
        f"SAE {name} must be [..., {field}={width}] (SAEConfig.{field}), got shape {x.shape}"
      )

  def pre_activations(self, x_ND):
    """``(x - b_dec) W_enc + b_enc`` (the gate pre-activations for ``gated``)."""
    self._check_width("input", x_ND, "d_in", self.config.d_in)
    if self.config.apply_b_dec_to_input:
      x_ND = x_ND - self.b_dec[None]
    return x_ND @ self.w_enc + self.b_enc[None]

  def encode(self, x_ND, inference: bool = False):
    """The sparse code ``f [N, num_latents]``. ``inference`` (batch_topk only) uses the learned
    threshold instead of the batch's top ``k * N``."""
    cfg = self.config
    pre = self.pre_activations(x_ND)
    if cfg.arch == "relu_l1":
      return jax.nn.relu(pre)
    if cfg.arch == "topk":
      return topk_activation(pre, cfg.k)
    if cfg.arch == "batch_topk":
      if inference:
        return jnp.where(pre > self.threshold.value, pre, 0.0)
      return batch_topk_activation(pre, cfg.k)
    if cfg.arch == "jumprelu":
      return jumprelu(pre, jnp.exp(self.log_threshold), cfg.jumprelu_bandwidth)
    # gated
    magnitude = self.magnitude(x_ND)
    return jnp.where(pre > 0, jax.nn.relu(magnitude), 0.0)

  def magnitude(self, x_ND):
    """The gated SAE's magnitude path: shared directions rescaled by ``exp(r_mag)``."""
    self._check_width("input", x_ND, "d_in", self.config.d_in)
    if self.config.apply_b_dec_to_input:
      x_ND = x_ND - self.b_dec[None]
    return (x_ND @ self.w_enc) * jnp.exp(self.r_mag)[None] + self.b_mag[None]

  def decode(self, f_NF):
    self._check_width("code", f_NF, "num_latents", self.config.num_latents)
    return f_NF @ self.w_dec + self.b_dec[None]

  def __call__(self, x_ND, inference: bool = False):
    f = self.encode(x_ND, inference)
    return self.decode(f), f


# ----------------------------------------------------------------------------------------------
# Activation functions


def topk_activation(pre_NF, k: int):
  """ReLU of the ``k`` largest entries of each row; the rest 0 (L0 <= k, exactly k when the
  k-th largest is positive)."""
  values, idx = jax.lax.top_k(pre_NF, k)
  rows = jnp.arange(pre_NF.shape[0])[:, None]
  return jnp.zeros_like(pre_NF).at[rows, idx].set(jax.nn.relu(values))


def batch_topk_activation(pre_NF, k: int):
  """ReLU of the ``k * N`` largest entries of the whole batch; the rest 0."""
  flat = pre_NF.reshape(-1)
  values, idx = jax.lax.top_k(flat, k * pre_NF.shape[0])
  return jnp.zeros_like(flat).at[idx].set(jax.nn.relu(values)).reshape(pre_NF.shape)


def _rectangle(z):
  return ((z > -0.5) & (z < 0.5)).astype(z.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _step(z_NF, threshold_1F, bandwidth):
  return (z_NF > threshold_1F).astype(z_NF.dtype)


def _step_fwd(z_NF, threshold_1F, bandwidth):
  return _step(z_NF, threshold_1F, bandwidth), (z_NF, threshold_1F)


def _step_bwd(bandwidth, res, g):
  z, threshold = res
  # d/dtheta H(z - theta) ~ -K((z - theta) / eps) / eps, K the rectangle kernel; 0 for z.
  kernel = _rectangle((z - threshold) / bandwidth) / bandwidth
  return jnp.zeros_like(z), -(g * kernel).sum(0, keepdims=True)


_step.defvjp(_step_fwd, _step_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _jump(z_NF, threshold_1F, bandwidth):
  return z_NF * (z_NF > threshold_1F).astype(z_NF.dtype)


def _jump_fwd(z_NF, threshold_1F, bandwidth):
  return _jump(z_NF, threshold_1F, bandwidth), (z_NF, threshold_1F)


def _jump_bwd(bandwidth, res, g):
  z, threshold = res
  # d/dz = H(z - theta); d/dtheta ~ -theta K((z - theta) / eps) / eps (Rajamanoharan et al.).
  kernel = _rectangle((z - threshold) / bandwidth) / bandwidth
  return g * (z > threshold).astype(z.dtype), -(g * threshold * kernel).sum(0, keepdims=True)


_jump.defvjp(_jump_fwd, _jump_bwd)


def jumprelu(pre_NF, threshold_F, bandwidth: float):
  """``pre * H(pre - theta)``; straight-through gradient for ``theta`` (rectangle kernel)."""
  return _jump(pre_NF, threshold_F[None].astype(pre_NF.dtype), bandwidth)


def jumprelu_l0(pre_NF, threshold_F, bandwidth: float):
  """Mean over rows of the number of active latents, differentiable in ``theta`` (STE)."""
  return _step(pre_NF, threshold_F[None].astype(pre_NF.dtype), bandwidth).sum(-1).mean()


# ----------------------------------------------------------------------------------------------
# Losses and training helpers


def loss(model: SAE, variables, x_ND, *, dead_F=None):
  """``(loss, metrics)`` of the architecture (module docstring) for ``variables`` as ``init``
  returns them (differentiate w.r.t. ``variables["params"]``). ``dead_F``: bool mask of dead
  latents for AuxK (topk, batch_topk); ``None``: no auxiliary term."""
  return loss_and_code(model, variables, x_ND, dead_F=dead_F)[:2]


def loss_and_code(model: SAE, variables, x_ND, *, dead_F=None):
  """``(loss, metrics, f)``: ``loss`` and the training-mode code ``f [N, num_latents]`` it used."""
  cfg = model.config
  bound = model.bind(variables)
  pre = bound.pre_activations(x_ND)
  f = bound.encode(x_ND)
  x_hat = bound.decode(f)
  mse = jnp.square(x_hat - x_ND).sum(-1).mean()
  decoder_norms = jnp.linalg.norm(bound.w_dec, axis=-1)
  metrics = {"mse": mse, "l0": (f != 0).sum(-1).mean()}
  total = mse
  if cfg.arch == "relu_l1":
    sparsity = (f * decoder_norms[None]).sum(-1).mean()
    total = total + cfg.l1_coefficient * sparsity
    metrics["l1"] = sparsity
  elif cfg.arch in ("topk", "batch_topk"):
    if dead_F is not None:
      aux = auxk_loss(pre, dead_F, x_ND - jax.lax.stop_gradient(x_hat), bound.w_dec, cfg.num_aux)
      total = total + cfg.aux_coefficient * aux
      metrics["auxk"] = aux
  elif cfg.arch == "jumprelu":
    l0 = jumprelu_l0(pre, jnp.exp(bound.log_threshold), cfg.jumprelu_bandwidth)
    total = total + cfg.l0_coefficient * l0
  else:  # gated
    gate = jax.nn.relu(pre)
    sparsity = (gate * decoder_norms[None]).sum(-1).mean()
    frozen_dec = jax.lax.stop_gradient
    aux_recon = gate @ frozen_dec(bound.w_dec) + frozen_dec(bound.b_dec)[None]
    aux = jnp.square(aux_recon - x_ND).sum(-1).mean()
    total = total + cfg.l1_coefficient * sparsity + aux
    metrics.update(l1=sparsity, gate_recon=aux)
  metrics["loss"] = total
  return total, metrics, f


def auxk_loss(pre_NF, dead_F, residual_ND, w_dec_FD, aux_k: int):
  """The ``aux_k`` largest pre-activations among dead latents reconstruct ``residual`` (squared
  error summed over d_in, mean over rows), scaled by ``min(num_dead / aux_k, 1)``."""
  num_dead = dead_F.sum()
  masked = jnp.where(dead_F[None], pre_NF, -jnp.inf)
  values, idx = jax.lax.top_k(masked, aux_k)
  values = jnp.where(jnp.isfinite(values), jax.nn.relu(values), 0.0)
  rows = jnp.arange(pre_NF.shape[0])[:, None]
  f_aux = jnp.zeros_like(pre_NF).at[rows, idx].set(values)
  err = jnp.square(f_aux @ w_dec_FD - residual_ND).sum(-1).mean()
  return jnp.minimum(num_dead / aux_k, 1.0) * err


def batch_topk_threshold(model: SAE, variables, x_ND, *, rate: float | None = None):
  """``variables`` with the inference ``threshold`` moved toward this batch's smallest kept
  activation (a moving average with rate ``config.threshold_lr``)."""
  f = model.apply(variables, x_ND, method=model.encode)
  rate = model.config.threshold_lr if rate is None else rate
  threshold = update_threshold(variables["batch_stats"]["threshold"], f, rate)
  return {**variables, "batch_stats": {"threshold": threshold}}


def update_threshold(threshold, f_NF, rate: float):
  """One moving-average step of the BatchTopK inference threshold toward the smallest positive
  activation of the training code ``f`` (unchanged if nothing fired)."""
  smallest = jnp.min(jnp.where(f_NF > 0, f_NF, jnp.inf))
  smallest = jnp.where(jnp.isfinite(smallest), smallest, threshold)
  return (1 - rate) * threshold + rate * smallest


def unit_norm_decoder(params):
  """Decoder rows (the dictionary directions) projected back to unit norm. ``params`` (and
  ``grads`` below) are plain arrays (``flax.linen.unbox``), as the training loop holds them."""
  w = params["w_dec"]
  return {**params, "w_dec": w / jnp.maximum(jnp.linalg.norm(w, axis=-1, keepdims=True), 1e-12)}


def remove_parallel_grads(params, grads):
  """The gradient of each decoder row minus its component along the row (which a unit-norm
  projection would undo anyway)."""
  w = params["w_dec"] / jnp.linalg.norm(params["w_dec"], axis=-1, keepdims=True)
  g = grads["w_dec"]
  return {**grads, "w_dec": g - (g * w).sum(-1, keepdims=True) * w}


def decoder_constraint(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
  """``optimizer`` with the decoder kept on the unit sphere: the gradient's component parallel to
  each decoder row is removed before the update (``remove_parallel_grads``) and the rows are
  projected back to unit norm after it (``unit_norm_decoder``). The optimizer state is
  ``optimizer``'s own, so its shardings and checkpoints do not change."""

  def update(grads, state, params):
    updates, state = optimizer.update(remove_parallel_grads(params, grads), state, params)
    new_w = unit_norm_decoder(optax.apply_updates(params, updates))["w_dec"]
    return {**updates, "w_dec": new_w - params["w_dec"]}, state

  return optax.GradientTransformation(optimizer.init, update)


def geometric_median(x_ND, *, iters: int = 100, eps: float = 1e-6):
  """The point minimizing the summed Euclidean distance to the rows (Weiszfeld's iteration), the
  ``b_dec`` init of openai and saex."""

  def step(y, _):
    w = 1.0 / jnp.maximum(jnp.linalg.norm(x_ND - y[None], axis=-1), eps)
    return (w[:, None] * x_ND).sum(0) / w.sum(), None

  y, _ = jax.lax.scan(step, x_ND.mean(0), None, length=iters)
  return y


def reconstruction_metrics(x_ND, x_hat_ND, f_NF) -> dict[str, jax.Array]:
  """L0, fraction of variance unexplained (sum ||x - x_hat||^2 / sum ||x - mean||^2), explained
  variance (1 - FVU) and mean cosine similarity of reconstructions."""
  fvu = jnp.square(x_ND - x_hat_ND).sum() / jnp.square(x_ND - x_ND.mean(0)[None]).sum()
  cos = (x_ND * x_hat_ND).sum(-1) / jnp.maximum(
    jnp.linalg.norm(x_ND, axis=-1) * jnp.linalg.norm(x_hat_ND, axis=-1), 1e-12
  )
  return {
    "l0": (f_NF != 0).sum(-1).mean(),
    "fvu": fvu,
    "explained_variance": 1.0 - fvu,
    "cossim": cos.mean(),
  }


# ----------------------------------------------------------------------------------------------
# Evaluation on a model


def eval_sums(
  lm, lm_variables, tokens_BL, site: str, model: "SAE", variables, *, norm_scale=1.0, **lm_kwargs
) -> dict[str, tuple[jax.Array, jax.Array]]:
  """The SAE evals on one batch as ``name -> (sum, count)``, so batches add up (the training
  loop's form; ``evaluate`` divides). ``lm_kwargs`` (``segment_ids``, ``positions``) go to the
  model; a next-token target counts only within its document. ``norm_scale`` multiplies the
  activations before the SAE (``constant_norm_rescale``) and divides its reconstruction.

  ``fvu`` sums squared errors over squared deviations from the batch mean; ``ce_*`` are the
  model's next-token cross-entropies clean, with the SAE's reconstruction spliced in at ``site``
  and with the site zero-ablated; ``ce_loss_recovered`` is ``sum(ce_zero - ce_sae) /
  sum(ce_zero - ce_clean)`` (1: as good as clean); ``kl`` is KL(clean || spliced) per token.
  """

  def reconstruct(x):
    flat = x.reshape(-1, x.shape[-1]).astype(jnp.float32) * norm_scale
    return (model.apply(variables, flat, True)[0] / norm_scale).reshape(x.shape).astype(x.dtype)

  clean, acts = sites.run(lm, lm_variables, tokens_BL, site, **lm_kwargs)
  x = acts.reshape(-1, acts.shape[-1]).astype(jnp.float32) * norm_scale
  x_hat, f = model.apply(variables, x, True)
  num = jnp.asarray(x.shape[0], jnp.float32)
  cos = (x * x_hat).sum(-1) / jnp.maximum(
    jnp.linalg.norm(x, axis=-1) * jnp.linalg.norm(x_hat, axis=-1), 1e-12
  )
  sums = {
    "l0": ((f != 0).sum(), num),
    "fvu": (jnp.square(x - x_hat).sum(), jnp.square(x - x.mean(0)[None]).sum()),
    "cossim": (cos.sum(), num),
  }

  spliced = sites.splice(lm, lm_variables, tokens_BL, site, reconstruct, **lm_kwargs)
  zeroed = sites.splice(lm, lm_variables, tokens_BL, site, jnp.zeros_like, **lm_kwargs)
  targets = tokens_BL[:, 1:]
  segments = lm_kwargs.get("segment_ids")
  weights = (
    jnp.ones(targets.shape, jnp.float32)
    if segments is None
    else ((segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] != 0)).astype(jnp.float32)
  )

  def logp(logits):
    return jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))

  def nll(logp_BLV):
    return -jnp.take_along_axis(logp_BLV, targets[..., None], -1)[..., 0] * weights

  clean_lp, sae_lp, zero_lp = logp(clean), logp(spliced), logp(zeroed)
  count = weights.sum()
  nll_clean, nll_sae, nll_zero = nll(clean_lp), nll(sae_lp), nll(zero_lp)
  kl = ((jnp.exp(clean_lp) * (clean_lp - sae_lp)).sum(-1) * weights).sum()
  sums.update(
    ce_clean=(nll_clean.sum(), count),
    ce_sae=(nll_sae.sum(), count),
    ce_zero=(nll_zero.sum(), count),
    kl=(kl, count),
    ce_loss_recovered=((nll_zero - nll_sae).sum(), (nll_zero - nll_clean).sum()),
  )
  return sums


def evaluate(
  lm, lm_variables, tokens_BL, site: str, model: "SAE", variables, *, norm_scale=1.0, **lm_kwargs
) -> dict[str, jax.Array]:
  """The standard SAE evals on ``tokens`` of an autoregressive zoo model ``lm`` at ``site``:
  ``eval_sums`` divided out (``l0``, ``fvu``, ``cossim``, ``ce_clean``, ``ce_sae``, ``ce_zero``,
  ``ce_loss_recovered``, ``kl``) plus ``explained_variance = 1 - fvu`` and ``dead_frac``, the
  fraction of latents that never fire on these tokens."""
  metrics = {
    k: s / c
    for k, (s, c) in eval_sums(
      lm, lm_variables, tokens_BL, site, model, variables, norm_scale=norm_scale, **lm_kwargs
    ).items()
  }
  metrics["explained_variance"] = 1.0 - metrics["fvu"]
  acts = sites.capture(lm, lm_variables, tokens_BL, site, **lm_kwargs)
  f = model.apply(
    variables, acts.reshape(-1, acts.shape[-1]).astype(jnp.float32) * norm_scale, True
  )[1]
  metrics["dead_frac"] = ((f != 0).sum(0) == 0).mean()
  return metrics
