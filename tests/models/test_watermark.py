"""KGW watermark (``models/watermark.py``): the null, the green rule, detection, determinism."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxseed.models import sampling
from flaxseed.models import transformer
from flaxseed.models import watermark

V = 256


@pytest.mark.parametrize("seeding", ["ngram", "minhash"])
def test_unwatermarked_z_scores_follow_the_null(seeding):
  """Text independent of the key (uniform random bytes, 1000 sequences of 200): z has mean ~0
  and variance ~1, and z > 4 is no more frequent than Hoeffding's bound allows:
  P(z > 4) <= exp(-32 gamma (1 - gamma)) = exp(-6) for gamma = 1/4."""
  wm = watermark.KGW(vocab_size=V, key=7, seeding=seeding)
  rng = np.random.default_rng(0)
  texts = rng.integers(0, V, size=(1000, 200))
  greens = np.asarray(
    watermark._greens(  # pylint: disable=protected-access
      wm, jnp.uint32(7), jnp.asarray(texts, jnp.int32), jnp.tile(jnp.arange(200), (1000, 1))
    )
  )
  z = (greens.sum(1) - 0.25 * 200) / math.sqrt(200 * 0.25 * 0.75)
  assert abs(z.mean()) < 0.15 and 0.8 < z.var() < 1.2, (z.mean(), z.var())
  bound = math.exp(-32 * 0.25 * 0.75)  # 0.0025
  assert (z > 4).sum() <= 1000 * bound + 4 * math.sqrt(1000 * bound)
  # The detector agrees with the vectorized rule (no repeated n-grams in random bytes this long).
  for text, count in zip(texts[:5], greens[:5].sum(1)):
    assert wm.detect(text)["green"] == count


def test_on_low_entropy_text_only_ngram_seeding_keeps_the_exact_null():
  """One repetitive text of few words, scored under 400 keys. "ngram" seeding decides each
  distinct n-gram independently: z over keys has variance ~1 (exactly Binomial after the
  repeated-n-gram correction). "minhash" n-grams that share their minimizing (context byte,
  token) pair share a decision: the variance is inflated, so its thresholds need calibration."""
  words = np.random.default_rng(5).choice(["the", "cat", "sat", "on", "a", "mat"], size=150)
  text = np.frombuffer(" ".join(words).encode(), np.uint8).astype(np.int64)
  var = {}
  for seeding in ("ngram", "minhash"):
    z = np.asarray(
      [watermark.KGW(vocab_size=V, key=k, seeding=seeding).detect(text)["z"] for k in range(400)]
    )
    var[seeding] = z.var()
    if seeding == "ngram":
      assert abs(z.mean()) < 0.2, z.mean()
  assert 0.75 < var["ngram"] < 1.3 and var["minhash"] > 1.5, var


@pytest.mark.parametrize("seeding", ["ngram", "minhash"])
def test_the_green_list_is_a_function_of_the_key_and_the_context_only(seeding):
  wm = watermark.KGW(vocab_size=V, key=7, seeding=seeding)
  vocab = jnp.arange(V)[None]
  ctx = jnp.asarray([[1, 2, 3, 4]])
  base = np.asarray(wm.green(ctx, vocab))
  assert 0.15 < base.mean() < 0.35  # about gamma of the vocabulary
  # The same context anywhere (another batch row, after other text) gives the same list.
  tokens = jnp.asarray([[9, 9, 9, 1, 2, 3, 4, 0], [5, 1, 2, 3, 4, 0, 0, 0]])
  at_row0 = wm(jnp.zeros((2, V)), tokens, 7)[0] > 0  # context tokens[0, 3:7] = 1 2 3 4
  at_row1 = wm(jnp.zeros((2, V)), tokens, 5)[1] > 0  # context tokens[1, 1:5] = 1 2 3 4
  np.testing.assert_array_equal(at_row0, base[0])
  np.testing.assert_array_equal(at_row1, base[0])
  # Another key or another context gives another list.
  other_key = watermark.KGW(vocab_size=V, key=8, seeding=seeding)
  assert (np.asarray(other_key.green(ctx, vocab)) != base).mean() > 0.2
  assert (np.asarray(wm.green(jnp.asarray([[9, 8, 7, 6]]), vocab)) != base).mean() > 0.2
  # One changed context token: a fresh draw for every candidate under "ngram" (differs with
  # probability 2 gamma (1 - gamma) = 0.375); under "minhash" only for the candidates whose
  # minimum it held (about 1 in 4).
  moved = (np.asarray(wm.green(jnp.asarray([[1, 2, 3, 5]]), vocab)) != base).mean()
  assert (0.25 < moved < 0.5) if seeding == "ngram" else (0.02 < moved < 0.25), moved


@pytest.fixture(scope="module")
def random_model():
  """A randomly initialized byte transformer: near-uniform next-token distributions (high
  entropy, where a watermark is easiest to detect)."""
  cfg = transformer.TransformerConfig(d_model=32, num_layers=1, num_heads=2, mlp_dim=64)
  model = transformer.Transformer(cfg)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  return model, params


def test_watermarked_text_is_detected_and_generation_is_deterministic(random_model):
  model, params = random_model
  wm = watermark.KGW(vocab_size=V, key=42)
  prompts = jnp.asarray(np.random.default_rng(1).integers(0, V, (4, 8)), jnp.int32)
  run = lambda mark, seed: np.asarray(  # noqa: E731
    sampling.generate(
      model,
      params,
      prompts,
      max_new_tokens=200,
      rng=jax.random.key(seed),
      logits_processors=[mark] if mark else [],
    )
  )
  marked = run(wm, 0)
  size = sampling._generate._cache_size()  # pylint: disable=protected-access
  again = run(watermark.KGW(vocab_size=V, key=42), 0)  # an equal config: the same program
  np.testing.assert_array_equal(again, marked)
  assert sampling._generate._cache_size() == size  # pylint: disable=protected-access
  plain = run(None, 0)
  for row_marked, row_plain in zip(marked, plain):
    found = wm.detect(row_marked, start=8, generated_with=wm.to_dict())
    assert found["z"] > 4 and found["p_value"] < 1e-4, found
    assert wm.detect(row_plain, start=8)["z"] < 4
  # Another key finds nothing.
  assert watermark.KGW(vocab_size=V, key=43).detect(marked[0], start=8)["z"] < 4


def test_repeated_ngrams_are_scored_once():
  wm = watermark.KGW(vocab_size=V, key=1, context_width=2)
  text = np.asarray([5, 6, 7] * 20)  # 3 distinct (context, token) trigrams after the start
  found = wm.detect(text, start=2)
  assert found["scored"] == 3, found


def test_bad_watermark_input_is_named():
  with pytest.raises(ValueError, match=r"gamma=1.5 must be in \(0, 1\)"):
    watermark.KGW(vocab_size=V, gamma=1.5)
  with pytest.raises(ValueError, match=r"gamma=nan must be in \(0, 1\)"):
    watermark.KGW(vocab_size=V, gamma=float("nan"))
  with pytest.raises(ValueError, match=r"context_width=0"):
    watermark.KGW(vocab_size=V, context_width=0)
  generator = watermark.KGW(vocab_size=V, gamma=0.25)
  detector = watermark.KGW(vocab_size=V, gamma=0.5)
  with pytest.raises(ValueError, match=r"differs from the generator's.*gamma: generated with 0.25"):
    detector.detect(np.arange(10), generated_with=generator.to_dict())
  with pytest.raises(ValueError, match=r"ids outside \[0, 256\)"):
    generator.detect(np.asarray([1, 300]))
  with pytest.raises(ValueError, match=r"KGW vocab_size=256 but the model's logits have 300"):
    generator(jnp.zeros((1, 300)), jnp.zeros((1, 4), jnp.int32), 2)


# --- SynthID-style tournament sampling. ---


def test_synthid_g_values_are_fair_independent_bits_under_the_null():
  wm = watermark.SynthID(vocab_size=V, key=3, depth=30)
  rng = np.random.default_rng(0)
  hashes = jnp.asarray(rng.integers(0, 2**32, 400, dtype=np.uint64).astype(np.uint32))
  g = np.asarray(wm.g_values(hashes, jnp.tile(jnp.arange(V), (400, 1))))  # [400, V, 30]
  n = g.size
  assert abs(g.mean() - 0.5) < 4 * 0.5 / math.sqrt(n), g.mean()
  layers = g.reshape(-1, 30).astype(np.float64)
  corr = np.corrcoef(layers.T)[np.triu_indices(30, 1)]
  assert np.abs(corr).max() < 0.02, np.abs(corr).max()  # layers independent


def test_synthid_closed_form_is_the_tournament_winners_distribution():
  """The processor's distribution equals a simulated tournament: 2^depth candidates drawn from
  p, matched in pairs layer by layer, the higher g_m winning (ties at random)."""
  small = 8
  wm = watermark.SynthID(vocab_size=small, key=5, depth=3, ngram_len=2)
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(1, small)), jnp.float32)
  tokens = jnp.asarray([[3, 0]], jnp.int32)
  got = np.exp(np.asarray(wm(logits, tokens, 1))[0])
  h = wm.context_hash(jnp.asarray([[[3]]]))[:, 0]
  g = np.asarray(wm.g_values(h, jnp.arange(small)[None]))[0]  # [V, depth]
  p = np.asarray(jax.nn.softmax(logits[0]))
  rng = np.random.default_rng(2)
  trials = 200_000
  alive = rng.choice(small, size=(trials, 2**3), p=p)
  for m in range(3):
    a, b = alive[:, 0::2], alive[:, 1::2]
    ga, gb = g[a, m], g[b, m]
    coin = rng.random(a.shape) < 0.5
    alive = np.where((ga > gb) | ((ga == gb) & coin), a, b)
  sim = np.bincount(alive[:, 0], minlength=small) / trials
  np.testing.assert_allclose(got, sim, atol=0.005)
  np.testing.assert_allclose(got.sum(), 1.0, rtol=1e-5)


def test_synthid_expected_g_on_a_uniform_model_matches_the_closed_form():
  """Layer 1 under a uniform distribution: E[g] = 1/2 + (1 - 1/V) / 4, averaged over contexts."""
  wm = watermark.SynthID(vocab_size=V, key=9, depth=1)
  rng = np.random.default_rng(3)
  tokens = jnp.asarray(rng.integers(0, V, (2000, 5)), jnp.int32)
  p = np.exp(np.asarray(wm(jnp.zeros((2000, V)), tokens, 4)))
  h = wm.context_hash(watermark.contexts(tokens, jnp.full((2000, 1), 4), wm.width))[:, 0]
  g = np.asarray(wm.g_values(h, jnp.tile(jnp.arange(V), (2000, 1))))[..., 0]
  expected = (p * g).sum(1).mean()
  want = 0.5 + 0.25 * (1 - 1 / V)
  assert abs(expected - want) < 4 * 0.5 / math.sqrt(V * 2000), (expected, want)


def test_synthid_detects_its_text_and_masks_repeated_contexts(random_model):
  model, params = random_model
  wm = watermark.SynthID(vocab_size=V, key=11, temperature=0.9)
  prompts = jnp.asarray(np.random.default_rng(4).integers(0, V, (4, 8)), jnp.int32)
  gen = lambda mark: np.asarray(  # noqa: E731
    sampling.generate(
      model,
      params,
      prompts,
      max_new_tokens=200,
      rng=jax.random.key(0),
      logits_processors=[mark] if mark else [],
    )
  )
  marked, plain = gen(wm), gen(None)
  np.testing.assert_array_equal(gen(wm), marked)  # deterministic for a key and seed
  for row_marked, row_plain in zip(marked, plain):
    for weighted in (False, True):
      found = wm.detect(row_marked, start=8, weighted=weighted, generated_with=wm.to_dict())
      assert found["z"] > 4, found
      assert wm.detect(row_plain, start=8, weighted=weighted)["z"] < 4
  repeats = np.asarray([1, 2, 3, 4, 5] * 10)  # the 4-token contexts repeat after the first 5
  _, mask = wm.scores(repeats)
  assert mask.sum() == 5 + 4, mask  # 4 sentinel-led contexts + 5 distinct full ones
  with pytest.raises(ValueError, match=r"applies its own temperature and top_k"):
    sampling.generate(
      model, params, prompts, max_new_tokens=2, temperature=0.7, logits_processors=[wm]
    )


def test_bad_synthid_input_is_named():
  with pytest.raises(ValueError, match=r"temperature=1.5 must be in \(0, 1\]"):
    watermark.SynthID(vocab_size=V, temperature=1.5)
  with pytest.raises(ValueError, match=r"top_k=1 must be None or in \[2, 256\]"):
    watermark.SynthID(vocab_size=V, top_k=1)
  with pytest.raises(ValueError, match=r"depth=0 must be an integer >= 1"):
    watermark.SynthID(vocab_size=V, depth=0)
  a, b = watermark.SynthID(vocab_size=V, depth=30), watermark.SynthID(vocab_size=V, depth=20)
  with pytest.raises(ValueError, match=r"SynthID config differs.*depth: generated with 30"):
    b.detect(np.arange(10), generated_with=a.to_dict())
