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
import numpy as np

from flaxseed import kernels
from flaxseed.kernels import masks
from flaxseed.kernels.attention import reference as attention_reference
from flaxseed.models import kv_cache as kv_cache_lib
from flaxseed.models import lora
from flaxseed.models import sharding as sh

Dtype = Any


def fan_in_init(in_axes: Sequence[int], out_axes: Sequence[int]):
  """Truncated-normal init with variance 1/fan_in, for weights with several input axes."""
  return nn.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=tuple(in_axes), out_axis=tuple(out_axes)
  )


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
  use_bias: bool = False  # a float32 ``bias`` of the output shape, zero-initialized

  @nn.compact
  def __call__(self, x):
    n = self.num_in
    lead = x.shape[: x.ndim - n]
    x2 = x.reshape((-1,) + x.shape[x.ndim - n :]).astype(self.dtype)  # [M, in...]
    if self.quant == "ternary":
      x2 = int8_absmax_ste(x2)
    y = self._matmul(x2).reshape(lead + self.shape[n:])
    if self.use_bias:
      bias = self.param(
        "bias",
        nn.with_logical_partitioning(nn.initializers.zeros, self.axes[n:]),
        self.shape[n:],
        jnp.float32,
      )
      y = y + bias.reshape((1,) * len(lead) + bias.shape).astype(self.dtype)
    return y

  def _matmul(self, x2):
    """``x2 [M, in...] -> [M, out...]`` with the float, quantized or LoRA kernel."""
    n = self.num_in
    if self.has_variable("params", "kernel"):
      stored = self.get_variable("params", "kernel")
      if isinstance(stored, kernels.QuantizedWeight):  # models.quantize put it there
        return self._quantized_2d(x2.reshape(x2.shape[0], -1), stored)
      if isinstance(stored, kernels.Sparse24Weight):  # models.prune.pack put it there
        return self._sparse24_2d(x2.reshape(x2.shape[0], -1), stored)
      if isinstance(stored, lora.LoraWeight):  # models.lora.apply put it there
        return self._lora(x2, stored)
    init = fan_in_init(range(n), range(n, len(self.shape)))
    kernel = self.param(
      "kernel", nn.with_logical_partitioning(init, self.axes), self.shape, jnp.float32
    )
    if self.quant == "ternary":
      kernel = ternary_ste(kernel)
    return jax.lax.dot_general(
      x2, kernel.astype(self.dtype), ((tuple(range(1, n + 1)), tuple(range(n))), ((), ()))
    )

  def _quantized_2d(self, x_MK, kernel):
    n = self.num_in
    k, out = math.prod(self.shape[:n]), math.prod(self.shape[n:])
    if kernel.shape != (k, out):
      raise ValueError(
        f"{self.name}: quantized kernel is {kernel.shape} but this layer "
        f"multiplies by [{k}, {out}] (shape {self.shape}, num_in={n})"
      )
    return kernels.quantized_matmul(x_MK, kernel, **_quantized_mesh(self.axes[n:]))

  def _sparse24_2d(self, x_MK, kernel):
    n = self.num_in
    k, out = math.prod(self.shape[:n]), math.prod(self.shape[n:])
    if kernel.shape != (k, out):
      raise ValueError(
        f"{self.name}: packed 2:4 kernel is {kernel.shape} but this layer "
        f"multiplies by [{k}, {out}] (shape {self.shape}, num_in={n})"
      )
    return kernels.sparse24_matmul(x_MK, kernel)

  def _lora(self, x2, weight):
    """The base kernel (float or quantized) plus the adapter's low-rank path (``models.lora``)."""
    x_MK = x2.reshape(x2.shape[0], -1)
    base = weight.base
    if isinstance(base, kernels.QuantizedWeight):
      matmul = functools.partial(self._quantized_2d, kernel=base)
      kernel_2d = functools.partial(kernels.dequantize_weight, base)
    else:
      kernel_2d = lambda: base.reshape(x_MK.shape[1], -1)  # noqa: E731
      matmul = lambda x: x @ kernel_2d().astype(self.dtype)  # noqa: E731
    return weight.lora_matmul(x_MK, matmul, kernel_2d)


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
  """``x / rms(x) * (offset + scale)``, computed in float32. ``offset=1`` is Gemma's norm: the
  stored ``scale`` starts at 0 and the layer multiplies by ``1 + scale``."""

  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  offset: float = 0.0

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.constant(1.0 - self.offset)
    scale = self.param(
      "scale", nn.with_logical_partitioning(init, (sh.NORM,)), (x.shape[-1],), jnp.float32
    )
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    scale = scale.reshape((1,) * (x.ndim - 1) + (-1,))
    return (x32 * (self.offset + scale)).astype(self.dtype)


class LayerNorm(nn.Module):
  """``(x - mean) / std * scale + bias`` over the last axis, in float32 (GPT-2's norm)."""

  eps: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param(
      "scale",
      nn.with_logical_partitioning(nn.initializers.ones, (sh.NORM,)),
      (x.shape[-1],),
      jnp.float32,
    )
    bias = self.param(
      "bias",
      nn.with_logical_partitioning(nn.initializers.zeros, (sh.NORM,)),
      (x.shape[-1],),
      jnp.float32,
    )
    x32 = x.astype(jnp.float32)
    x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    row = (1,) * (x.ndim - 1) + (-1,)
    return (x32 * scale.reshape(row) + bias.reshape(row)).astype(self.dtype)


class Embed(nn.Module):
  """Token embedding ``[V, D]``; ``attend`` gives logits with the same (tied) matrix. Also the
  learned position table (``axes=(LENGTH, EMBED)``)."""

  vocab_size: int
  features: int
  dtype: Dtype = jnp.float32
  axes: tuple[str, str] = (sh.VOCAB, sh.EMBED)

  def setup(self):
    self.embedding = self.param(
      "embedding",
      nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), self.axes),
      (self.vocab_size, self.features),
      jnp.float32,
    )

  def __call__(self, tokens_BL):
    return jnp.take(self.embedding, tokens_BL, axis=0).astype(self.dtype)

  def attend(self, x_BLD):
    x_ND = x_BLD.reshape(-1, x_BLD.shape[-1]).astype(self.dtype)  # flat: see Dense
    logits_NV = x_ND @ self.embedding.astype(self.dtype).T
    return logits_NV.reshape(x_BLD.shape[:-1] + (self.vocab_size,))


ROPE_SCALINGS = {  # kind -> its fields and their defaults (Hugging Face's names)
  "linear": {"factor": None},
  "llama3": {
    "factor": None,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
  },
}


def finite_positive(x) -> bool:
  """``0 < x < inf``; False for NaN, which a check ``x <= 0`` would let through."""
  return math.isfinite(x) and x > 0


def parse_rope_scaling(spec: str | None) -> dict | None:
  """``"llama3:factor=8,high_freq_factor=4"`` -> ``{"rope_type": "llama3", "factor": 8.0, ...}``
  with the kind's defaults filled in; ``None`` -> ``None``. Raises a ``ValueError`` naming a bad
  kind, field or value."""
  if spec is None:
    return None
  kind, _, rest = spec.partition(":")
  if kind not in ROPE_SCALINGS:
    raise ValueError(f"rope_scaling={spec!r}: kind {kind!r} is not one of {tuple(ROPE_SCALINGS)}")
  fields = dict(ROPE_SCALINGS[kind])
  for item in filter(None, rest.split(",")):
    name, _, value = item.partition("=")
    if name not in fields:
      raise ValueError(
        f"rope_scaling={spec!r}: {kind} has no field {name!r} (it has {sorted(fields)})"
      )
    try:
      fields[name] = float(value)
    except ValueError:
      raise ValueError(f"rope_scaling={spec!r}: {name}={value!r} is not a number") from None
  for name, value in fields.items():
    if value is None or not finite_positive(value):
      raise ValueError(f"rope_scaling={spec!r}: {name} must be a positive number, not {value}")
  if kind == "llama3" and fields["high_freq_factor"] <= fields["low_freq_factor"]:
    raise ValueError(f"rope_scaling={spec!r}: high_freq_factor must exceed low_freq_factor")
  return {"rope_type": kind, **fields}


def canonical_rope_scaling(spec: str | None) -> str | None:
  """``spec`` with every field spelled out in one order, so equal scalings compare equal."""
  fields = parse_rope_scaling(spec)
  if fields is None:
    return None
  kind = fields.pop("rope_type")
  return kind + ":" + ",".join(f"{k}={v:g}" for k, v in fields.items())


def rope_frequencies(head_dim: int, theta: float, scaling: str | None = None) -> np.ndarray:
  """The ``head_dim // 2`` rotary frequencies ``theta^(-2i/E)``, rescaled for long context:
  ``linear`` divides them all by ``factor`` (position interpolation); ``llama3`` divides the
  low ones (wavelengths beyond ``original / low_freq_factor``) by ``factor``, keeps the high ones
  (wavelengths below ``original / high_freq_factor``) and interpolates smoothly in between."""
  half = head_dim // 2
  inv_freq = theta ** (-np.arange(half, dtype=np.float64) / half)
  s = parse_rope_scaling(scaling)
  if s is None:
    return inv_freq
  if s["rope_type"] == "linear":
    return inv_freq / s["factor"]
  factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
  original = s["original_max_position_embeddings"]
  wavelen = 2 * np.pi / inv_freq
  smooth = np.clip((original / wavelen - low) / (high - low), 0.0, 1.0)  # 0: low, 1: high freq
  return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def apply_rope(x_BLHE, positions_BL, theta: float, scaling: str | None = None):
  """Rotary position embedding, "rotate half" layout (the layout of Hugging Face Llama);
  ``scaling``: a ``parse_rope_scaling`` spec (long-context frequency rescaling)."""
  inv_freq = jnp.asarray(rope_frequencies(x_BLHE.shape[-1], theta, scaling), jnp.float32)
  angles = positions_BL.astype(jnp.float32)[:, :, None, None] * inv_freq[None, None, None, :]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  x1, x2 = jnp.split(x_BLHE.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BLHE.dtype)


class Mlp(nn.Module):
  """Gated (``down(act(gate x) * up x)``: SwiGLU with SiLU, GeGLU with tanh-GELU) or plain
  (``down(gelu(up x))``, tanh-GELU as GPT-2) feed-forward; ``use_bias`` on every projection."""

  features: int
  hidden: int
  activation: str = "swiglu"  # swiglu | geglu | gelu
  dtype: Dtype = jnp.float32
  quant: str | None = None
  use_bias: bool = False

  @nn.compact
  def __call__(self, x_BLD):
    d, f = self.features, self.hidden
    dense = functools.partial(Dense, dtype=self.dtype, quant=self.quant, use_bias=self.use_bias)
    up_BLF = dense((d, f), (sh.EMBED, sh.MLP), name="up")(x_BLD)
    if self.activation in ("swiglu", "geglu"):
      gate_BLF = dense((d, f), (sh.EMBED, sh.MLP), name="gate")(x_BLD)
      act = nn.silu if self.activation == "swiglu" else functools.partial(nn.gelu, approximate=True)
      h_BLF = act(gate_BLF) * up_BLF
    else:
      h_BLF = nn.gelu(up_BLF, approximate=True)
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
  rope_theta: float | None = 10_000.0  # None: no rotary embedding (learned positions)
  rope_scaling: str | None = None  # a parse_rope_scaling spec
  mask: masks.Mask | None = None  # kernels.masks pattern (masks.causal() for a causal LM)
  sm_scale: float | None = None  # score scale; None: head_dim ** -0.5
  logit_soft_cap: float | None = None
  implementation: str | None = None
  interpret: bool = False
  decode: bool = False
  dtype: Dtype = jnp.float32
  quant: str | None = None
  qkv_bias: bool = False
  out_bias: bool = False
  kv_cache: str | None = None  # a models/kv_cache.py policy, applied when decoding
  kv_cache_dtype: str = "float"  # "int8": keys and values cached as int8 with absmax scales

  @nn.compact
  def __call__(self, x_BLD, segment_ids_BL, positions_BL):
    d, h, k, e = x_BLD.shape[-1], self.num_heads, self.num_kv_heads, self.head_dim
    dense = functools.partial(Dense, dtype=self.dtype, quant=self.quant)
    q = dense((d, h, e), (sh.EMBED, sh.HEADS, sh.HEAD_DIM), use_bias=self.qkv_bias, name="q")(x_BLD)
    key = dense((d, k, e), (sh.EMBED, sh.KV_HEADS, sh.HEAD_DIM), use_bias=self.qkv_bias, name="k")(
      x_BLD
    )
    value = dense(
      (d, k, e), (sh.EMBED, sh.KV_HEADS, sh.HEAD_DIM), use_bias=self.qkv_bias, name="v"
    )(x_BLD)
    if self.decode:
      out = self._attend_with_cache(q, key, value, segment_ids_BL, positions_BL)
    else:
      q, key = self._rope(q, positions_BL), self._rope(key, positions_BL)
      # Interpreted kernels use the plain Pallas interpreter: the TPU interpreter has side
      # effects, which nn.scan's loop-invariance check rejects (jax >= 0.11).
      out = kernels.block_sparse_attention(
        q,
        key,
        value,
        self.mask,
        segment_ids=segment_ids_BL,
        sm_scale=self.sm_scale,
        logit_soft_cap=self.logit_soft_cap,
        implementation=self.implementation,
        interpret="generic" if self.interpret else None,
        **_kernel_mesh(self.implementation, q.shape[1], self.mask),
      )
    return dense(
      (h, e, d), (sh.HEADS, sh.HEAD_DIM, sh.EMBED), num_in=2, use_bias=self.out_bias, name="o"
    )(out)

  def _rope(self, x_BLHE, positions_BL):
    if self.rope_theta is None:
      return x_BLHE
    return apply_rope(x_BLHE, positions_BL, self.rope_theta, self.rope_scaling)

  def _attend_with_cache(self, q, key, value, segment_ids_BL, positions_BL):
    """Writes this call's keys/values at ``index`` and attends to the whole cache."""
    batch, length = q.shape[:2]
    # The cache is created by ``init`` with the maximum length as the input length.
    initialized = self.has_variable("cache", "key")
    int8 = self.kv_cache_dtype == "int8"
    store = jnp.int8 if int8 else key.dtype
    cached_key = self.variable("cache", "key", jnp.zeros, key.shape, store)
    cached_value = self.variable("cache", "value", jnp.zeros, value.shape, store)
    if int8:  # one float32 scale per token and KV head
      scales = {
        name: self.variable("cache", f"{name}_scale", jnp.zeros, key.shape[:3] + (1,), jnp.float32)
        for name in ("key", "value")
      }
    cached_segments = self.variable("cache", "segment_ids", jnp.zeros, key.shape[:2], jnp.int32)
    index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
    policy = kv_cache_lib.parse(self.kv_cache)
    if policy is not None and policy.kind == "h2o":  # attention received so far, and who stays
      shape = (batch, key.shape[2], key.shape[1])  # [B, K, S]
      h2o = {
        "h2o_score": self.variable("cache", "h2o_score", jnp.zeros, shape, jnp.float32),
        "h2o_kept": self.variable("cache", "h2o_kept", jnp.zeros, shape, bool),
      }
    if positions_BL is None:
      positions_BL = jnp.broadcast_to(index.value + jnp.arange(length), (batch, length))
    q, key = self._rope(q, positions_BL), self._rope(key, positions_BL)
    if not initialized:
      return jnp.zeros_like(q)
    start = index.value
    if segment_ids_BL is None:
      segment_ids_BL = jnp.ones((batch, length), jnp.int32)
    for name, new, cached in (("key", key, cached_key), ("value", value, cached_value)):
      if int8:
        new, scale = kv_cache_lib.quantize_int8(new)
        scales[name].value = jax.lax.dynamic_update_slice(
          scales[name].value, scale, (0, start, 0, 0)
        )
      cached.value = jax.lax.dynamic_update_slice(cached.value, new, (0, start, 0, 0))
    all_keys, all_values = cached_key.value, cached_value.value
    if int8:
      all_keys = (all_keys.astype(jnp.float32) * scales["key"].value).astype(q.dtype)
      all_values = (all_values.astype(jnp.float32) * scales["value"].value).astype(value.dtype)
    cached_segments.value = jax.lax.dynamic_update_slice(
      cached_segments.value, segment_ids_BL.astype(jnp.int32), (0, start)
    )
    index.value = start + length
    if policy is not None:
      out, state = kv_cache_lib.attend(
        policy,
        q,
        all_keys,
        all_values,
        cached_segments_BS=cached_segments.value,
        query_segments_BL=segment_ids_BL.astype(jnp.int32),
        start=start,
        positions_BL=positions_BL,
        pattern=self.mask,
        sm_scale=self.head_dim**-0.5 if self.sm_scale is None else self.sm_scale,
        logit_soft_cap=self.logit_soft_cap,
        rope=None if self.rope_theta is None else self._rope,
        state={name: v.value for name, v in h2o.items()} if policy.kind == "h2o" else {},
      )
      for name, array in state.items():
        h2o[name].value = array
      return out
    segments = attention_reference.SegmentIds(segment_ids_BL, cached_segments.value)
    return attention_reference.attention(
      q,
      all_keys,
      all_values,
      mask=self.mask,
      segment_ids=segments,
      q_offset=start,
      sm_scale=self.sm_scale,
      logit_soft_cap=self.logit_soft_cap,
    )
