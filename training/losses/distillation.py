"""Knowledge-distillation losses on teacher and student logits (``research-menu.md`` section 3).

``loss = alpha * T² * D(teacher / T, student / T) + (1 - alpha) * CE(student, targets)`` per
token (Hinton et al. 2015's ``T²`` keeps the soft targets' gradients on the scale of the hard
ones), with ``D`` one of:

- ``forward_kl``: ``KL(p_T ‖ p_S)`` (mean-seeking; tunix' and MaxText's logit distillation);
- ``reverse_kl``: ``KL(p_S ‖ p_T)`` (mode-seeking; MiniLLM);
- ``jsd``: the generalized Jensen-Shannon divergence of GKD (TRL), ``β·KL(p_T ‖ m) +
  (1-β)·KL(p_S ‖ m)`` with ``m = β·p_T + (1-β)·p_S``, ``0 < β < 1`` (its limits β → 0 and 1 are
  the two KLs, up to a factor: use those names for them).

``top_k > 0`` restricts both distributions to the teacher's ``k`` most likely tokens, each
renormalized over them (tunix' ``distill_top_k``; what an offline store of top-k teacher logits
holds). The teacher goes through ``stop_gradient``.
"""

import math

import jax
import jax.numpy as jnp

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def _kl(logp, logq):
  """``Σ p (log p - log q)`` over the last axis (``p`` given by its logs; 0·log 0 = 0)."""
  p = jnp.exp(logp)
  return jnp.sum(jnp.where(p > 0, p * (logp - logq), 0.0), axis=-1)


def check(divergence: str, *, temperature: float, alpha: float, beta: float, top_k: int, vocab):
  """A ``ValueError`` naming the argument for a value the loss cannot honour."""
  if divergence not in DIVERGENCES:
    raise ValueError(f"divergence={divergence!r} is not one of {DIVERGENCES}")
  if not (math.isfinite(temperature) and temperature > 0):
    raise ValueError(f"temperature must be positive and finite, got {temperature}")
  if not 0 <= alpha <= 1:
    raise ValueError(f"alpha must be in [0, 1], got {alpha}")
  if divergence == "jsd" and not 0 < beta < 1:
    raise ValueError(f"beta must be in (0, 1) for divergence='jsd', got {beta}")
  if not (isinstance(top_k, int) and 0 <= top_k <= vocab):
    raise ValueError(
      f"top_k must be an integer in [0, {vocab}] (0: the full vocabulary), got {top_k}"
    )


def divergence(
  teacher_logits,
  student_logits,
  kind: str = "forward_kl",
  *,
  beta: float = 0.5,
  temperature: float = 1.0,
  top_k: int = 0,
):
  """Per-position divergence ``[...]`` between the tempered teacher and student distributions
  (logits ``[..., V]``, same vocabulary)."""
  if teacher_logits.shape != student_logits.shape:
    raise ValueError(
      f"teacher logits {teacher_logits.shape} and student logits {student_logits.shape} differ: "
      "teacher and student must share the tokenizer (vocab_size)"
    )
  check(
    kind, temperature=temperature, alpha=0.0, beta=beta, top_k=top_k, vocab=teacher_logits.shape[-1]
  )
  t = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature
  s = student_logits.astype(jnp.float32) / temperature
  if top_k:
    idx = jax.lax.top_k(t, top_k)[1]
    t = jnp.take_along_axis(t, idx, axis=-1)
    s = jnp.take_along_axis(s, idx, axis=-1)
  logp_t, logp_s = jax.nn.log_softmax(t, axis=-1), jax.nn.log_softmax(s, axis=-1)
  if kind == "forward_kl":
    return _kl(logp_t, logp_s)
  if kind == "reverse_kl":
    return _kl(logp_s, logp_t)
  log_m = jnp.logaddexp(logp_t + math.log(beta), logp_s + math.log1p(-beta))
  return beta * _kl(logp_t, log_m) + (1 - beta) * _kl(logp_s, log_m)


def loss(
  teacher_logits,
  student_logits,
  targets,
  *,
  alpha: float = 0.5,
  kind: str = "forward_kl",
  beta: float = 0.5,
  temperature: float = 1.0,
  top_k: int = 0,
):
  """``(loss, soft, hard)`` per position: ``alpha·T²·soft + (1-alpha)·hard`` with ``soft`` the
  divergence and ``hard`` the student's cross-entropy on ``targets``."""
  check(
    kind,
    temperature=temperature,
    alpha=alpha,
    beta=beta,
    top_k=top_k,
    vocab=student_logits.shape[-1],
  )
  soft = divergence(
    teacher_logits, student_logits, kind, beta=beta, temperature=temperature, top_k=top_k
  )
  logp = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
  hard = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return alpha * temperature**2 * soft + (1 - alpha) * hard, soft, hard
