"""Attention implementations against the reference: forward and gradients, every mask."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxseed import kernels
from flaxseed.kernels.attention import reference
from flaxseed.kernels.attention import xla_chunked


def _inputs(b=2, length=40, h=4, k=2, e=16, seed=0, dtype=jnp.float32):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(kq, (b, length, h, e), dtype)
  key = jax.random.normal(kk, (b, length, k, e), dtype)
  v = jax.random.normal(kv, (b, length, k, e), dtype)
  return q, key, v


def _segments(b, length):
  """Three packed documents per row, then padding (segment 0)."""
  cuts = np.array([length // 3, 2 * length // 3, length - 3])
  seg = np.searchsorted(cuts, np.arange(length), side="right") + 1
  seg[seg == 4] = 0
  return jnp.asarray(np.stack([seg, np.roll(seg, 2)])[:b], jnp.int32)


def _naive(q, k, v, causal, segment_ids, cap=None):
  """Loop-free numpy reference written independently of the library."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, length, h, e = q.shape
  k = np.repeat(k, h // k.shape[2], axis=2)
  v = np.repeat(v, h // v.shape[2], axis=2)
  s = np.einsum("blhe,bmhe->bhlm", q, k) / np.sqrt(e)
  if cap is not None:
    s = cap * np.tanh(s / cap)
  mask = np.ones((b, 1, length, length), bool)
  if causal:
    mask &= np.tril(np.ones((length, length), bool))
  if segment_ids is not None:
    seg = np.asarray(segment_ids)
    mask &= seg[:, None, :, None] == seg[:, None, None, :]
  s = np.where(mask, s, -np.inf)
  m = np.max(s, axis=-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0)
  p = np.exp(s - m)
  total = p.sum(-1, keepdims=True)
  p = p / np.where(total == 0, 1, total)
  return np.einsum("bhlm,bmhe->blhe", p, v)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("segmented", [False, True])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)])  # MHA, GQA, MQA
def test_reference_matches_naive(causal, segmented, heads):
  q, k, v = _inputs(h=heads[0], k=heads[1])
  seg = _segments(2, q.shape[1]) if segmented else None
  out = reference.attention(q, k, v, causal=causal, segment_ids=seg)
  np.testing.assert_allclose(out, _naive(q, k, v, causal, seg), atol=1e-5, rtol=1e-5)


def test_soft_cap_matches_naive():
  q, k, v = _inputs()
  q = q * 4.0
  out = reference.attention(q, k, v, causal=True, logit_soft_cap=2.0)
  np.testing.assert_allclose(out, _naive(q, k, v, True, None, cap=2.0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("segmented", [False, True])
@pytest.mark.parametrize("length,block", [(40, 16), (64, 16), (17, 32)])  # ragged, exact, one chunk
def test_chunked_equals_reference_forward_and_gradients(causal, segmented, length, block):
  q, k, v = _inputs(length=length)
  seg = _segments(2, length) if segmented else None
  kwargs = dict(causal=causal, segment_ids=seg, logit_soft_cap=5.0)
  sizes = xla_chunked.BlockSizes(block_q=block, block_kv=16)
  ct = jax.random.normal(jax.random.key(9), q.shape)  # a random cotangent

  def loss(fn, q, k, v):
    return jnp.sum(fn(q, k, v) * ct)

  ref = lambda q, k, v: reference.attention(q, k, v, **kwargs)  # noqa: E731
  chk = lambda q, k, v: xla_chunked.attention(q, k, v, block_sizes=sizes, **kwargs)  # noqa: E731
  chex.assert_trees_all_close(chk(q, k, v), ref(q, k, v), atol=1e-5, rtol=1e-5)
  g_ref = jax.grad(lambda *a: loss(ref, *a), argnums=(0, 1, 2))(q, k, v)
  g_chk = jax.grad(lambda *a: loss(chk, *a), argnums=(0, 1, 2))(q, k, v)
  chex.assert_trees_all_close(g_chk, g_ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("implementation", ["xla", "xla_chunked"])
def test_rows_without_visible_keys_are_zero_not_nan(implementation):
  q, k, v = _inputs(length=32)
  # Query segment 2 never appears among the keys: those rows see nothing.
  seg_q = jnp.where(jnp.arange(32) < 16, 1, 2)[None].repeat(2, 0)
  seg_kv = jnp.ones((2, 32), jnp.int32)
  segments = kernels.SegmentIds(seg_q, seg_kv)
  fn = lambda q, k, v: kernels.flash_attention(  # noqa: E731
    q, k, v, causal=True, segment_ids=segments, implementation=implementation
  )
  out = fn(q, k, v)
  assert np.all(np.asarray(out[:, 16:]) == 0)
  assert np.all(np.isfinite(out))
  grads = jax.grad(lambda *a: jnp.sum(fn(*a) ** 2), argnums=(0, 1, 2))(q, k, v)
  for g in grads:
    assert np.all(np.isfinite(g))
  assert np.all(np.asarray(grads[0][:, 16:]) == 0)


def test_q_offset_matches_suffix_of_full_attention():
  """Causal attention of the last queries with an offset == the rows of the full attention."""
  q, k, v = _inputs(length=24)
  full = reference.attention(q, k, v, causal=True)
  tail = reference.attention(q[:, 20:], k, v, causal=True, q_offset=20)
  np.testing.assert_allclose(tail, full[:, 20:], atol=1e-6)


def test_bfloat16_inputs_keep_dtype_and_accuracy():
  q, k, v = _inputs(dtype=jnp.bfloat16)
  out = kernels.flash_attention(
    q,
    k,
    v,
    causal=True,
    implementation="xla_chunked",
    block_sizes=xla_chunked.BlockSizes(block_q=16),
  )
  assert out.dtype == jnp.bfloat16
  ref = _naive(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), True, None)
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=5e-2)


def test_default_implementation_runs_and_matches():
  q, k, v = _inputs(length=300)
  impl = kernels.attention.default_implementation(300, causal=True)
  assert impl in kernels.attention.implementations()
  out = kernels.flash_attention(q, k, v, causal=True)
  np.testing.assert_allclose(out, reference.attention(q, k, v, causal=True), atol=1e-5)


@pytest.mark.parametrize(
  "bad,match",
  [
    (dict(implementation="nope"), "unknown attention implementation 'nope'"),
    (dict(k_heads=3), "multiple of kv heads"),
    (dict(segment_len=7), "segment_ids.q must be"),
    (dict(k_len=5), "does not match q"),
  ],
)
def test_bad_arguments_raise_clear_errors(bad, match):
  q, k, v = _inputs(length=8, h=4, k=2)
  if "k_heads" in bad:
    k = v = jnp.zeros((2, 8, 3, 16))
  if "k_len" in bad:
    k = v = jnp.zeros((2, 5, 2, 16))
  seg = jnp.ones((2, bad["segment_len"]), jnp.int32) if "segment_len" in bad else None
  with pytest.raises(ValueError, match=match):
    kernels.flash_attention(q, k, v, segment_ids=seg, implementation=bad.get("implementation"))
