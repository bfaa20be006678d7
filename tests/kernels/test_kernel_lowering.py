"""The Pallas kernels (attention, quantized matmul) lower for real accelerators from a CPU machine.

TPU: forward and backward compile ahead of time for a v5e:2x2 topology (libtpu, from the ``test``
extra) inside ``shard_map`` on a sharded mesh. GPU: forward and backward lower to Triton IR
(``lowering_platforms=("cuda",)``); PTX compilation itself needs a GPU.
"""

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from flaxseed import kernels
from flaxseed.kernels import masks

LENGTH = 1000  # ragged: padded to the block size inside

CASES = [
  (masks.causal(), False),
  (masks.sliding_window(256) | masks.global_tokens(4), True),
  (masks.random_blocks(LENGTH, 128, 0.3), True),
]


def _loss(implementation, mask, with_segments, **mesh):
  def loss(q, k, v, seg):
    out = kernels.block_sparse_attention(
      q,
      k,
      v,
      mask,
      segment_ids=seg if with_segments else None,
      logit_soft_cap=30.0,
      implementation=implementation,
      **mesh,
    )
    return jnp.sum(out.astype(jnp.float32))

  return jax.value_and_grad(loss, argnums=(0, 1, 2))


@pytest.fixture(scope="module")
def tpu_mesh():
  topologies = pytest.importorskip("jax.experimental.topologies")
  try:
    topology = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2")
  except Exception as e:  # pylint: disable=broad-except
    pytest.skip(f"no TPU compiler here (install the 'tpu' extra): {e}")
  return jax.sharding.Mesh(np.array(topology.devices).reshape(2, 2), ("data", "tensor"))


@pytest.mark.parametrize("mask,with_segments", CASES)
def test_tpu_kernels_compile_for_v5e_in_shard_map(tpu_mesh, mask, with_segments):
  spec = P("data", None, "tensor", None)
  array = lambda shape, s, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(  # noqa: E731
    shape, dtype, sharding=NamedSharding(tpu_mesh, s)
  )
  args = (
    array((4, LENGTH, 8, 128), spec),
    array((4, LENGTH, 2, 128), spec),
    array((4, LENGTH, 2, 128), spec),
    array((4, LENGTH), P("data", None), jnp.int32),
  )
  fn = _loss("pallas_tpu", mask, with_segments, mesh=tpu_mesh, spec=spec)
  compiled = jax.jit(fn).lower(*args).compile()
  text = compiled.as_text()
  for kernel in ("flaxseed_flash_fwd", "flaxseed_flash_dq", "flaxseed_flash_dkv"):
    assert kernel in text, kernel


@pytest.mark.parametrize("mask,with_segments", CASES)
@pytest.mark.parametrize("head_dim", [80, 128])
def test_gpu_kernels_lower_to_triton(mask, with_segments, head_dim):
  shapes = [(2, LENGTH, 8, head_dim), (2, LENGTH, 2, head_dim), (2, LENGTH, 2, head_dim)]
  args = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in shapes]
  args.append(jax.ShapeDtypeStruct((2, LENGTH), jnp.int32))
  try:
    lowered = (
      jax.jit(_loss("pallas_gpu", mask, with_segments))
      .trace(*args)
      .lower(lowering_platforms=("cuda",))
    )
  except RuntimeError as e:
    if "No supported GPU devices found" in str(e):  # newer jax needs an abstract GPU device
      pytest.skip(f"this jax cannot lower for CUDA without a GPU: {e}")
    raise
  text = lowered.as_text()
  assert text.count("xla.gpu.triton") == 3  # forward, dq, dkv


QUANT_FORMATS = [("int8", None), ("int4", 128), ("nf4", 64), ("ternary", None)]


def _quantized_weight(fmt, group, k=4096, n=4096, sharding=None):
  qw = jax.eval_shape(
    lambda w: kernels.quantize_weight(w, fmt, group), jax.ShapeDtypeStruct((k, n), jnp.float32)
  )
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), qw)


@pytest.mark.parametrize("fmt,group", QUANT_FORMATS)
@pytest.mark.parametrize("m", [1, 16, 256])
def test_tpu_quantized_matmul_compiles_for_v5e(tpu_mesh, fmt, group, m):
  device = jax.sharding.SingleDeviceSharding(tpu_mesh.devices.flat[0])
  qw = _quantized_weight(fmt, group, sharding=device)
  x = jax.ShapeDtypeStruct((m, 4096), jnp.bfloat16, sharding=device)
  fn = lambda x, qw: kernels.quantized_matmul(x, qw, implementation="pallas_tpu")  # noqa: E731
  assert f"flaxseed_{fmt}_matmul" in jax.jit(fn).lower(x, qw).compile().as_text()


@pytest.mark.parametrize("m", [1, 16, 256])
def test_tpu_w8a8_matmul_compiles_for_v5e(tpu_mesh, m):
  device = jax.sharding.SingleDeviceSharding(tpu_mesh.devices.flat[0])
  qw = _quantized_weight("int8", None, sharding=device)
  x = jax.ShapeDtypeStruct((m, 4096), jnp.bfloat16, sharding=device)
  fn = lambda x, qw: kernels.quantized_matmul(  # noqa: E731
    x, qw, implementation="pallas_tpu", activations="int8"
  )
  assert "flaxseed_w8a8_matmul" in jax.jit(fn).lower(x, qw).compile().as_text()


@pytest.mark.parametrize("fmt,group", QUANT_FORMATS)
def test_gpu_quantized_matmul_lowers_to_triton(fmt, group):
  qw = _quantized_weight(fmt, group)
  x = jax.ShapeDtypeStruct((16, 4096), jnp.bfloat16)
  fn = lambda x, qw: kernels.quantized_matmul(x, qw, implementation="pallas_gpu")  # noqa: E731
  try:
    lowered = jax.jit(fn).trace(x, qw).lower(lowering_platforms=("cuda",))
  except RuntimeError as e:
    if "No supported GPU devices found" in str(e):
      pytest.skip(f"this jax cannot lower for CUDA without a GPU: {e}")
    raise
  assert lowered.as_text().count("xla.gpu.triton") == 1


def test_quantized_transformer_compiles_for_a_sharded_v5e_mesh(tpu_mesh, monkeypatch):
  """An int4-quantized transformer on a 2x2 mesh (batch x tensor) compiles with the Pallas TPU
  matmul: Dense runs the kernel under shard_map (as on a TPU backend, where it is the default)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  from flaxseed.kernels.quant import api as quant_api  # pylint: disable=g-import-not-at-top
  from flaxseed.models import quantize  # pylint: disable=g-import-not-at-top
  from flaxseed.models import transformer  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(quant_api, "default_implementation", lambda: "pallas_tpu")
  mesh = jax.sharding.Mesh(
    tpu_mesh.devices, ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2
  )
  model = transformer.Transformer(
    transformer.TransformerConfig(d_model=256, num_layers=2, num_heads=4, mlp_dim=512)
  )
  params = jax.eval_shape(
    lambda: nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  )
  qparams = jax.eval_shape(
    lambda p: quantize.quantize_params(p, fmt="int4", group_size=128), params
  )
  replicated = NamedSharding(mesh, P())
  qparams = jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), qparams
  )
  tokens = jax.ShapeDtypeStruct((4, 128), jnp.int32, sharding=NamedSharding(mesh, P("data")))
  rules = (
    ("batch", "data"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
  )
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    compiled = jax.jit(lambda p, t: model.apply({"params": p}, t)).lower(qparams, tokens).compile()
  assert "flaxseed_int4_matmul" in compiled.as_text()


@pytest.mark.parametrize("m", [1, 16, 256])
def test_tpu_sparse24_matmul_compiles_for_v5e(tpu_mesh, m):
  device = jax.sharding.SingleDeviceSharding(tpu_mesh.devices.flat[0])
  sw = kernels.Sparse24Weight(
    jax.ShapeDtypeStruct((2, 1024, 4096), jnp.bfloat16, sharding=device),
    jax.ShapeDtypeStruct((512, 4096), jnp.uint8, sharding=device),
    (4096, 4096),
  )
  x = jax.ShapeDtypeStruct((m, 4096), jnp.bfloat16, sharding=device)
  fn = lambda x, sw: kernels.sparse24_matmul(x, sw, implementation="pallas_tpu")  # noqa: E731
  assert "flaxseed_sparse24_matmul" in jax.jit(fn).lower(x, sw).compile().as_text()
