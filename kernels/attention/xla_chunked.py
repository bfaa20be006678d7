"""Memory-efficient attention in pure XLA: query chunks that only visit the keys they can see.

The sequence is cut into query chunks of ``block_q`` rows. Each chunk attends to keys
``[0, end of chunk)`` when causal (the masked upper triangle is never computed, which halves the
work) or to all keys otherwise, through the reference function. Each chunk is wrapped in
``jax.checkpoint`` so the backward pass recomputes its scores instead of storing them: peak score
memory is ``O(block_q * L)`` in both passes, against ``O(L * L)`` for the reference.

The chunks form a static Python loop (``ceil(L / block_q)`` of them, the last one possibly shorter),
so every chunk has static shapes and XLA sees plain einsums; keep ``L / block_q`` in the tens.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from flaxseed.kernels.attention import reference


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Query chunk length of the chunked XLA path."""

  block_q: int = 128

  def __post_init__(self):
    if self.block_q <= 0:
      raise ValueError(f"block_sizes.block_q must be positive, got {self.block_q}")


def attention(q_BLHE, k_BLKE, v_BLKE, *, causal: bool = False, segment_ids=None,
              sm_scale: float | None = None, logit_soft_cap: float | None = None,
              block_sizes: BlockSizes | None = None):
  """Same contract as ``reference.attention`` for self-attention (``Lq == Lk``)."""
  block_q = (block_sizes or BlockSizes()).block_q
  length = q_BLHE.shape[1]
  segment_ids = reference.as_segment_ids(segment_ids)
  outputs = []
  for start in range(0, length, block_q):
    end = min(start + block_q, length)
    kv_end = end if causal else length
    chunk_segments = None
    if segment_ids is not None:
      chunk_segments = reference.SegmentIds(segment_ids.q[:, start:end],
                                            segment_ids.kv[:, :kv_end])
    chunk = jax.checkpoint(functools.partial(
        _chunk, causal=causal, q_offset=start, sm_scale=sm_scale, logit_soft_cap=logit_soft_cap))
    outputs.append(chunk(q_BLHE[:, start:end], k_BLKE[:, :kv_end], v_BLKE[:, :kv_end],
                         chunk_segments))
  return outputs[0] if len(outputs) == 1 else jnp.concatenate(outputs, axis=1)


def _chunk(q, k, v, segment_ids, **kwargs):
  return reference.attention(q, k, v, segment_ids=segment_ids, **kwargs)
