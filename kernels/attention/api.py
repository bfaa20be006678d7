"""One entry point for self-attention, whatever computes it.

``flash_attention(q, k, v, ..., implementation=None)`` validates its arguments once, then hands them
to one implementation:

  ``"xla"``          the reference (``reference.py``): materializes all scores.
  ``"xla_chunked"``  memory-efficient pure XLA (``xla_chunked.py``): query chunks, causal skipping.

``implementation=None`` picks the best available for the backend and always falls back to XLA.
The Pallas kernels (``"pallas_gpu"``, ``"pallas_tpu"``) register here when they land, with the same
signature; callers (the transformer) never change.
"""

from typing import Callable

import jax

from flaxseed.kernels.attention import reference
from flaxseed.kernels.attention import xla_chunked

# name -> function(q, k, v, *, causal, segment_ids, sm_scale, logit_soft_cap, block_sizes,
# interpret). Implementations that do not use an argument ignore it.
_IMPLEMENTATIONS: dict[str, Callable] = {}


def register(name: str, fn: Callable) -> None:
  """Adds an implementation under ``name`` (used by kernel packages as they land)."""
  _IMPLEMENTATIONS[name] = fn


def implementations() -> tuple[str, ...]:
  return tuple(sorted(_IMPLEMENTATIONS))


def _xla(q, k, v, *, causal, segment_ids, sm_scale, logit_soft_cap, block_sizes, interpret):
  del block_sizes, interpret
  return reference.attention(q, k, v, causal=causal, segment_ids=segment_ids, sm_scale=sm_scale,
                             logit_soft_cap=logit_soft_cap)


def _xla_chunked(q, k, v, *, causal, segment_ids, sm_scale, logit_soft_cap, block_sizes,
                 interpret):
  del interpret
  return xla_chunked.attention(q, k, v, causal=causal, segment_ids=segment_ids,
                               sm_scale=sm_scale, logit_soft_cap=logit_soft_cap,
                               block_sizes=block_sizes)


register("xla", _xla)
register("xla_chunked", _xla_chunked)


def default_implementation(length: int, causal: bool) -> str:
  """The implementation ``implementation=None`` resolves to for this backend and shape.

  Measured on a 2-core CPU (experiments/benchmarks/attention.py, fwd+bwd, B=16, H=4, E=64): the
  chunked path takes 0.92x the reference's time at L=128, 0.78x at 256, 0.59x at 512 and 0.51x at
  1024, since it skips the causal upper triangle and has a leaner backward. Without a causal mask
  it only saves memory, so the reference is kept for sequences up to 1024.
  """
  if causal and length > xla_chunked.BlockSizes().resolve(length):
    return "xla_chunked"
  if length > 1024:  # score memory O(L^2) starts to matter
    return "xla_chunked"
  return "xla"


def _check(q, k, v, segment_ids):
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


def flash_attention(q_BLHE: jax.Array, k_BLKE: jax.Array, v_BLKE: jax.Array, *,
                    causal: bool = False, segment_ids=None, sm_scale: float | None = None,
                    logit_soft_cap: float | None = None, implementation: str | None = None,
                    block_sizes=None, interpret: bool | None = None) -> jax.Array:
  """Self-attention ``softmax(q k^T * sm_scale) v`` with causal and segment masking.

  Args:
    q_BLHE: ``[B, L, H, E]`` queries.
    k_BLKE, v_BLKE: ``[B, L, K, E]`` keys and values, ``H % K == 0``.
    causal: each query sees only keys at or before its own position.
    segment_ids: ``[B, L]`` ints (or ``SegmentIds``); tokens see only tokens of the same segment.
    sm_scale: score scale, default ``E ** -0.5``.
    logit_soft_cap: ``cap * tanh(score / cap)`` applied to the scores.
    implementation: ``None`` (best for the backend) or one of ``implementations()``.
    block_sizes: the implementation's frozen block-size dataclass (``None``: its defaults).
    interpret: run a Pallas implementation in interpret mode (CPU); ignored by XLA ones.

  Returns:
    ``[B, L, H, E]`` in the dtype of ``q``. Rows that see no key are zeros.
  """
  _check(q_BLHE, k_BLKE, v_BLKE, segment_ids)
  if implementation is None:
    implementation = default_implementation(q_BLHE.shape[1], causal)
  if implementation not in _IMPLEMENTATIONS:
    raise ValueError(f"unknown attention implementation {implementation!r}; "
                     f"available: {', '.join(implementations())}")
  return _IMPLEMENTATIONS[implementation](
      q_BLHE, k_BLKE, v_BLKE, causal=causal, segment_ids=segment_ids, sm_scale=sm_scale,
      logit_soft_cap=logit_soft_cap, block_sizes=block_sizes, interpret=interpret)
