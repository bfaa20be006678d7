"""One entry point for self-attention, whatever computes it.

``flash_attention(q, k, v, causal=...)`` and ``block_sparse_attention(q, k, v, mask)`` validate
their arguments once, then hand them to one implementation. Every implementation computes the
same function, masked attention under a ``masks.Mask`` (``flash_attention`` is the special case
``mask = masks.causal()`` or no mask):

  ``"xla"``          the reference (``reference.py``): materializes all scores.
  ``"xla_chunked"``  memory-efficient pure XLA (``xla_chunked.py``): the kernels' block walk in
                     lax loops; skips empty blocks; O(L) memory.
  ``"pallas_tpu"``   Mosaic kernels, forward and backward (``pallas_tpu.py``); block-sparse.
  ``"pallas_gpu"``   Triton kernels, forward and backward (``pallas_gpu.py``); block-sparse.
  ``"cudnn"``        ``jax.nn.dot_product_attention(implementation="cudnn")``, GPU only, for
                     comparison (causal or no mask, no segment ids, no soft cap).

``implementation=None`` picks the Pallas kernel of the backend (GPU, TPU) and on CPU the XLA path
that is fastest for the shape (see ``default_implementation``).

Sharding: Mosaic kernels cannot be partitioned by XLA. Give ``mesh`` and ``spec`` (the
``PartitionSpec`` of ``q`` as ``[B, L, H, E]``; keys and values use the same spec) and the call
runs under ``shard_map``: batch and heads may be sharded, the sequence may not.
"""

from typing import Callable

import jax
from jax.sharding import PartitionSpec as P

from flaxseed.kernels.attention import block_common
from flaxseed.kernels.attention import masks
from flaxseed.kernels.attention import reference
from flaxseed.kernels.attention import xla_chunked

# name -> function(q, k, v, *, mask, segment_ids, sm_scale, logit_soft_cap, block_sizes,
# interpret) with ``mask`` a ``masks.Mask`` or ``None`` (everything visible) and ``segment_ids``
# a ``SegmentIds`` or ``None``. Implementations that do not use an argument ignore it.
_IMPLEMENTATIONS: dict[str, Callable] = {}


def register(name: str, fn: Callable) -> None:
  """Adds an implementation under ``name``."""
  _IMPLEMENTATIONS[name] = fn


def implementations() -> tuple[str, ...]:
  return tuple(sorted(_IMPLEMENTATIONS))


def _xla(q, k, v, *, mask, segment_ids, sm_scale, logit_soft_cap, block_sizes, interpret):
  del block_sizes, interpret
  return reference.attention(
    q, k, v, mask=mask, segment_ids=segment_ids, sm_scale=sm_scale, logit_soft_cap=logit_soft_cap
  )


def _check_block_sizes(block_sizes):
  if block_sizes is not None and not isinstance(block_sizes, block_common.BlockSizes):
    raise ValueError(
      "block_sizes must be kernels.attention.BlockSizes(block_q, block_kv), "
      f"got {type(block_sizes).__name__}"
    )


def _xla_chunked(q, k, v, *, mask, segment_ids, sm_scale, logit_soft_cap, block_sizes, interpret):
  del interpret
  _check_block_sizes(block_sizes)
  return xla_chunked.attention(
    q,
    k,
    v,
    mask=mask,
    segment_ids=segment_ids,
    sm_scale=sm_scale,
    logit_soft_cap=logit_soft_cap,
    block_sizes=block_sizes,
  )


def _pallas(module_name: str):
  """A Pallas implementation: static description of the call, then the module's kernels."""

  def run(q, k, v, *, mask, segment_ids, sm_scale, logit_soft_cap, block_sizes, interpret):
    import importlib  # the kernel modules import Pallas backends; load them on first use

    module = importlib.import_module(f"flaxseed.kernels.attention.{module_name}")
    length, e = q.shape[1], q.shape[3]
    blocks = block_sizes or block_common.BlockSizes()
    _check_block_sizes(blocks)
    block_q, block_kv = blocks.resolve(length, module.default_block(q.dtype, e))
    static = block_common.Static(
      pattern=masks.full() if mask is None else mask,
      length=length,
      block_q=block_q,
      block_kv=block_kv,
      sm_scale=e**-0.5 if sm_scale is None else float(sm_scale),
      logit_soft_cap=None if logit_soft_cap is None else float(logit_soft_cap),
      has_segments=segment_ids is not None,
      interpret=interpret if interpret == "generic" else bool(interpret),
    )
    seg_q, seg_kv = (None, None) if segment_ids is None else segment_ids
    return module.attention(q, k, v, seg_q, seg_kv, static)

  return run


def _cudnn(q, k, v, *, mask, segment_ids, sm_scale, logit_soft_cap, block_sizes, interpret):
  del block_sizes, interpret
  if jax.default_backend() != "gpu":
    raise ValueError("implementation='cudnn' needs a GPU backend")
  if segment_ids is not None or logit_soft_cap is not None:
    raise ValueError("implementation='cudnn' supports neither segment_ids nor logit_soft_cap")
  if mask not in (None, masks.causal()):
    raise ValueError(f"implementation='cudnn' supports causal or no mask, got {mask}")
  return jax.nn.dot_product_attention(
    q, k, v, scale=sm_scale, is_causal=mask is not None, implementation="cudnn"
  )


register("xla", _xla)
register("xla_chunked", _xla_chunked)
register("pallas_tpu", _pallas("pallas_tpu"))
register("pallas_gpu", _pallas("pallas_gpu"))
register("cudnn", _cudnn)


def default_implementation(length: int, causal: bool) -> str:
  """The implementation ``implementation=None`` resolves to for this backend and shape.

  GPU and TPU: their Pallas kernel. CPU, measured on a 2-core machine
  (experiments/benchmarks/attention.py, causal fwd+bwd, B=16, H=4, E=64, attention_cpu.json):
  the chunked path takes 0.5-0.8x the reference's time from L = 128 on (it skips the causal upper
  triangle and has a leaner backward), and its memory is O(L) where the reference's is O(L^2).
  Without a causal mask it only saves memory, so the reference is kept up to 1024.
  """
  backend = jax.default_backend()
  if backend == "gpu":
    return "pallas_gpu"
  if backend == "tpu":
    return "pallas_tpu"
  if causal and length > 64:
    return "xla_chunked"
  if length > 1024:  # score memory O(L^2) starts to matter
    return "xla_chunked"
  return "xla"


def _check(q, k, v, segment_ids, mask):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be [B, L, heads, E]; got q{q.shape} k{k.shape} v{v.shape}")
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same shape; got k{k.shape} v{v.shape}")
  b, length, heads, e = q.shape
  if k.shape[0] != b or k.shape[1] != length or k.shape[3] != e:
    raise ValueError(f"k{k.shape} does not match q{q.shape} in batch, length or head dim")
  if heads % k.shape[2]:
    raise ValueError(f"query heads ({heads}) must be a multiple of kv heads ({k.shape[2]})")
  if segment_ids is not None:
    ids = reference.as_segment_ids(segment_ids)
    for name, arr in (("segment_ids.q", ids.q), ("segment_ids.kv", ids.kv)):
      if arr.shape != (b, length):
        raise ValueError(f"{name} must be [B, L] = {(b, length)}, got {arr.shape}")
  if mask is not None:
    if not isinstance(mask, masks.Mask):
      raise ValueError(f"mask must be a kernels.masks.Mask, got {type(mask).__name__}")
    mask.check_length(length)


def _sharded(fn, mesh, spec, has_segments):
  """``fn(q, k, v, seg_q, seg_kv)`` under ``shard_map``: batch and heads split, sequence whole."""
  spec = P(*spec) if not isinstance(spec, P) else spec
  spec = P(*(tuple(spec) + (None,) * (4 - len(spec))))
  if spec[1] is not None or spec[3] is not None:
    raise ValueError(
      f"attention spec {spec}: the sequence (axis 1) and head dim (axis 3) cannot "
      "be sharded for a kernel call"
    )
  if not has_segments:
    sharded = jax.shard_map(
      lambda q, k, v: fn(q, k, v, None, None),
      mesh=mesh,
      in_specs=(spec,) * 3,
      out_specs=spec,
      check_vma=False,
    )
    return lambda q, k, v, seg_q, seg_kv: sharded(q, k, v)
  seg_spec = P(spec[0], None)
  return jax.shard_map(
    fn, mesh=mesh, in_specs=(spec,) * 3 + (seg_spec,) * 2, out_specs=spec, check_vma=False
  )


def block_sparse_attention(
  q_BLHE: jax.Array,
  k_BLKE: jax.Array,
  v_BLKE: jax.Array,
  mask: masks.Mask | None,
  *,
  segment_ids=None,
  sm_scale: float | None = None,
  logit_soft_cap: float | None = None,
  implementation: str | None = None,
  block_sizes=None,
  interpret: bool | str | None = None,
  mesh=None,
  spec=None,
) -> jax.Array:
  """Self-attention ``softmax(q k^T * sm_scale) v`` where ``mask`` (a ``kernels.masks.Mask``,
  ``None`` for none) says which key each query sees, combined with ``segment_ids``.

  Args:
    q_BLHE: ``[B, L, H, E]`` queries.
    k_BLKE, v_BLKE: ``[B, L, K, E]`` keys and values, ``H % K == 0`` (MHA, GQA, MQA).
    mask: a ``masks`` pattern over positions; the Pallas kernels skip its empty blocks.
    segment_ids: ``[B, L]`` ints (or ``SegmentIds``); tokens see only tokens of the same segment.
    sm_scale: score scale, default ``E ** -0.5``.
    logit_soft_cap: ``cap * tanh(score / cap)`` applied to the scores.
    implementation: ``None`` (best for the backend) or one of ``implementations()``.
    block_sizes: the implementation's frozen block-size dataclass (``None``: its defaults).
    interpret: run a Pallas implementation in interpret mode (CPU); ignored by XLA ones. For
      ``pallas_tpu``, ``True`` uses the TPU interpreter (TPU memory semantics, race detection)
      and ``"generic"`` the plain Pallas interpreter (no side effects: usable inside
      ``nn.scan``).
    mesh, spec: run under ``shard_map`` over ``mesh``; ``spec`` is the ``PartitionSpec`` of
      ``q`` (``[B, L, H, E]``, only B and H may be sharded).

  Returns:
    ``[B, L, H, E]`` in the dtype of ``q``. Rows that see no key are zeros.
  """
  _check(q_BLHE, k_BLKE, v_BLKE, segment_ids, mask)
  if implementation is None:
    implementation = default_implementation(q_BLHE.shape[1], mask == masks.causal())
  if implementation not in _IMPLEMENTATIONS:
    raise ValueError(
      f"unknown attention implementation {implementation!r}; "
      f"available: {', '.join(implementations())}"
    )
  if (mesh is None) != (spec is None):
    raise ValueError("mesh and spec go together: give both or neither")
  segment_ids = reference.as_segment_ids(segment_ids)
  impl = _IMPLEMENTATIONS[implementation]

  def call(q, k, v, seg_q, seg_kv):
    segments = None if seg_q is None else reference.SegmentIds(seg_q, seg_kv)
    return impl(
      q,
      k,
      v,
      mask=mask,
      segment_ids=segments,
      sm_scale=sm_scale,
      logit_soft_cap=logit_soft_cap,
      block_sizes=block_sizes,
      interpret=interpret,
    )

  if mesh is not None:
    call = _sharded(call, mesh, spec, segment_ids is not None)
  seg_q, seg_kv = (None, None) if segment_ids is None else segment_ids
  return call(q_BLHE, k_BLKE, v_BLKE, seg_q, seg_kv)


def flash_attention(
  q_BLHE: jax.Array,
  k_BLKE: jax.Array,
  v_BLKE: jax.Array,
  *,
  causal: bool = False,
  segment_ids=None,
  sm_scale: float | None = None,
  logit_soft_cap: float | None = None,
  implementation: str | None = None,
  block_sizes=None,
  interpret: bool | str | None = None,
  mesh=None,
  spec=None,
) -> jax.Array:
  """Dense or causal self-attention: ``block_sparse_attention`` with ``masks.causal()`` when
  ``causal`` and no mask otherwise. Arguments as there."""
  return block_sparse_attention(
    q_BLHE,
    k_BLKE,
    v_BLKE,
    masks.causal() if causal else None,
    segment_ids=segment_ids,
    sm_scale=sm_scale,
    logit_soft_cap=logit_soft_cap,
    implementation=implementation,
    block_sizes=block_sizes,
    interpret=interpret,
    mesh=mesh,
    spec=spec,
  )
