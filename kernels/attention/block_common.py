"""What the Pallas kernels share: block sizes, the static description of a call, in-block masks.

Both kernels (``pallas_tpu.py``, ``pallas_gpu.py``) compute block-sparse attention: the mask's
block layout (``masks.block_layout``) lists the key blocks each query block visits, *full* blocks
run without any masking, *partial* blocks mask inside the block. Causal flash attention is the
special case ``mask = masks.causal()``, dense attention ``mask = masks.full()``.

Inside a partial block the visibility of each (query, key) pair is

    pattern(q, kv) & (q < length) & (kv < length) & (seg_q == seg_kv)

where ``pattern`` is evaluated from iotas for computable masks, or read from the stored block for
``from_dense`` masks; the length terms only exist when the sequence was padded to a block multiple.
Segment ids make every block partial (they are data, unknown on the host).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from flaxseed.kernels.attention import masks

DEFAULT_BLOCK = 128


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Query and key block lengths of a blockwise implementation (``None``: its default).

  Defaults: each Pallas module's ``default_block(dtype, head_dim)``, ``DEFAULT_BLOCK`` (128: the
  MXU tile of TPUs, a common Triton tile) except 64 for float32 heads wider than 64 on GPU;
  ``xla_chunked.default_block`` for the chunked XLA path. Blocks longer than the sequence shrink
  to it (rounded up to a power of two), so short inputs are not over-padded.
  """

  block_q: int | None = None
  block_kv: int | None = None

  def __post_init__(self):
    for name in ("block_q", "block_kv"):
      value = getattr(self, name)
      if value is not None and (
        isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % 8
      ):
        raise ValueError(f"block_sizes.{name} must be a positive multiple of 8, got {value!r}")

  def resolve(self, length: int, default: int) -> tuple[int, int]:
    """``(block_q, block_kv)`` for a sequence of ``length``."""
    cap = max(8, 1 << (length - 1).bit_length())
    return (min(self.block_q or default, cap), min(self.block_kv or default, cap))


@dataclasses.dataclass(frozen=True)
class Static:
  """Everything about a call that is not an array (hashable: a custom_vjp nondiff argument)."""

  pattern: masks.Mask
  length: int  # true sequence length (before padding)
  block_q: int
  block_kv: int
  sm_scale: float
  logit_soft_cap: float | None
  has_segments: bool
  interpret: bool | str  # False, True (TPU semantics for pallas_tpu) or "generic"

  @property
  def layout(self) -> masks.BlockLayout:
    return masks.block_layout(self.pattern, self.length, self.block_q, self.block_kv)

  @property
  def padded(self) -> bool:
    return self.layout.padded_length != self.length

  @property
  def stores_blocks(self) -> bool:
    """Partial blocks come from stored tables (non-computable masks) rather than iotas."""
    return not self.pattern.computable


def scores(q, k, static: Static):
  """``q k^T * scale`` (float32) with the soft cap; returns ``(s, tanh or None)``."""
  s = (
    jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    * static.sm_scale
  )
  if static.logit_soft_cap is None:
    return s, None
  t = jnp.tanh(s / static.logit_soft_cap)
  return static.logit_soft_cap * t, t


def visible(
  static: Static, q_start, kv_start, shape, *, code, stored_block=None, seg_q=None, seg_kv=None
):
  """Boolean ``[block_q, block_kv]`` visibility inside one block of layout code ``code``.

  With segment ids every block goes through here, full ones (code 0) too: for a stored mask
  ``stored_block`` is then some other block's table, so code 0 must mean "all visible".
  """
  vis = None
  if static.stores_blocks:
    vis = (stored_block != 0) | (code == 0)
  else:
    q_idx = q_start + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    kv_idx = kv_start + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    vis = static.pattern(q_idx, kv_idx)
    if static.padded:
      vis = vis & (kv_idx < static.length) & (q_idx < static.length)
  if static.has_segments:
    same = seg_q == seg_kv  # [bq, bk], or [B, bq, bk] when the caller keeps a batch axis
    vis = (vis[None] if same.ndim == vis.ndim + 1 else vis) & same
  return vis


def pad_length(x, axis: int, padded: int):
  """Zero-pads ``axis`` of ``x`` up to ``padded``."""
  extra = padded - x.shape[axis]
  if not extra:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths)


def flash_vjp(forward, backward):
  """The differentiable attention of a blockwise implementation, FlashAttention-style.

  ``forward(q, k, v, seg_q, seg_kv, static) -> (out, lse)`` and
  ``backward(q, k, v, seg_q, seg_kv, out, lse, d_out, static) -> (dq, dk, dv)``: only ``out`` and
  the log-sum-exp ``lse`` are kept for the backward pass, which recomputes the probabilities.
  """

  @functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
  def attention(q, k, v, seg_q, seg_kv, static):
    return forward(q, k, v, seg_q, seg_kv, static)[0]

  def attention_fwd(q, k, v, seg_q, seg_kv, static):
    out, lse = forward(q, k, v, seg_q, seg_kv, static)
    return out, (q, k, v, seg_q, seg_kv, out, lse)

  def attention_bwd(static, residuals, d_out):
    dq, dk, dv = backward(*residuals, d_out, static)
    return dq, dk, dv, None, None  # segment ids: integers, no gradient

  attention.defvjp(attention_fwd, attention_bwd)
  return attention
