"""Speculative decoding (``models/speculative.py``): greedy output equals plain greedy decoding for
every draft source; the sampled rule leaves the model's distribution unchanged."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxseed.models import sampling
from flaxseed.models import speculative
from flaxseed.models import transformer
from flaxseed.models import watermark

T = transformer.TransformerConfig
PROMPTS = [[5, 9, 33, 2, 100], [7, 7], [1, 2, 3]]  # left-padded into one batch


def _init(cfg, seed=0, scale=1.0):
  model = transformer.Transformer(cfg)
  params = nn.unbox(model.init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"])
  # Larger weights make the random model's logits peaked, so no argmax is a near-tie that
  # float rounding between a chunked and a one-token forward could flip.
  return model, jax.tree.map(lambda x: x * scale, params)


@pytest.fixture(scope="module")
def target():
  cfg = T(d_model=32, num_layers=2, num_heads=4, mlp_dim=64, scan_layers=False, mtp_heads=3)
  return _init(cfg, scale=3.0)


@pytest.fixture(scope="module")
def drafts(target):
  model, params = target
  small = _init(T(d_model=16, num_layers=1, num_heads=2, mlp_dim=32), seed=1, scale=3.0)
  # The model itself with its weights nudged: it agrees with the model on some tokens, not all
  # (rows keep different numbers of drafts, so the batch leaves holes in the cache).
  noisy = jax.tree.map(lambda x: x + 0.003 * jax.random.normal(jax.random.key(7), x.shape), params)
  return {"mtp": "mtp", "small": small, "itself": (model, params), "nudged": (model, noisy)}


# batched left-padded prompts for every source; one row (no holes) where all drafts are kept; a
# one-token run (the prompt's forward alone)
CASES = [(source, PROMPTS, 11) for source in ("mtp", "sequential", "small", "itself", "nudged")]
CASES += [("itself", [[4, 8, 15]], 17), ("mtp", [[42]], 1)]


@pytest.fixture(scope="module")
def sequential_target():
  cfg = T(
    d_model=32,
    num_layers=2,
    num_heads=4,
    mlp_dim=64,
    scan_layers=False,
    mtp_heads=3,
    mtp_style="sequential",
  )
  return _init(cfg, scale=3.0)


@pytest.mark.parametrize("source,prompts,new", CASES)
def test_greedy_output_equals_greedy_decoding(
  target, sequential_target, drafts, source, prompts, new
):
  """Every draft source (parallel or sequential heads, a smaller model, the model itself, the
  model with nudged weights) over batched left-padded prompts gives greedy decoding's tokens."""
  model, params = sequential_target if source == "sequential" else target
  drafts = {**drafts, "sequential": "mtp"}
  want = sampling.generate(model, params, prompts, max_new_tokens=new, temperature=0.0)
  out = speculative.generate(
    model, params, prompts, max_new_tokens=new, draft=drafts[source], num_draft=3
  )
  np.testing.assert_array_equal(out.tokens, want)
  assert np.all(np.asarray(out.emitted) == new)
  if source == "itself":  # every draft kept: 1 token from the prompt, then 4 per forward
    want_forwards = 1 + -(-(new - 1) // 4)
    np.testing.assert_array_equal(out.forwards, want_forwards)
    assert out.tokens_per_forward == pytest.approx(new / want_forwards)
  if source == "nudged" and new > 1:  # some drafts kept, some rejected
    assert 1.2 < out.tokens_per_forward < 3.5, out.forwards


def test_stop_tokens_end_rows_as_in_greedy_decoding(target, drafts):
  model, params = target
  plain = np.asarray(sampling.generate(model, params, PROMPTS, max_new_tokens=12, temperature=0))
  stop = int(plain[0, 5 + 3])  # the fourth new token of row 0
  want = sampling.generate(
    model, params, PROMPTS, max_new_tokens=12, temperature=0, stop_tokens=(stop,), pad_token=1
  )
  for source in ("itself", "nudged"):
    out = speculative.generate(
      model,
      params,
      PROMPTS,
      max_new_tokens=12,
      draft=drafts[source],
      stop_tokens=(stop,),
      pad_token=1,
    )
    np.testing.assert_array_equal(out.tokens, want)
    assert int(out.emitted[0]) == 4


def test_hooks_act_as_in_plain_decoding(target, drafts):
  """A watermark's bias and a steering intervention change greedy decoding; speculative decoding
  with the same hooks gives the same tokens."""
  model, params = target
  kgw = watermark.KGW(vocab_size=256, delta=4.0, context_width=2)
  v = jax.random.normal(jax.random.key(3), (32,))
  hooks = dict(
    logits_processors=[kgw],
    interventions=[("layers_0/mlp", lambda x, a: x + a[None, None, :], 2.0 * v)],
  )
  want = sampling.generate(model, params, PROMPTS, max_new_tokens=10, temperature=0.0, **hooks)
  plain = sampling.generate(model, params, PROMPTS, max_new_tokens=10, temperature=0.0)
  assert not np.array_equal(want, plain)  # the hooks matter
  for source in ("mtp", "nudged"):
    out = speculative.generate(
      model, params, PROMPTS, max_new_tokens=10, draft=drafts[source], **hooks
    )
    np.testing.assert_array_equal(out.tokens, want)


# --- The sampled rule on a 3-token vocabulary, 2 drafts. ---
V, G = 3, 2


def _tables(seed):
  """Target conditionals p1[x1], p2[x1, x2], p3[x1, x2, x3] and drafter q1[d1], q2[d1, d2]."""
  rng = np.random.default_rng(seed)

  def conditional(*shape):
    t = rng.gamma(0.7, size=shape + (V,))
    return t / t.sum(-1, keepdims=True)

  return conditional(), conditional(V), conditional(V, V), conditional(), conditional(V)


def _rule_inputs(tables, d):
  """The rule's inputs for draft rows ``d [R, 2]``: the model's log-probs at the 3 verified
  positions (given the drafts before each) and the drafter's."""
  p1, p2, p3, q1, q2 = tables
  d1, d2 = d[:, 0], d[:, 1]
  p = np.stack([np.broadcast_to(p1, (len(d), V)), p2[d1], p3[d1, d2]], 1)
  q = np.stack([np.broadcast_to(q1, (len(d), V)), q2[d1]], 1)
  return jnp.log(p), jnp.log(q)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_rule_leaves_the_distribution_unchanged_exact_enumeration(seed):
  """Summed over every draft pair and every accept/reject branch, the three tokens emitted
  (continuing from p after a rejection, as the next step does) are distributed as p1 p2 p3."""
  tables = _tables(seed)
  p1, p2, p3, q1, q2 = tables
  d = np.asarray(list(itertools.product(range(V), repeat=2)))
  keep, residual = map(np.asarray, speculative.acceptance(*_rule_inputs(tables, d), jnp.asarray(d)))
  joint = np.zeros((V, V, V))
  for r, (d1, d2) in enumerate(d):
    weight = q1[d1] * q2[d1, d2]
    a1, a2 = keep[r]
    # rejected at the first draft: x1 from the residual, then the model continues
    joint += weight * (1 - a1) * residual[r, 0][:, None, None] * p2[:, :, None] * p3
    # first kept, second rejected
    joint[d1] += weight * a1 * (1 - a2) * residual[r, 1][:, None] * p3[d1]
    # both kept: the token after them from p3
    joint[d1, d2] += weight * a1 * a2 * residual[r, 2]
  want = p1[:, None, None] * p2[:, :, None] * p3
  np.testing.assert_allclose(joint, want, atol=1e-6)


def test_the_sampler_draws_what_the_rule_says():
  """``accept`` (uniforms, then a draw from the residual) against the exact distribution, by
  sampling 60000 draft pairs."""
  tables = _tables(0)
  p1, p2, p3, q1, q2 = tables
  rng, rows = np.random.default_rng(5), 60_000
  d1 = rng.choice(V, rows, p=q1)
  d2 = np.asarray([rng.choice(V, p=q2[a]) for a in d1])
  d = np.stack([d1, d2], 1)
  kept, nxt = map(
    np.asarray,
    speculative.accept(*_rule_inputs(tables, d), jnp.asarray(d), jax.random.key(0)),
  )
  x = np.zeros((rows, 3), np.int64)
  for r in range(rows):  # the kept drafts, the drawn token, then the model's own draws
    seq = [*d[r, : kept[r]], nxt[r]]
    while len(seq) < 3:
      seq.append(rng.choice(V, p=(p2[seq[0]] if len(seq) == 1 else p3[seq[0], seq[1]])))
    x[r] = seq[:3]
  freq = np.bincount(x @ np.asarray([V * V, V, 1]), minlength=V**3) / rows
  want = (p1[:, None, None] * p2[:, :, None] * p3).reshape(-1)
  sigma = np.sqrt(want * (1 - want) / rows)
  assert np.all(np.abs(freq - want) < 5 * sigma + 1e-4), np.abs(freq - want) / sigma


def test_sampled_decoding_runs_and_is_deterministic(target, drafts):
  model, params = target
  kw = dict(max_new_tokens=9, temperature=0.8, top_k=50, rng=jax.random.key(2))
  a = speculative.generate(model, params, PROMPTS, draft=drafts["nudged"], **kw)
  b = speculative.generate(model, params, PROMPTS, draft=drafts["nudged"], **kw)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert np.all(np.asarray(a.emitted) == 9) and 1.0 <= a.tokens_per_forward <= 4.0


def test_errors(target):
  model, params = target
  other = _init(T(vocab_size=300, d_model=16, num_layers=1, num_heads=2, mlp_dim=32))
  with pytest.raises(ValueError, match="draft model's vocab_size=300 differs .* vocab_size=256"):
    speculative.generate(model, params, [[1]], max_new_tokens=2, draft=other)
  plain = _init(T(d_model=16, num_layers=1, num_heads=2, mlp_dim=32))
  with pytest.raises(ValueError, match=r"draft='mtp' needs .*mtp_heads > 0"):
    speculative.generate(*plain, [[1]], max_new_tokens=2)
  with pytest.raises(ValueError, match=r"num_draft=5 must be in \[1, mtp_heads=3\]"):
    speculative.generate(model, params, [[1]], max_new_tokens=2, num_draft=5)
  with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
    speculative.generate(model, params, [[1]], max_new_tokens=0)
  windowed = _init(
    T(
      d_model=16,
      num_layers=2,
      num_heads=2,
      mlp_dim=32,
      attention_pattern=("sliding_window:4", "global"),
    )
  )
  h2o = _init(T(d_model=16, num_layers=1, num_heads=2, mlp_dim=32, kv_cache="h2o:heavy=4,recent=4"))
  with pytest.raises(ValueError, match="H2O's scores would keep the attention of rejected"):
    speculative.generate(model, params, [[1]], max_new_tokens=2, draft=h2o)
  with pytest.raises(ValueError, match="sliding-window layers"):
    speculative.generate(model, params, [[1], [2]], max_new_tokens=2, draft=windowed)
