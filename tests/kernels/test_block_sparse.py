"""Masks, block layouts, and every attention implementation against a float64 numpy reference.

The Pallas kernels run in interpret mode on CPU (``pallas_tpu`` with the TPU interpreter's
semantics) and compiled on their accelerator (``FLAXSEED_INTERPRET``, see ``conftest.py``), with
small blocks so that lengths are ragged and layouts have full, partial and empty blocks.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxseed import kernels
from flaxseed.kernels import masks
from flaxseed.kernels.attention import BlockSizes

IMPLEMENTATIONS = ["xla", "xla_chunked", "pallas_tpu", "pallas_gpu"]


# ----------------------------------------------------------------------------- masks


def _table(fn, length):
  return np.array([[bool(fn(i, j)) for j in range(length)] for i in range(length)])


@pytest.mark.parametrize(
  "mask,rule",
  [
    (masks.full(), lambda i, j: True),
    (masks.causal(), lambda i, j: j <= i),
    (masks.sliding_window(3), lambda i, j: i - 3 < j <= i),
    (masks.sliding_window(3, causal=False), lambda i, j: abs(i - j) < 3),
    (masks.chunked_causal(4), lambda i, j: j <= i and i // 4 == j // 4),
    (masks.prefix_lm(5), lambda i, j: j < 5 or j <= i),
    (masks.global_tokens(2), lambda i, j: i < 2 or j < 2),
    (
      masks.sliding_window(2) | masks.global_tokens(1),
      lambda i, j: i - 2 < j <= i or i < 1 or j < 1,
    ),
    (
      masks.prefix_lm(3) & masks.sliding_window(4, causal=False),
      lambda i, j: (j < 3 or j <= i) and abs(i - j) < 4,
    ),
    (
      masks.parse("sliding_window:2|global_tokens:1"),
      lambda i, j: i - 2 < j <= i or i < 1 or j < 1,
    ),
  ],
)
def test_mask_tables_match_their_definitions(mask, rule):
  np.testing.assert_array_equal(mask.dense(13), _table(rule, 13))
  assert mask.sees_self == bool(np.all(np.diagonal(mask.dense(13))))


def test_from_dense_equality_and_errors():
  table = np.random.default_rng(0).random((9, 9)) < 0.5
  assert masks.from_dense(table) == masks.from_dense(table.copy())
  assert masks.from_dense(table) != masks.from_dense(~table)
  with pytest.raises(ValueError, match="square"):
    masks.from_dense(np.ones((3, 4), bool))
  with pytest.raises(ValueError, match="boolean"):
    masks.from_dense(np.ones((3, 3)))
  q, k, v, _ = _inputs(length=8)
  with pytest.raises(ValueError, match="9 x 9 but the sequence length is 8"):
    kernels.block_sparse_attention(q, k, v, masks.from_dense(table))
  with pytest.raises(ValueError, match="window must be a positive int"):
    masks.sliding_window(0)
  with pytest.raises(ValueError, match="unknown mask 'nope'"):
    masks.parse("causal|nope:3")


@pytest.mark.parametrize(
  "mask",
  [
    masks.causal(),
    masks.sliding_window(20) | masks.global_tokens(5),
    masks.random_blocks(100, 8, 0.4, seed=3),
  ],
)
@pytest.mark.parametrize("blocks", [(16, 16), (16, 32), (32, 16)])
def test_block_layout_lists_exactly_the_nonempty_blocks(mask, blocks):
  length, (bq, bk) = 100, blocks
  layout = masks.block_layout(mask, length, bq, bk)
  padded = layout.padded_length
  assert padded % bq == 0 and padded % bk == 0 and padded >= length
  dense = np.zeros((padded, padded), bool)
  dense[:length, :length] = mask.dense(length)
  tiles = dense.reshape(padded // bq, bq, padded // bk, bk).transpose(0, 2, 1, 3)
  want = np.where(
    tiles.all((2, 3)), masks.FULL, np.where(tiles.any((2, 3)), masks.PARTIAL, masks.EMPTY)
  )
  np.testing.assert_array_equal(layout.kinds, want)
  for i in range(padded // bq):  # forward walk: the non-empty tiles of the row, in order
    visited = layout.kv_blocks[i, : layout.kv_counts[i]]
    np.testing.assert_array_equal(visited, np.nonzero(want[i] != masks.EMPTY)[0])
    codes = layout.kv_codes[i, : layout.kv_counts[i]]
    np.testing.assert_array_equal(codes != 0, want[i, visited] == masks.PARTIAL)
    if not mask.computable:  # stored blocks reproduce the partial tiles
      for code, j in zip(codes, visited):
        if code:
          np.testing.assert_array_equal(layout.partial_blocks[code - 1], tiles[i, j])
  for j in range(padded // bk):  # transposed walk for dk/dv
    np.testing.assert_array_equal(
      layout.q_blocks[j, : layout.q_counts[j]], np.nonzero(want[:, j] != masks.EMPTY)[0]
    )
  assert 0 < layout.density <= 1


# ----------------------------------------------------------------------------- numerics


def _inputs(b=2, length=100, h=4, k=2, e=16, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (b, length, h, e), jnp.float32)
  key = jax.random.normal(keys[1], (b, length, k, e), jnp.float32)
  v = jax.random.normal(keys[2], (b, length, k, e), jnp.float32)
  d_out = jax.random.normal(keys[3], (b, length, h, e), jnp.float32)
  return q, key, v, d_out


def _numpy_reference(q, k, v, d_out, visible, cap):
  """Float64 forward and gradients of ``sum(out * d_out)``, written out by hand.

  ``visible``: ``[B, L, L]`` booleans. Rows that see nothing give zeros and no gradient.
  """
  q, k, v, d_out = (np.asarray(x, np.float64) for x in (q, k, v, d_out))
  b, length, h, e = q.shape
  groups = h // k.shape[2]
  k_h, v_h = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
  scale = e**-0.5
  x = np.einsum("blhe,bmhe->bhlm", q, k_h) * scale
  s = cap * np.tanh(x / cap) if cap else x
  vis = visible[:, None]
  s = np.where(vis, s, -np.inf)
  m = np.max(s, axis=-1, keepdims=True)
  p = np.exp(s - np.where(np.isfinite(m), m, 0))
  total = p.sum(-1, keepdims=True)
  p = p / np.where(total == 0, 1, total)
  out = np.einsum("bhlm,bmhe->blhe", p, v_h)
  dp = np.einsum("blhe,bmhe->bhlm", d_out, v_h)
  ds = p * (dp - np.sum(dp * p, axis=-1, keepdims=True))
  if cap:
    ds = ds * (1 - np.tanh(x / cap) ** 2)
  dq = np.einsum("bhlm,bmhe->blhe", ds, k_h) * scale
  dk_h = np.einsum("bhlm,blhe->bmhe", ds, q) * scale
  dv_h = np.einsum("bhlm,blhe->bmhe", p, d_out)
  fold = lambda g: g.reshape(b, length, k.shape[2], groups, e).sum(3)  # noqa: E731
  return out, (dq, fold(dk_h), fold(dv_h))


def _segments(b, length, absent_from_keys=False):
  """Packed documents, then padding (segment 0); optionally one query segment no key has."""
  cuts = np.array([length // 3, 2 * length // 3, length - 7])
  seg = np.searchsorted(cuts, np.arange(length), side="right") + 1
  seg[seg == 4] = 0
  seg = np.stack([seg, np.roll(seg, 5)])[:b]
  seg_kv = seg.copy()
  if absent_from_keys:
    seg_kv[seg_kv == 2] = 7  # queries of segment 2 see no key at all
  return kernels.SegmentIds(jnp.asarray(seg, jnp.int32), jnp.asarray(seg_kv, jnp.int32))


CASES = {
  # name: (mask, heads (H, K), segments, soft cap)
  "causal_gqa": (masks.causal(), (4, 2), None, None),
  "dense_mqa_segments_cap": (None, (4, 1), "packed", 5.0),
  "window_or_global": (masks.sliding_window(24) | masks.global_tokens(3), (4, 2), None, None),
  "chunked_causal_segments": (masks.chunked_causal(40), (2, 2), "packed", None),
  "prefix_lm": (masks.prefix_lm(30), (4, 2), None, None),
  "bidirectional_window": (masks.sliding_window(20, causal=False), (2, 1), None, 30.0),
  # Full, partial and empty blocks: with segment ids full blocks take the masked path too.
  "random_blocks_segments": (masks.random_blocks(100, 16, 0.6, seed=1), (4, 2), "packed", None),
  "fully_masked_rows": (masks.causal(), (4, 2), "absent", None),
  "global_tokens_causal": (masks.global_tokens(5) & masks.causal(), (2, 1), None, None),
}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", list(CASES))
def test_implementation_matches_float64_reference(implementation, case, interpret, require_backend):
  require_backend(implementation)
  mask, (h, kh), seg_kind, cap = CASES[case]
  length = 100  # not a multiple of the blocks
  q, k, v, d_out = _inputs(length=length, h=h, k=kh)
  segments = None if seg_kind is None else _segments(2, length, seg_kind == "absent")
  visible = np.ones((2, length, length), bool)
  if mask is not None:
    visible &= mask.dense(length)[None]
  if segments is not None:
    visible &= np.asarray(segments.q)[:, :, None] == np.asarray(segments.kv)[:, None, :]
  want_out, want_grads = _numpy_reference(q, k, v, d_out, visible, cap)

  blocks = {"xla": None, "xla_chunked": BlockSizes(32, 16)}.get(implementation, BlockSizes(32, 32))
  fn = lambda q, k, v: kernels.block_sparse_attention(  # noqa: E731
    q,
    k,
    v,
    mask,
    segment_ids=segments,
    logit_soft_cap=cap,
    implementation=implementation,
    block_sizes=blocks,
    interpret=interpret,
  )
  out, vjp = jax.vjp(fn, q, k, v)
  np.testing.assert_allclose(out, want_out, atol=2e-5, rtol=2e-5)
  for got, want, name in zip(vjp(d_out), want_grads, ("dq", "dk", "dv")):
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4, err_msg=name)
  if seg_kind == "absent":  # rows that see nothing: exactly zero, no gradient, no NaN
    empty = ~visible.any(-1)
    assert empty.any()
    assert np.all(np.asarray(out)[empty] == 0)
    assert np.all(np.asarray(vjp(d_out)[0])[empty] == 0)


@pytest.mark.parametrize("implementation", ["pallas_tpu", "pallas_gpu"])
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
def test_pallas_head_dims(implementation, head_dim, interpret, require_backend):
  require_backend(implementation)
  q, k, v, d_out = _inputs(b=1, length=40, h=2, k=1, e=head_dim, seed=head_dim)
  visible = np.broadcast_to(masks.causal().dense(40), (1, 40, 40))
  want_out, want_grads = _numpy_reference(q, k, v, d_out, visible, None)
  fn = lambda q, k, v: kernels.flash_attention(  # noqa: E731
    q,
    k,
    v,
    causal=True,
    implementation=implementation,
    block_sizes=BlockSizes(16, 16),
    interpret=interpret,
  )
  out, vjp = jax.vjp(fn, q, k, v)
  np.testing.assert_allclose(out, want_out, atol=2e-5, rtol=2e-5)
  for got, want in zip(vjp(d_out), want_grads):
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("implementation", ["pallas_tpu", "pallas_gpu"])
def test_pallas_bfloat16_keeps_dtype_and_accuracy(implementation, interpret, require_backend):
  require_backend(implementation)
  q, k, v, _ = _inputs(length=64)
  bf = lambda x: x.astype(jnp.bfloat16)  # noqa: E731
  out = kernels.flash_attention(
    bf(q),
    bf(k),
    bf(v),
    causal=True,
    implementation=implementation,
    block_sizes=BlockSizes(32, 32),
    interpret=interpret,
  )
  assert out.dtype == jnp.bfloat16
  ref = kernels.flash_attention(q, k, v, causal=True, implementation="xla")
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=3e-2)


def test_pallas_gpu_rejects_non_power_of_two_blocks(interpret):
  q, k, v, _ = _inputs(length=64)
  with pytest.raises(ValueError, match="power-of-two block sizes"):
    kernels.flash_attention(
      q, k, v, implementation="pallas_gpu", block_sizes=BlockSizes(24, 24), interpret=interpret
    )


def test_block_sizes_and_mesh_arguments_are_checked():
  with pytest.raises(ValueError, match="block_sizes.block_q must be a positive multiple of 8"):
    BlockSizes(block_q=12)
  q, k, v, _ = _inputs(length=16)
  with pytest.raises(ValueError, match="mesh and spec go together"):
    kernels.flash_attention(q, k, v, implementation="xla", mesh=jax.make_mesh((1,), ("data",)))


def test_sharded_call_matches_unsharded(interpret, require_backend):
  """Under shard_map over batch and heads (8 fake devices) the kernel gives the same result."""
  if len(jax.devices()) < 4:
    pytest.skip(f"needs 4 devices for a 2x2 mesh, this backend has {len(jax.devices())}")
  mesh = jax.make_mesh(
    (2, 2),
    ("data", "tensor"),
    axis_types=(jax.sharding.AxisType.Auto,) * 2,
    devices=jax.devices()[:4],
  )
  spec = jax.sharding.PartitionSpec("data", None, "tensor", None)
  q, k, v, _ = _inputs(length=48)
  segments = _segments(2, 48)
  mask = masks.sliding_window(16)
  with pytest.raises(ValueError, match="sequence .axis 1. and head dim .axis 3. cannot be sharded"):
    kernels.flash_attention(
      q, k, v, implementation="xla", mesh=mesh, spec=jax.sharding.PartitionSpec("data", "tensor")
    )
  require_backend("pallas_tpu")  # after the argument check, which runs everywhere
  fn = lambda mesh_args: kernels.block_sparse_attention(  # noqa: E731
    q,
    k,
    v,
    mask,
    segment_ids=segments,
    implementation="pallas_tpu",
    block_sizes=BlockSizes(16, 16),
    interpret=interpret,
    **mesh_args,
  )
  sharded = jax.jit(lambda: fn(dict(mesh=mesh, spec=spec)))()
  chex.assert_trees_all_close(sharded, fn({}), atol=1e-6)


@pytest.mark.parametrize("case", ["causal_gqa", "random_blocks_segments", "fully_masked_rows"])
def test_xla_chunked_loops_equal_its_unrolled_walk(case, monkeypatch):
  """Short walks are unrolled, long ones run as lax loops: both give the same values and grads."""
  from flaxseed.kernels.attention import xla_chunked  # pylint: disable=g-import-not-at-top

  mask, (h, kh), seg_kind, cap = CASES[case]
  q, k, v, d_out = _inputs(length=100, h=h, k=kh)
  segments = None if seg_kind is None else _segments(2, 100, seg_kind == "absent")

  def run():
    fn = lambda q, k, v: kernels.block_sparse_attention(  # noqa: E731
      q,
      k,
      v,
      mask,
      segment_ids=segments,
      logit_soft_cap=cap,
      implementation="xla_chunked",
      block_sizes=BlockSizes(16, 16),
    )
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(d_out)

  unrolled = run()
  monkeypatch.setattr(xla_chunked, "MAX_UNROLLED_BLOCKS", 0)
  looped = run()
  chex.assert_trees_all_close(looped, unrolled, atol=1e-6, rtol=1e-6)


def test_cudnn_is_refused_clearly_off_gpu():
  q, k, v, _ = _inputs(length=16)
  if jax.default_backend() == "gpu":
    pytest.skip("this checks the error off GPU")
  with pytest.raises(ValueError, match="implementation='cudnn' needs a GPU backend"):
    kernels.flash_attention(q, k, v, causal=True, implementation="cudnn")


def test_pallas_tpu_generic_interpreter_matches_the_tpu_interpreter(interpret):
  """``interpret="generic"`` (no side effects; what the transformer uses inside nn.scan) computes
  what the TPU interpreter computes, forward and backward."""
  if not interpret:
    pytest.skip("compares two interpreters: interpret mode only (FLAXSEED_INTERPRET=0 compiles)")
  q, k, v, d_out = _inputs(length=64)
  segments = _segments(2, 64)
  outs = []
  for mode in (True, "generic"):  # the TPU interpreter, then the generic one
    fn = lambda q, k, v, i=mode: kernels.block_sparse_attention(  # noqa: E731
      q,
      k,
      v,
      masks.sliding_window(20),
      segment_ids=segments,
      implementation="pallas_tpu",
      block_sizes=BlockSizes(16, 16),
      interpret=i,
    )
    out, vjp = jax.vjp(fn, q, k, v)
    outs.append((out, vjp(d_out)))
  chex.assert_trees_all_close(outs[1], outs[0], atol=1e-6, rtol=1e-6)
