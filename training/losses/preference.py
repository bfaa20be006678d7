"""Preference-optimization losses on per-sequence log-probabilities: one registry.

Every paired loss takes a ``Pairs`` of per-example ``[B]`` arrays, the summed log-probabilities
of the chosen (``w``) and rejected (``l``) completions under the policy and, where the loss has
one, the frozen reference, with the completions' token counts, and returns ``(loss [B], metrics)``.
Notation (``research-menu.md`` section 4): ``Δ = [log π(y_w) - log π_ref(y_w)] - [log π(y_l) -
log π_ref(y_l)]``; ``ā`` is a length-averaged policy log-probability.

======== ============================================================ ========== ==============
name     loss                                                         reference  defaults
======== ============================================================ ========== ==============
sigmoid  DPO: ``-(1-ε) log σ(βΔ) - ε log σ(-βΔ)`` (ε: label smoothing)  yes        β=0.1, ε=0
hinge    SLiC: ``relu(1 - βΔ)``                                       yes        β=0.1
ipo      IPO: ``(Δ̄ - 1/(2β))²``, Δ̄ from per-token averaged ratios     yes        β=0.1
simpo    SimPO: ``-log σ(β(ā_w - ā_l) - γ)``, ``γ = β·gamma_beta_ratio``  no         β=2, γ/β=0.25
orpo     ORPO: ``-ā_w + λ·(-log σ(log_odds))``, odds from ā            no         λ=0.1
======== ============================================================ ========== ==============

KTO is unpaired (``kto``): each example is a completion labelled desirable or not, compared with
``kl``, a detached estimate of KL(π‖π_ref) the task computes from mismatched pairs.

The reference log-probabilities go through ``stop_gradient``: a gradient reaches only the policy
(or its adapters). Defaults follow TRL, tunix and the SimPO reference code; sources are in
``research-menu.md``. Metrics (TRL's names, what users read the dynamics with): the policy's
``logps/chosen`` and ``logps/rejected``, for reference losses the implicit ``rewards/chosen``,
``rewards/rejected`` (``β·log π/π_ref``), ``rewards/margin`` and ``rewards/accuracy``; for
reference-free losses the same rewards from ``β·ā``.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Pairs:
  """Per-example ``[B]`` arrays; ``ref_*`` may be None for the reference-free losses."""

  chosen: jax.Array  # Σ log π(y_w | x) over the completion's tokens
  rejected: jax.Array
  chosen_len: jax.Array  # completion tokens (> 0)
  rejected_len: jax.Array
  ref_chosen: jax.Array | None = None
  ref_rejected: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class Options:
  beta: float = 0.1
  label_smoothing: float = 0.0  # sigmoid only (robust / conservative DPO)
  gamma_beta_ratio: float = 0.25  # simpo only
  orpo_lambda: float = 0.1  # orpo only

  def __post_init__(self):
    # Written so that NaN fails them.
    if not (math.isfinite(self.beta) and self.beta > 0):
      raise ValueError(f"beta must be positive and finite, got {self.beta}")
    if not 0 <= self.label_smoothing < 0.5:
      raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
    if not (math.isfinite(self.gamma_beta_ratio) and self.gamma_beta_ratio >= 0):
      raise ValueError(f"gamma_beta_ratio must be >= 0 and finite, got {self.gamma_beta_ratio}")
    if not (math.isfinite(self.orpo_lambda) and self.orpo_lambda >= 0):
      raise ValueError(f"orpo_lambda must be >= 0 and finite, got {self.orpo_lambda}")


def sequence_logps(logits_BLV, targets_BL, mask_BL):
  """``(Σ log p(target), token count)`` per row over the positions where ``mask_BL`` is set."""
  logp_BLV = jax.nn.log_softmax(logits_BLV.astype(jnp.float32), axis=-1)
  logp_BL = jnp.take_along_axis(logp_BLV, targets_BL[..., None], axis=-1)[..., 0]
  mask_BL = mask_BL.astype(jnp.float32)
  return (logp_BL * mask_BL).sum(-1), mask_BL.sum(-1)


def _ratios(p: Pairs):
  if p.ref_chosen is None or p.ref_rejected is None:
    raise ValueError("this loss needs the reference log-probabilities (ref_chosen, ref_rejected)")
  ref_w, ref_l = jax.lax.stop_gradient(p.ref_chosen), jax.lax.stop_gradient(p.ref_rejected)
  return p.chosen - ref_w, p.rejected - ref_l


def _metrics(reward_w, reward_l, p: Pairs) -> dict:
  return {
    "logps/chosen": p.chosen,
    "logps/rejected": p.rejected,
    "rewards/chosen": reward_w,
    "rewards/rejected": reward_l,
    "rewards/margin": reward_w - reward_l,
    "rewards/accuracy": (reward_w > reward_l).astype(jnp.float32),
  }


def sigmoid(p: Pairs, o: Options):
  ratio_w, ratio_l = _ratios(p)
  z = o.beta * (ratio_w - ratio_l)
  eps = o.label_smoothing
  loss = -(1 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)
  return loss, _metrics(o.beta * ratio_w, o.beta * ratio_l, p)


def hinge(p: Pairs, o: Options):
  ratio_w, ratio_l = _ratios(p)
  loss = jax.nn.relu(1 - o.beta * (ratio_w - ratio_l))
  return loss, _metrics(o.beta * ratio_w, o.beta * ratio_l, p)


def ipo(p: Pairs, o: Options):
  ratio_w, ratio_l = _ratios(p)
  delta = ratio_w / p.chosen_len - ratio_l / p.rejected_len  # per-token averaged (IPO authors)
  loss = (delta - 1 / (2 * o.beta)) ** 2
  return loss, _metrics(o.beta * ratio_w, o.beta * ratio_l, p)


def simpo(p: Pairs, o: Options):
  avg_w, avg_l = p.chosen / p.chosen_len, p.rejected / p.rejected_len
  loss = -jax.nn.log_sigmoid(o.beta * (avg_w - avg_l - o.gamma_beta_ratio))
  return loss, _metrics(o.beta * avg_w, o.beta * avg_l, p)


def _log1m_exp(a):
  """``log(1 - e^a)`` for ``a < 0``, stable near 0 and far below it."""
  return jnp.log(-jnp.expm1(a))


def orpo(p: Pairs, o: Options):
  avg_w, avg_l = p.chosen / p.chosen_len, p.rejected / p.rejected_len
  log_odds = (avg_w - avg_l) - (_log1m_exp(avg_w) - _log1m_exp(avg_l))
  odds_ratio_loss = -jax.nn.log_sigmoid(log_odds)
  loss = -avg_w + o.orpo_lambda * odds_ratio_loss
  metrics = _metrics(o.beta * avg_w, o.beta * avg_l, p)
  metrics.update({"orpo/log_odds": log_odds, "orpo/nll": -avg_w})
  return loss, metrics


LOSSES = {"sigmoid": sigmoid, "hinge": hinge, "ipo": ipo, "simpo": simpo, "orpo": orpo}
NEEDS_REFERENCE = {"sigmoid": True, "hinge": True, "ipo": True, "simpo": False, "orpo": False}


def paired_loss(name: str, pairs: Pairs, options: Options):
  """``(loss [B], metrics {name: [B]})`` of the registry's loss ``name``."""
  if name not in LOSSES:
    raise ValueError(f"unknown preference loss {name!r}; one of {sorted(LOSSES)} (or 'kto')")
  return LOSSES[name](pairs, options)


def kto(
  policy,
  ref,
  desirable,
  kl,
  *,
  beta: float = 0.1,
  desirable_weight: float = 1.0,
  undesirable_weight: float = 1.0,
):
  """KTO on unpaired completions: ``(loss [B], metrics)``.

  ``policy``, ``ref``: ``[B]`` summed log-probabilities; ``desirable``: ``[B]`` bool; ``kl``: a
  scalar estimate of KL(π‖π_ref) (the mean log-ratio of mismatched prompt/completion pairs),
  detached and clamped at 0 here. Desirable: ``w_d (1 - σ(β(r - kl)))``, undesirable:
  ``w_u (1 - σ(β(kl - r)))`` with ``r = log π - log π_ref``.
  """
  Options(beta=beta)  # the same checks of beta
  ratio = policy - jax.lax.stop_gradient(ref)
  kl = jnp.maximum(jax.lax.stop_gradient(kl), 0.0)
  good = desirable_weight * (1 - jax.nn.sigmoid(beta * (ratio - kl)))
  bad = undesirable_weight * (1 - jax.nn.sigmoid(beta * (kl - ratio)))
  loss = jnp.where(desirable, good, bad)
  return loss, {"rewards/kto": beta * ratio, "kl": kl}
