"""Preference and distillation losses against hand computations (training/losses/)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxseed.training.losses import distillation
from flaxseed.training.losses import preference

# Two pairs of fixed log-probabilities: sums over 4- and 2-token chosen completions, 5- and 3-token
# rejected ones.
PAIRS = preference.Pairs(
  chosen=jnp.array([-3.0, -1.5]),
  rejected=jnp.array([-4.0, -1.0]),
  chosen_len=jnp.array([4.0, 2.0]),
  rejected_len=jnp.array([5.0, 3.0]),
  ref_chosen=jnp.array([-3.5, -1.2]),
  ref_rejected=jnp.array([-3.8, -1.4]),
)


def _log_sigmoid(x):
  return -math.log1p(math.exp(-x))


def _rows():
  p = PAIRS
  return [
    tuple(
      float(a[i])
      for a in (p.chosen, p.rejected, p.chosen_len, p.rejected_len, p.ref_chosen, p.ref_rejected)
    )
    for i in range(2)
  ]


def _hand(name, o):
  out = []
  for w, r, nw, nr, rw, rr in _rows():
    delta = (w - rw) - (r - rr)
    if name == "sigmoid":
      eps = o.label_smoothing
      out.append(-(1 - eps) * _log_sigmoid(o.beta * delta) - eps * _log_sigmoid(-o.beta * delta))
    elif name == "hinge":
      out.append(max(0.0, 1 - o.beta * delta))
    elif name == "ipo":
      out.append(((w - rw) / nw - (r - rr) / nr - 1 / (2 * o.beta)) ** 2)
    elif name == "simpo":
      out.append(-_log_sigmoid(o.beta * (w / nw - r / nr) - o.beta * o.gamma_beta_ratio))
    elif name == "orpo":
      aw, al = w / nw, r / nr
      odds = math.log(math.exp(aw) / (1 - math.exp(aw))) - math.log(
        math.exp(al) / (1 - math.exp(al))
      )
      out.append(-aw + o.orpo_lambda * -_log_sigmoid(odds))
  return out


@pytest.mark.parametrize(
  "name,options",
  [
    ("sigmoid", preference.Options(beta=0.1)),
    ("sigmoid", preference.Options(beta=0.5, label_smoothing=0.1)),
    ("hinge", preference.Options(beta=2.0)),
    ("ipo", preference.Options(beta=0.1)),
    ("simpo", preference.Options(beta=2.0, gamma_beta_ratio=0.25)),
    ("orpo", preference.Options(orpo_lambda=0.1)),
  ],
)
def test_each_paired_loss_equals_its_hand_computation(name, options):
  loss, metrics = preference.paired_loss(name, PAIRS, options)
  np.testing.assert_allclose(loss, _hand(name, options), rtol=1e-5)
  if preference.NEEDS_REFERENCE[name]:
    np.testing.assert_allclose(
      metrics["rewards/chosen"], options.beta * np.array([0.5, -0.3]), rtol=1e-5
    )
    np.testing.assert_allclose(
      metrics["rewards/margin"], options.beta * np.array([0.7, -0.7]), rtol=1e-5
    )
    np.testing.assert_array_equal(metrics["rewards/accuracy"], [1.0, 0.0])


def test_dpo_with_the_policy_equal_to_the_reference_is_log_2_with_zero_margin():
  same = preference.Pairs(
    PAIRS.chosen, PAIRS.rejected, PAIRS.chosen_len, PAIRS.rejected_len, PAIRS.chosen, PAIRS.rejected
  )
  loss, metrics = preference.paired_loss("sigmoid", same, preference.Options(beta=0.1))
  np.testing.assert_allclose(loss, [math.log(2)] * 2, rtol=1e-6)
  np.testing.assert_array_equal(metrics["rewards/margin"], [0.0, 0.0])


@pytest.mark.parametrize("name", sorted(preference.LOSSES))
def test_gradients_reach_only_the_policy(name):
  def total(policy, ref):
    pairs = preference.Pairs(
      policy[0], policy[1], PAIRS.chosen_len, PAIRS.rejected_len, ref[0], ref[1]
    )
    return preference.paired_loss(name, pairs, preference.Options())[0].sum()

  policy = (PAIRS.chosen, PAIRS.rejected)
  ref = (PAIRS.ref_chosen, PAIRS.ref_rejected)
  g_policy, g_ref = jax.grad(total, argnums=(0, 1))(policy, ref)
  assert all(np.abs(g).sum() > 0 for g in g_policy)
  assert all(np.abs(g).sum() == 0 for g in g_ref)


def test_kto_equals_its_hand_computation():
  policy, ref = jnp.array([-2.0, -3.0, -1.0]), jnp.array([-2.5, -2.0, -1.0])
  desirable = jnp.array([True, False, True])
  loss, _ = preference.kto(
    policy,
    ref,
    desirable,
    kl=jnp.array(0.2),
    beta=0.5,
    desirable_weight=1.0,
    undesirable_weight=2.0,
  )
  sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
  want = [
    1 - sig(0.5 * (0.5 - 0.2)),
    2.0 * (1 - sig(0.5 * (0.2 - (-1.0)))),
    1 - sig(0.5 * (0 - 0.2)),
  ]
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  # A negative KL estimate is clamped at 0 (TRL), and it carries no gradient.
  g = jax.grad(lambda kl: preference.kto(policy, ref, desirable, kl)[0].sum())(jnp.array(-1.0))
  assert float(g) == 0.0


def test_sequence_logps_sums_over_the_masked_tokens():
  logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]]))
  total, count = preference.sequence_logps(logits, jnp.array([[0, 1, 2]]), jnp.array([[0, 1, 1]]))
  np.testing.assert_allclose(total, [math.log(0.8) + math.log(0.6)], rtol=1e-6)
  np.testing.assert_array_equal(count, [2.0])


@pytest.mark.parametrize(
  "kwargs,match",
  [
    ({"beta": float("nan")}, "beta must be positive"),
    ({"beta": 0.0}, "beta must be positive"),
    ({"label_smoothing": 0.5}, "label_smoothing"),
    ({"gamma_beta_ratio": -1.0}, "gamma_beta_ratio"),
  ],
)
def test_bad_preference_options_are_named(kwargs, match):
  with pytest.raises(ValueError, match=match):
    preference.Options(**kwargs)


def test_unknown_loss_and_a_missing_reference_are_named():
  with pytest.raises(ValueError, match="unknown preference loss 'dpo'; one of"):
    preference.paired_loss("dpo", PAIRS, preference.Options())
  free = preference.Pairs(PAIRS.chosen, PAIRS.rejected, PAIRS.chosen_len, PAIRS.rejected_len)
  with pytest.raises(ValueError, match="needs the reference"):
    preference.paired_loss("sigmoid", free, preference.Options())
  preference.paired_loss("simpo", free, preference.Options())  # reference-free: fine


# ----------------------------------------------------------------------------- distillation

TEACHER = jnp.array([[2.0, 1.0, 0.0, -1.0], [0.5, 0.5, 3.0, 0.0]])
STUDENT = jnp.array([[1.0, 1.5, -0.5, 0.0], [0.0, 1.0, 2.0, 1.0]])


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _kl(p, q):
  return (p * (np.log(p) - np.log(q))).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_divergences_equal_their_formulas(temperature):
  p = _softmax(np.asarray(TEACHER) / temperature)
  q = _softmax(np.asarray(STUDENT) / temperature)
  m = 0.3 * p + 0.7 * q
  want = {
    "forward_kl": _kl(p, q),
    "reverse_kl": _kl(q, p),
    "jsd": 0.3 * _kl(p, m) + 0.7 * _kl(q, m),
  }
  for kind, value in want.items():
    got = distillation.divergence(TEACHER, STUDENT, kind, beta=0.3, temperature=temperature)
    np.testing.assert_allclose(got, value, rtol=1e-5, err_msg=kind)


def test_student_equal_to_teacher_with_alpha_1_is_zero_loss():
  for kind in distillation.DIVERGENCES:
    total, _, _ = distillation.loss(
      TEACHER, TEACHER, jnp.array([0, 2]), alpha=1.0, kind=kind, temperature=2.0
    )
    np.testing.assert_allclose(total, [0.0, 0.0], atol=1e-6)


def test_loss_mixes_t_squared_soft_and_hard_targets():
  targets = jnp.array([1, 2])
  total, soft, hard = distillation.loss(TEACHER, STUDENT, targets, alpha=0.25, temperature=2.0)
  q = _softmax(np.asarray(STUDENT))
  np.testing.assert_allclose(hard, -np.log(q[[0, 1], [1, 2]]), rtol=1e-6)
  np.testing.assert_allclose(
    total, 0.25 * 4.0 * np.asarray(soft) + 0.75 * np.asarray(hard), rtol=1e-6
  )


def test_top_k_renormalizes_over_the_teachers_top_tokens():
  # Row 0's top-2 teacher tokens are 0 and 1; row 1's are 2 and then 0 (ties go to the lower id).
  got = distillation.divergence(TEACHER, STUDENT, "forward_kl", top_k=2)
  want = []
  for t, s, idx in zip(np.asarray(TEACHER), np.asarray(STUDENT), ([0, 1], [2, 0])):
    want.append(_kl(_softmax(t[idx]), _softmax(s[idx])))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # k = V is the full vocabulary.
  np.testing.assert_allclose(
    distillation.divergence(TEACHER, STUDENT, top_k=4),
    distillation.divergence(TEACHER, STUDENT),
    rtol=1e-6,
  )


def test_the_teacher_gets_no_gradient():
  g = jax.grad(lambda t: distillation.divergence(t, STUDENT).sum())(TEACHER)
  assert float(jnp.abs(g).sum()) == 0.0


@pytest.mark.parametrize(
  "kwargs,match",
  [
    ({"kind": "kl"}, "divergence='kl' is not one of"),
    ({"kind": "jsd", "beta": 1.0}, r"beta must be in \(0, 1\)"),
    ({"temperature": float("nan")}, "temperature must be positive"),
    ({"top_k": 5}, r"top_k must be an integer in \[0, 4\]"),
    ({"alpha": 1.5}, r"alpha must be in \[0, 1\]"),
  ],
)
def test_bad_distillation_arguments_are_named(kwargs, match):
  with pytest.raises(ValueError, match=match):
    distillation.loss(TEACHER, STUDENT, jnp.array([0, 1]), **kwargs)


def test_a_teacher_with_another_vocabulary_is_named():
  with pytest.raises(ValueError, match="must share the tokenizer"):
    distillation.divergence(jnp.zeros((2, 5)), STUDENT)
