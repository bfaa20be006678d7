"""Layers shared by the zoo: dense projections, RMSNorm, embeddings, RoPE, MLP and attention.

Conventions: parameters are float32 and carry logical axis names (``models/sharding.py``); compute
happens in the module's ``dtype``. Shapes use the dimension letters of DESIGN.md (B batch, L length,
D width, H heads, K kv heads, E head dim, F MLP width, V vocab).
"""

from collections.abc import Sequence
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxseed import kernels
from flaxseed.kernels import masks
from flaxseed.kernels.attention import reference as attention_reference
from flaxseed.models import lora
from flaxseed.models import sharding as sh

Dtype = Any


def fan_in_init(in_axes: Sequence[int], out_axes: Sequence[int]):
  """Truncated-normal init with variance 1/fan_in, for weights with several input axes."""
  return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                          in_axis=tuple(in_axes), out_axis=tuple(out_axes))


class Dense(nn.Module):
  """``y = x . kernel``: the trailing ``num_in`` axes of ``x`` contract with the leading
  ``num_in`` axes of a float32 ``kernel`` of shape ``shape`` and logical axes ``axes``.

  The one projection layer of the zoo (quantization and LoRA act on its ``kernel``). Kernels keep
  their natural shape (``[D, H, E]`` for queries, ``[H, E, D]`` for the output projection).
  Leading axes of ``x`` are flattened first: ``[B, L, D] -> [B * L, D]`` makes the weight
  gradient one plain matmul, which XLA's CPU backend runs twice as fast as a contraction over two
  axes (a SwiGLU MLP's fwd+bwd at B=16, L=256, D=256, F=768 on 2 cores: 138 -> 63 ms);
  accelerators do not mind.
  """

  shape: tuple[int, ...]
  axes: tuple[str, ...]
  num_in: int = 1
  dtype: Dtype = jnp.float32
  quant: str | None = None  # "ternary": BitNet b1.58 training (see ternary_ste)

  @nn.compact
  def __call__(self, x):
    n = self.num_in
    init = fan_in_init(range(n), range(n, len(self.shape)))
    lead = x.shape[:x.ndim - n]
    x2 = x.reshape((-1,) + x.shape[x.ndim - n:]).astype(self.dtype)  # [M, in...]
    if self.quant == "ternary":
      x2 = int8_absmax_ste(x2)
    if self.has_variable("params", "kernel"):
      stored = self.get_variable("params", "kernel")
      if isinstance(stored, kernels.QuantizedWeight):  # models.quantize put it there
        return self._quantized(x2, stored, lead)
      if isinstance(stored, lora.LoraWeight):  # models.lora.apply put it there
        return self._lora(x2, stored, lead)
    kernel = self.param("kernel", nn.with_logical_partitioning(init, self.axes), self.shape,
                        jnp.float32)
    if self.quant == "ternary":
      kernel = ternary_ste(kernel)
    y = jax.lax.dot_general(x2, kernel.astype(self.dtype),
                            ((tuple(range(1, n + 1)), tuple(range(n))), ((), ())))
    return y.reshape(lead + y.shape[1:])

  def _quantized(self, x2, kernel, lead):
    return self._quantized_2d(x2.reshape(x2.shape[0], -1), kernel).reshape(
        lead + self.shape[self.num_in:])

  def _quantized_2d(self, x_MK, kernel):
    n = self.num_in
    k, out = math.prod(self.shape[:n]), math.prod(self.shape[n:])
    if kernel.shape != (k, out):
      raise ValueError(f"{self.name}: quantized kernel is {kernel.shape} but this layer "
                       f"multiplies by [{k}, {out}] (shape {self.shape}, num_in={n})")
    return kernels.quantized_matmul(x_MK, kernel, **_quantized_mesh(self.axes[n:]))

  def _lora(self, x2, weight, lead):
    """The base kernel (float or quantized) plus the adapter's low-rank path (``models.lora``)."""
    x_MK = x2.reshape(x2.shape[0], -1)
    base = weight.base
    if isinstance(base, kernels.QuantizedWeight):
      matmul = functools.partial(self._quantized_2d, kernel=base)
      kernel_2d = functools.partial(kernels.dequantize_weight, base)
    else:
      kernel_2d = lambda: base.reshape(x_MK.shape[1], -1)  # noqa: E731
      matmul = lambda x: x @ kernel_2d().astype(self.dtype)  # noqa: E731
    return weight.lora_matmul(x_MK, matmul, kernel_2d).reshape(lead + self.shape[self.num_in:])


def ternary_ste(w):
  """BitNet b1.58 weights: ``round(w / s)`` clipped to {-1, 0, 1} times ``s = mean |w|`` (over
  the whole matrix), with a straight-through gradient (the float weight gets the gradient of the
  quantized one). The same numbers as ``kernels.quantize_weight(w, "ternary")``, so a trained
  model exports to packed ternary weights exactly."""
  scale = jnp.maximum(jnp.mean(jnp.abs(w)), 1e-8)
  quantized = jnp.clip(jnp.round(w / scale), -1, 1) * scale
  return w + jax.lax.stop_gradient(quantized - w)


def int8_absmax_ste(x):
  """BitNet's 8-bit activations: each row of ``x [M, in...]`` scaled by its absmax to
  [-127, 127] and rounded, with a straight-through gradient."""
  axes = tuple(range(1, x.ndim))
  scale = jnp.maximum(jnp.max(jnp.abs(x), axis=axes, keepdims=True), 1e-5) / 127.0
  quantized = jnp.clip(jnp.round(x / scale), -127, 127) * scale
  return x + jax.lax.stop_gradient(quantized - x)


class RMSNorm(nn.Module):
  """``x / rms(x) * scale``, computed in float32."""

  eps: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (sh.NORM,)),
                       (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (x32 * scale.reshape((1,) * (x.ndim - 1) + (-1,))).astype(self.dtype)


class Embed(nn.Module):
  """Token embedding ``[V, D]``; ``attend`` gives logits with the same (tied) matrix."""

  vocab_size: int
  features: int
  dtype: Dtype = jnp.float32

  def setup(self):
    self.embedding = self.param(
        "embedding",
        nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), (sh.VOCAB, sh.EMBED)),
        (self.vocab_size, self.features), jnp.float32)

  def __call__(self, tokens_BL):
    return jnp.take(self.embedding, tokens_BL, axis=0).astype(self.dtype)

  def attend(self, x_BLD):
    x_ND = x_BLD.reshape(-1, x_BLD.shape[-1]).astype(self.dtype)  # flat: see Dense
    logits_NV = x_ND @ self.embedding.astype(self.dtype).T
    return logits_NV.reshape(x_BLD.shape[:-1] + (self.vocab_size,))


def apply_rope(x_BLHE, positions_BL, theta: float):
  """Rotary position embedding, "rotate half" layout (the layout of Hugging Face Llama)."""
  half = x_BLHE.shape[-1] // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions_BL.astype(jnp.float32)[:, :, None, None] * inv_freq[None, None, None, :]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  x1, x2 = jnp.split(x_BLHE.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BLHE.dtype)


class Mlp(nn.Module):
  """SwiGLU (``down(silu(gate x) * up x)``) or GELU (``down(gelu(up x))``) feed-forward."""

  features: int
  hidden: int
  activation: str = "swiglu"
  dtype: Dtype = jnp.float32
  quant: str | None = None

  @nn.compact
  def __call__(self, x_BLD):
    d, f = self.features, self.hidden
    dense = functools.partial(Dense, dtype=self.dtype, quant=self.quant)
    up_BLF = dense((d, f), (sh.EMBED, sh.MLP), name="up")(x_BLD)
    if self.activation == "swiglu":
      gate_BLF = dense((d, f), (sh.EMBED, sh.MLP), name="gate")(x_BLD)
      h_BLF = nn.silu(gate_BLF) * up_BLF
    else:
      h_BLF = nn.gelu(up_BLF)
    return dense((f, d), (sh.MLP, sh.EMBED), name="down")(h_BLF)


def _kernel_mesh(implementation: str | None, length: int, mask: masks.Mask | None) -> dict:
  """``mesh``/``spec`` for a Pallas kernel under the ambient mesh (``jax.set_mesh``), from the
  logical axis rules: Mosaic kernels cannot be partitioned by XLA, so the API runs them under
  ``shard_map`` with the activations' own sharding (batch and heads; never the sequence).
  ``implementation=None`` is resolved as the API resolves it (a Pallas kernel on GPU and TPU)."""
  if implementation is None:
    implementation = kernels.attention.api.default_implementation(length, mask == masks.causal())
  if not implementation.startswith("pallas"):
    return {}
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return {}
  spec = nn.logical_to_mesh_axes((sh.BATCH, sh.LENGTH, sh.HEADS, sh.HEAD_DIM))
  return {"mesh": mesh, "spec": spec}


def _quantized_mesh(out_axes) -> dict:
  """``mesh``/``spec`` for a Pallas quantized matmul under the ambient mesh: rows over the batch
  axes, output columns over the mesh axis of the first output axis (when the others are not
  sharded, so that flattened columns stay contiguous per device)."""
  if kernels.quant.api.default_implementation() == "xla":
    return {}
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return {}
  rows = nn.logical_to_mesh_axes((sh.BATCH,))[0]
  cols = nn.logical_to_mesh_axes(tuple(out_axes))
  col = cols[0] if all(c is None for c in cols[1:]) else None
  return {"mesh": mesh, "spec": jax.sharding.PartitionSpec(rows, col)}


class Attention(nn.Module):
  """Multi-head / grouped-query / multi-query self-attention with RoPE and a KV cache.

  Training and full forwards go through ``kernels.block_sparse_attention`` under ``mask`` (the
  implementation is a config choice). With ``decode=True`` the keys and values of the given tokens
  are written into a ``cache`` collection at ``cache/index`` and the queries attend to everything
  cached so far (under the same mask, at absolute positions); decode steps are a few queries
  against the cache (bandwidth-bound), so they use the reference kernel.
  """

  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10_000.0
  mask: masks.Mask | None = None  # kernels.masks pattern (masks.causal() for a causal LM)
  logit_soft_cap: float | None = None
  implementation: str | None = None
  interpret: bool = False
  decode: bool = False
  dtype: Dtype = jnp.float32
  quant: str | None = None

  @nn.compact
  def __call__(self, x_BLD, segment_ids_BL, positions_BL):
    d, h, k, e = x_BLD.shape[-1], self.num_heads, self.num_kv_heads, self.head_dim
    q = Dense((d, h, e), (sh.EMBED, sh.HEADS, sh.HEAD_DIM), dtype=self.dtype, quant=self.quant,
              name="q")(x_BLD)
    key = Dense((d, k, e), (sh.EMBED, sh.KV_HEADS, sh.HEAD_DIM), dtype=self.dtype,
                quant=self.quant, name="k")(x_BLD)
    value = Dense((d, k, e), (sh.EMBED, sh.KV_HEADS, sh.HEAD_DIM), dtype=self.dtype,
                  quant=self.quant, name="v")(x_BLD)
    if self.decode:
      out = self._attend_with_cache(q, key, value, segment_ids_BL, positions_BL)
    else:
      q = apply_rope(q, positions_BL, self.rope_theta)
      key = apply_rope(key, positions_BL, self.rope_theta)
      # Interpreted kernels use the plain Pallas interpreter: the TPU interpreter has side
      # effects, which nn.scan's loop-invariance check rejects (jax >= 0.11).
      out = kernels.block_sparse_attention(
          q, key, value, self.mask, segment_ids=segment_ids_BL,
          logit_soft_cap=self.logit_soft_cap, implementation=self.implementation,
          interpret="generic" if self.interpret else None,
          **_kernel_mesh(self.implementation, q.shape[1], self.mask))
    return Dense((h, e, d), (sh.HEADS, sh.HEAD_DIM, sh.EMBED), num_in=2, dtype=self.dtype,
                 quant=self.quant, name="o")(out)

  def _attend_with_cache(self, q, key, value, segment_ids_BL, positions_BL):
    """Writes this call's keys/values at ``index`` and attends to the whole cache."""
    batch, length = q.shape[:2]
    # The cache is created by ``init`` with the maximum length as the input length.
    initialized = self.has_variable("cache", "key")
    cached_key = self.variable("cache", "key", jnp.zeros, key.shape, key.dtype)
    cached_value = self.variable("cache", "value", jnp.zeros, value.shape, value.dtype)
    cached_segments = self.variable("cache", "segment_ids", jnp.zeros, key.shape[:2], jnp.int32)
    index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
    if positions_BL is None:
      positions_BL = jnp.broadcast_to(index.value + jnp.arange(length), (batch, length))
    q = apply_rope(q, positions_BL, self.rope_theta)
    key = apply_rope(key, positions_BL, self.rope_theta)
    if not initialized:
      return jnp.zeros_like(q)
    start = index.value
    if segment_ids_BL is None:
      segment_ids_BL = jnp.ones((batch, length), jnp.int32)
    cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, key, (0, start, 0, 0))
    cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, value, (0, start, 0, 0))
    cached_segments.value = jax.lax.dynamic_update_slice(
        cached_segments.value, segment_ids_BL.astype(jnp.int32), (0, start))
    index.value = start + length
    segments = attention_reference.SegmentIds(segment_ids_BL, cached_segments.value)
    return attention_reference.attention(q, cached_key.value, cached_value.value,
                                         mask=self.mask, segment_ids=segments, q_offset=start,
                                         logit_soft_cap=self.logit_soft_cap)
