"""Quantized weights: formats (round trip, error bounds, NF4 levels) and the matmul kernels
against the dequantized reference: interpreted on CPU, compiled on their accelerator
(``FLAXSEED_INTERPRET``, see ``conftest.py``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxseed import kernels
from flaxseed.kernels.quant import formats

FORMATS = [
  ("int8", None),
  ("int8", 64),
  ("int4", 128),
  ("int4", 32),
  ("nf4", 64),
  ("nf4", 128),
  ("ternary", None),
]


def _weight(k=256, n=200, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(k, n)), jnp.float32)


def test_nf4_levels_are_the_qlora_papers():
  # The paper's table was computed in float32: the float64 rebuild agrees to 2e-7.
  np.testing.assert_allclose(formats.nf4_levels_from_quantiles(), formats.NF4_LEVELS, atol=5e-7)
  assert len(set(formats.NF4_LEVELS)) == 16 and 0.0 in formats.NF4_LEVELS


@pytest.mark.parametrize("per_byte", [1, 2, 4])
def test_pack_unpack_round_trip(per_byte):
  codes = jnp.asarray(np.random.default_rng(1).integers(0, 2 ** (8 // per_byte), (64, 9)))
  packed = formats.pack(codes, per_byte)
  assert packed.shape == (64 // per_byte, 9) and packed.dtype == jnp.uint8
  np.testing.assert_array_equal(formats.unpack(packed, per_byte), codes)


@pytest.mark.parametrize("fmt,group", FORMATS)
def test_quantize_round_trip_and_error_bound(fmt, group):
  w = _weight()
  qw = kernels.quantize_weight(w, fmt, group)
  per_byte = {"int8": 1, "int4": 2, "nf4": 2, "ternary": 4}[fmt]
  assert qw.values.shape == (256 // per_byte, 200)
  assert qw.nbytes < w.size * 4 / per_byte + 4 * 200 * 256 / (group or 256) + 8
  wd = kernels.dequantize_weight(qw)
  again = kernels.quantize_weight(wd, fmt, group)
  if fmt == "ternary":  # the absmean of {-s, 0, s} differs from s, but the codes are stable
    np.testing.assert_array_equal(again.values, qw.values)
  else:  # the levels are fixed points: quantizing the dequantized weight changes nothing
    np.testing.assert_allclose(kernels.dequantize_weight(again), wd, atol=1e-6, rtol=1e-6)
  if fmt == "ternary":
    levels = np.unique(np.round(np.asarray(wd) / float(qw.scales[0, 0]), 6))
    assert set(levels) <= {-1.0, 0.0, 1.0}
    np.testing.assert_allclose(float(qw.scales[0, 0]), float(jnp.mean(jnp.abs(w))), rtol=1e-6)
  else:
    excess = jnp.abs(wd - w) - formats.rounding_bound(qw)
    assert float(jnp.max(excess)) <= 1e-6
    assert formats.max_abs_error(qw, w) > 0  # it does quantize


@pytest.mark.parametrize(
  "bad,match",
  [
    (dict(fmt="int3"), "fmt='int3' is not one of"),
    (dict(fmt="int4", group_size=48), "group_size=48 is not one of"),
    (dict(fmt="int4", group_size=128, k=192), "group_size=128 must divide the contraction dim"),
    (dict(fmt="ternary", group_size=64), "ternary uses one absmean scale"),
    (dict(fmt="ternary", k=66), "ternary packs 4 rows per byte: K=66"),
  ],
)
def test_bad_quantization_arguments(bad, match):
  w = _weight(k=bad.pop("k", 256))
  with pytest.raises(ValueError, match=match):
    kernels.quantize_weight(w, **bad)


@pytest.mark.parametrize("implementation", ["pallas_tpu", "pallas_gpu"])
@pytest.mark.parametrize("fmt,group", FORMATS)
@pytest.mark.parametrize("m", [1, 5, 16, 37])  # decode shapes and a ragged prefill
def test_kernel_matches_dequantized_reference(
  implementation, fmt, group, m, interpret, require_backend
):
  require_backend(implementation)
  w = _weight(k=256, n=200)  # N ragged against the 128-column tiles
  qw = kernels.quantize_weight(w, fmt, group)
  x = jax.random.normal(jax.random.key(m), (m, 256), jnp.float32)
  want = np.asarray(x, np.float64) @ np.asarray(kernels.dequantize_weight(qw), np.float64)
  got = kernels.quantized_matmul(x, qw, implementation=implementation, interpret=interpret)
  assert got.shape == (m, 200) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("fmt,group", [("int8", None), ("int4", 32), ("ternary", None)])
def test_pallas_gpu_split_k_equals_one_pass(fmt, group, interpret, require_backend):
  """The GPU kernel's K splits (float32 partials summed afterwards) give the same product."""
  from flaxseed.kernels.quant import pallas_gpu  # pylint: disable=g-import-not-at-top

  qw = kernels.quantize_weight(_weight(k=512, n=96), fmt, group)
  x = jax.random.normal(jax.random.key(1), (3, 512), jnp.float32)
  want = np.asarray(x, np.float64) @ np.asarray(kernels.dequantize_weight(qw), np.float64)
  assert pallas_gpu.plan(qw.layout, 3, bkp=32, splits=4).splits == 4
  with pytest.raises(ValueError, match="splits=3 must divide"):
    pallas_gpu.plan(qw.layout, 3, bkp=32, splits=3)
  require_backend("pallas_gpu")  # after the plan checks, which run everywhere
  got = pallas_gpu.matmul(x, qw, interpret=interpret, bkp=32, splits=4, bn=32)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("implementation", ["xla", "pallas_tpu", "pallas_gpu"])
def test_gradient_flows_to_x_and_not_to_the_weight(implementation, interpret, require_backend):
  require_backend(implementation)
  w = _weight(k=128, n=64)
  qw = kernels.quantize_weight(w, "int4", 32)
  x = jax.random.normal(jax.random.key(0), (3, 4, 128), jnp.float32)  # leading axes flatten
  wd = kernels.dequantize_weight(qw)
  f = lambda x: jnp.sum(
    jnp.sin(
      kernels.quantized_matmul(  # noqa: E731
        x, qw, implementation=implementation, interpret=interpret
      )
    )
  )
  np.testing.assert_allclose(
    jax.grad(f)(x), jax.grad(lambda x: jnp.sum(jnp.sin(x @ wd)))(x), atol=1e-4, rtol=1e-4
  )
  g_scales = jax.grad(
    lambda s: jnp.sum(
      kernels.quantized_matmul(
        x,
        formats.QuantizedWeight(qw.values, s, qw.layout),
        implementation=implementation,
        interpret=interpret,
      )
    )
  )(qw.scales)
  assert not np.any(np.asarray(g_scales))  # frozen


def test_bfloat16_activations(interpret, require_backend):
  require_backend("pallas_tpu")
  qw = kernels.quantize_weight(_weight(k=256, n=128), "int8")
  x = jax.random.normal(jax.random.key(0), (4, 256), jnp.bfloat16)
  got = kernels.quantized_matmul(x, qw, implementation="pallas_tpu", interpret=interpret)
  assert got.dtype == jnp.bfloat16
  want = x.astype(jnp.float32) @ kernels.dequantize_weight(qw)
  np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2e-2, atol=0.5)


def test_matmul_argument_errors():
  qw = kernels.quantize_weight(_weight(k=128, n=64), "int8")
  with pytest.raises(ValueError, match="last dim .64. must equal the weight's K .128."):
    kernels.quantized_matmul(jnp.zeros((2, 64)), qw)
  with pytest.raises(ValueError, match="unknown quantized_matmul implementation 'nope'"):
    kernels.quantized_matmul(jnp.zeros((2, 128)), qw, implementation="nope")
  with pytest.raises(ValueError, match="qw must be a QuantizedWeight"):
    kernels.quantized_matmul(jnp.zeros((2, 128)), jnp.zeros((128, 64)))


@pytest.mark.parametrize("m", [1, 5, 40])
def test_w8a8_kernel_equals_its_integer_reference(m, interpret, require_backend):
  """int8 activations x int8 weights: the TPU kernel's int32 accumulation equals the XLA path,
  which equals the integer formula written out in numpy."""
  w = _weight(k=256, n=200)
  qw = kernels.quantize_weight(w, "int8")
  x = jax.random.normal(jax.random.key(m), (m, 256), jnp.float32)
  xla = kernels.quantized_matmul(x, qw, implementation="xla", activations="int8")
  codes, x_scale = kernels.quant.api.quantize_rows(x)
  exact = (
    (np.asarray(codes, np.int64) @ np.asarray(qw.values, np.int64))
    * np.asarray(x_scale, np.float64)
    * np.asarray(qw.scales, np.float64)
  )
  np.testing.assert_allclose(xla, exact, rtol=1e-6, atol=1e-6)
  assert np.max(np.abs(np.asarray(codes))) == 127  # each row uses the full int8 range
  for fmt, group in (("int4", 128), ("int8", 64)):
    with pytest.raises(
      ValueError,
      match=f"w8a8. needs int8 weights with per-channel scales, got {fmt} with group_size={group}",
    ):
      kernels.quantized_matmul(x, kernels.quantize_weight(w, fmt, group), activations="int8")
  require_backend("pallas_tpu")  # after the XLA checks, which run everywhere
  tpu = kernels.quantized_matmul(
    x, qw, implementation="pallas_tpu", activations="int8", interpret=interpret
  )
  np.testing.assert_array_equal(tpu, xla)


@pytest.mark.parametrize("fmt,group", [("int4", 64), ("ternary", None), ("int8", None)])
def test_sharded_quantized_matmul_matches_unsharded(fmt, group, interpret, require_backend):
  """Under shard_map (rows over "data", weight columns over "tensor") each device multiplies by
  its own columns; the result equals the unsharded call."""
  require_backend("pallas_tpu")
  if len(jax.devices()) < 4:
    pytest.skip(f"needs 4 devices for a 2x2 mesh, this backend has {len(jax.devices())}")
  mesh = jax.make_mesh(
    (2, 2),
    ("data", "tensor"),
    axis_types=(jax.sharding.AxisType.Auto,) * 2,
    devices=jax.devices()[:4],
  )
  qw = kernels.quantize_weight(_weight(k=256, n=256), fmt, group)
  x = jax.random.normal(jax.random.key(1), (6, 256), jnp.float32)
  want = kernels.quantized_matmul(x, qw, implementation="pallas_tpu", interpret=interpret)
  got = jax.jit(
    lambda x, qw: kernels.quantized_matmul(
      x,
      qw,
      implementation="pallas_tpu",
      interpret=interpret,
      mesh=mesh,
      spec=jax.sharding.PartitionSpec("data", "tensor"),
    )
  )(x, qw)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)
