"""KV-cache compression (``models/kv_cache.py``): every policy equals full attention when its
budget covers the sequence; sinks sit just before the window; H2O keeps exactly its budget; Quest's
page bound bounds every score in the page."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxseed.models import kv_cache
from flaxseed.models import sampling
from flaxseed.models import transformer

CFG = transformer.TransformerConfig(
  d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64, scan_layers=False
)
PROMPTS = [[5, 9, 33, 2, 100, 7, 7, 7], [7, 7, 1], [1, 2, 3, 4, 5]]
COVERING = [
  "window:recent=64,sinks=4",
  "window:recent=64",
  "h2o:heavy=64,recent=8",
  "quest:budget=64,page=8",
]


@pytest.fixture(scope="module")
def params():
  model = transformer.Transformer(CFG)
  return nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])


def _model(spec, **kw):
  return transformer.Transformer(dataclasses.replace(CFG, kv_cache=spec, **kw))


def _teacher_forced(model, params, tokens, prefill=4):
  """Decode logits of every position: a prefill chunk, then one token at a time."""
  cache = sampling.init_cache(model, tokens.shape[0], tokens.shape[1])
  outs = []
  for start, stop in [(0, prefill)] + [(i, i + 1) for i in range(prefill, tokens.shape[1])]:
    logits, variables = model.apply(
      {"params": params, "cache": cache}, tokens[:, start:stop], decode=True, mutable=["cache"]
    )
    cache = variables["cache"]
    outs.append(logits)
  return jnp.concatenate(outs, axis=1), cache


TOKENS = np.random.default_rng(0).integers(0, 256, (2, 20)).astype(np.int32)


@pytest.fixture(scope="module")
def full_attention(params):
  """Greedy tokens and teacher-forced logits of the full cache (computed once)."""
  full = _model(None)
  return (
    sampling.generate(full, params, PROMPTS, max_new_tokens=12, temperature=0.0),
    _teacher_forced(full, params, jnp.asarray(TOKENS))[0],
  )


@pytest.mark.parametrize("spec", COVERING)
def test_a_budget_covering_the_sequence_equals_full_attention(params, full_attention, spec):
  want_tokens, want_logits = full_attention
  got = sampling.generate(_model(spec), params, PROMPTS, max_new_tokens=12, temperature=0.0)
  np.testing.assert_array_equal(got, want_tokens)
  logits = _teacher_forced(_model(spec), params, jnp.asarray(TOKENS))[0]
  np.testing.assert_allclose(logits, want_logits, atol=2e-5)


def test_sinks_sit_just_before_the_window():
  """One layer: decoding under sinks + window equals the full forward over the kept tokens alone
  (the sinks at positions 0..S-1, the window right after), so distances never exceed the cache."""
  cfg = dataclasses.replace(CFG, num_layers=1)
  model = transformer.Transformer(cfg)
  params = nn.unbox(model.init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))["params"])
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 24)), jnp.int32)
  sinks, recent = 2, 5
  logits, _ = _teacher_forced(
    transformer.Transformer(
      dataclasses.replace(cfg, kv_cache=f"window:recent={recent},sinks={sinks}")
    ),
    params,
    tokens,
  )
  for t in (10, 17, 23):
    kept = jnp.concatenate([tokens[:, :sinks], tokens[:, t - recent + 1 : t + 1]], axis=1)
    want = model.apply({"params": params}, kept)[:, -1]
    np.testing.assert_allclose(logits[:, t], want, atol=2e-5)
  # a plain window (no sinks) reads only the last `recent` tokens
  logits, _ = _teacher_forced(_model(f"window:recent={recent}", num_layers=1), params, tokens)
  np.testing.assert_allclose(
    logits[:, 20], model.apply({"params": params}, tokens[:, 16:21])[:, -1], atol=2e-5
  )


def test_h2o_keeps_exactly_its_budget(params):
  heavy, recent, length = 3, 4, 20
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 256, (2, length)), jnp.int32)
  _, cache = _teacher_forced(_model(f"h2o:heavy={heavy},recent={recent}"), params, tokens)
  for layer in ("layers_0", "layers_1"):
    kept = np.asarray(cache[layer]["attn"]["h2o_kept"])  # [B, K, S]
    np.testing.assert_array_equal(kept.sum(-1), heavy + recent)
    assert kept[..., length - recent :].all()  # the recent ones always stay
  # evicted tokens never return: a longer run keeps a subset of the earlier survivors (+ new ones)
  _, longer = _teacher_forced(_model(f"h2o:heavy={heavy},recent={recent}"), params, tokens[:, :15])
  early = np.asarray(longer["layers_0"]["attn"]["h2o_kept"])[..., :11]
  late = np.asarray(cache["layers_0"]["attn"]["h2o_kept"])[..., :11]
  assert not (late & ~early).any()


def test_quest_bound_is_an_upper_bound_and_the_budget_is_honoured():
  rng = np.random.default_rng(3)
  b, s, kv, groups, e, page = 2, 32, 2, 2, 8, 4
  q = jnp.asarray(rng.normal(size=(b, kv, groups, e)), jnp.float32)  # one query per KV group
  k = jnp.asarray(rng.normal(size=(b, s, kv, e)), jnp.float32)
  visible = jnp.ones((b, 1, s), bool)
  policy = kv_cache.parse(f"quest:budget={3 * page},page={page}")
  chosen = kv_cache.quest_pages(policy, q, k, visible, jnp.asarray([s - 1]))  # [B, K, Q, S]
  pages = np.asarray(chosen)[..., ::page]
  np.testing.assert_array_equal(pages.sum(-1), 3)
  assert pages[..., -1].all()  # the query's own page
  # the chosen pages are the top bounds, and each bound is at least every score in its page
  scores = np.einsum("bkqe,bske->bkqs", q, k).reshape(b, kv, groups, s // page, page)
  qn = np.asarray(q)
  kp = np.asarray(k).transpose(0, 2, 1, 3).reshape(b, kv, s // page, page, e)
  bound = np.einsum("bkqe,bkpe->bkqp", np.maximum(qn, 0), kp.max(3)) + np.einsum(
    "bkqe,bkpe->bkqp", np.minimum(qn, 0), kp.min(3)
  )
  assert np.all(bound + 1e-5 >= scores.max(-1))
  bound[..., -1] = np.inf
  top = np.sort(np.argsort(-bound, axis=-1)[..., :3], axis=-1)
  np.testing.assert_array_equal(np.sort(np.nonzero(pages)[-1].reshape(top.shape), -1), top)


def test_errors():
  for spec, match in [
    ("lru:size=4", "unknown kind 'lru'"),
    ("window:sinks=4", "window needs recent="),
    ("h2o:heavy=4,recent=x", "recent='x' is not an integer"),
    ("quest:budget=8,page=0", "page must be >= 1"),
    ("window:recent=4,heavy=2", "window takes"),
  ]:
    with pytest.raises(ValueError, match=match):
      transformer.TransformerConfig(kv_cache=spec)
  with pytest.raises(ValueError, match="kv_cache_dtype='fp8' is not one of"):
    transformer.TransformerConfig(kv_cache_dtype="fp8")


@pytest.mark.parametrize("spec", [None, "quest:budget=64,page=8"])
def test_an_int8_cache_holds_every_element_within_half_a_step(params, spec):
  tokens = jnp.asarray(np.random.default_rng(4).integers(0, 256, (2, 12)), jnp.int32)
  full_logits, full = _teacher_forced(_model(None), params, tokens)
  logits, cache = _teacher_forced(_model(spec, kv_cache_dtype="int8"), params, tokens)
  attn = cache["layers_0"]["attn"]
  assert attn["key"].dtype == jnp.int8 and attn["value"].dtype == jnp.int8
  for name in ("key", "value"):  # layer 0 reads the same inputs either way
    restored = attn[name].astype(jnp.float32) * attn[f"{name}_scale"]
    err = np.abs(np.asarray(restored - full["layers_0"]["attn"][name]))
    assert np.all(err <= np.asarray(attn[f"{name}_scale"]) / 2 + 1e-6)
  # the logits move by quantization noise only: far less than their own spread
  assert float(jnp.abs(logits - full_logits).max()) < 0.05 * float(jnp.std(full_logits))
