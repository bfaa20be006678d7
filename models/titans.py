"""Titans: a neural long-term memory that learns at test time (Behrouz, Zhong, Mirrokni 2025).

The memory is a small MLP ``M`` (per head) whose weights are state. Reading token ``t`` it takes
one gradient step on the associative loss ``||M(k_t) - v_t||^2`` with momentum and forgetting:

    S_t = eta_t S_{t-1} - theta_t grad_t        (surprise, with momentum)
    M_t = (1 - alpha_t) M_{t-1} + S_t            (forgetting)
    y_t = M_t(q_t)                               (retrieval, no update)

with data-dependent gates ``eta, theta, alpha`` computed per token. Training is chunked: within a
chunk of ``memory_chunk`` (C) tokens every gradient is taken at the chunk-start weights
(mini-batch gradient descent, as TTT), so the chunk is a few matmuls (the "dual form", below) and
only chunk boundaries are sequential (``lax.scan``). C = 1 is the exact per-token recurrence.

Variants (``TitansConfig.variant``), each a stack of pre-norm residual blocks with an MLP:

* ``lmm``: the memory alone is the sequence mixer.
* ``mac`` (memory as context): the sequence is cut into segments of ``window`` tokens. Each
  segment attends (causally) over [persistent tokens | memory tokens | the segment], where the
  memory tokens are the memory read at the segment start with learned probe queries; then the
  memory learns from the attention output and its per-token read is added.
* ``mag`` (memory as gate): sliding-window attention and the memory read the same input; a learned
  per-channel gate mixes the two.
* ``mal`` (memory as layer): the memory block, then sliding-window attention.

Persistent memory: ``num_persistent`` learned tokens prefix every attention (MAC/MAG/MAL); the
memory's learned initial weights play that role for the memory itself.

    from flaxseed.models import titans
    model = titans.Titans(titans.TitansConfig.tiny(variant="mac"))
    params = model.init(rng, tokens)["params"]
    logits = model.apply({"params": params}, tokens)              # [B, L, V] float32

Decisions (see the README's Titans section):

* Gates are per token, never averaged over a chunk: a chunk mean would leak later tokens of the
  chunk into earlier tokens' reads. The paper's chunk-constant gates are a special case.
* Reads use the per-token weights ``M_t`` (after the update with token ``t``), computed without
  materializing them: every weight of layer ``l`` at token ``t`` is
  ``A_t W + B_t S - sum_{s<=t} c_ts a_s^T d_s`` (``a_s`` the layer's input for key ``s``,
  ``d_s`` the loss gradient at its output), so ``h W_t = A_t hW + B_t hS - sum_s c_ts (h.a_s) d_s``.
  ``A, B, c`` follow from the gates in closed form (cumulative products, as stable segment sums).
* Each row is one stream: the memory carries across packed documents (like an RNN over the
  stream) and attention ignores ``segment_ids``; positions restart per segment (MAC) or run over
  the row.
* Each token's gradient of each memory layer is clipped to norm ``memory_grad_clip`` (as
  lucidrains' soft clamp; a scalar per token and layer, folded into ``theta``, so the dual form
  stays exact). Without it the paper's loss diverges: a deep memory's curvature grows with its
  weights, and runs of repeated tokens (indentation) drive them up.
* The memory recurrence runs in float32 whatever the compute dtype.
* Decoding keeps the memory state of the last chunk boundary plus the current chunk's keys, values
  and gates in the cache; each new token recomputes its chunk's reads, so generation is exactly the
  chunked forward (tested), at O(C) extra work per token.
"""

import dataclasses
import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxseed import kernels
from flaxseed.kernels import masks
from flaxseed.kernels.attention import reference as attention_reference
from flaxseed.models import layers
from flaxseed.models import sharding as sh

VARIANTS = ("lmm", "mac", "mag", "mal")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TitansConfig:
  """Architecture of ``Titans``. Presets are classmethods (``TitansConfig.tiny(variant="mag")``)."""

  variant: str = "mac"  # lmm | mac | mag | mal
  vocab_size: int = 256
  d_model: int = 128
  num_layers: int = 4
  num_heads: int = 4  # attention heads
  head_dim: int | None = None  # None: d_model // num_heads
  mlp_dim: int = 384
  window: int = 64  # MAG/MAL: sliding-window size; MAC: segment length
  num_persistent: int = 4  # learned tokens prefixing every attention
  num_memory_tokens: int = 4  # MAC: memory reads prefixing each segment
  memory_heads: int | None = None  # None: num_heads
  memory_head_dim: int | None = None  # None: d_model // memory_heads
  memory_depth: int = 2  # layers of the memory MLP (1: a linear memory)
  memory_expansion: int = 2  # hidden width of the memory MLP, in units of memory_head_dim
  memory_chunk: int = 16  # C: tokens per parallel update
  memory_max_lr: float = 0.1  # theta_t = memory_max_lr * sigmoid(.)
  memory_grad_clip: float | None = 1.0  # per-token, per-layer gradient norm bound (None: off)
  memory_conv: int = 4  # depthwise causal conv width on q, k, v (1: none)
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-6
  tie_embeddings: bool = True
  dtype: str = "float32"
  attention_impl: str | None = None  # kernels.block_sparse_attention implementation

  def __post_init__(self):
    if self.variant not in VARIANTS:
      raise ValueError(f"variant={self.variant!r} is not one of {VARIANTS}")
    for name in (
      "vocab_size",
      "d_model",
      "num_layers",
      "num_heads",
      "mlp_dim",
      "window",
      "memory_depth",
      "memory_expansion",
      "memory_chunk",
      "memory_conv",
    ):
      if getattr(self, name) <= 0:
        raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
    for name in ("num_persistent", "num_memory_tokens"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
    for name in ("head_dim", "memory_heads", "memory_head_dim"):
      if getattr(self, name) is not None and getattr(self, name) <= 0:
        raise ValueError(f"{name} must be positive or None, got {getattr(self, name)}")
    if self.head_dim is None and self.d_model % self.num_heads:
      raise ValueError(
        f"num_heads={self.num_heads} must divide d_model={self.d_model} (or set head_dim)"
      )
    if self.memory_head_dim is None and self.d_model % self.mem_heads:
      raise ValueError(
        f"memory_heads={self.mem_heads} must divide d_model={self.d_model} (or set memory_head_dim)"
      )
    if self.head_size % 2:
      raise ValueError(f"the attention head dim ({self.head_size}) must be even for RoPE")
    if not layers.finite_positive(self.memory_max_lr):  # NaN fails it, unlike `<= 0`
      raise ValueError(f"memory_max_lr must be positive and finite, got {self.memory_max_lr}")
    if self.memory_grad_clip is not None and not layers.finite_positive(self.memory_grad_clip):
      raise ValueError(
        f"memory_grad_clip must be positive and finite, or None, got {self.memory_grad_clip}"
      )
    if self.variant == "mac" and self.window % self.memory_chunk:
      raise ValueError(
        f"variant 'mac': memory_chunk={self.memory_chunk} must divide "
        f"window={self.window} (the segment length)"
      )
    if self.dtype not in ("float32", "bfloat16", "float16"):
      raise ValueError(f"dtype={self.dtype!r} is not one of float32, bfloat16, float16")

  @property
  def head_size(self) -> int:
    return self.d_model // self.num_heads if self.head_dim is None else self.head_dim

  @property
  def mem_heads(self) -> int:
    return self.num_heads if self.memory_heads is None else self.memory_heads

  @property
  def mem_head_size(self) -> int:
    return self.d_model // self.mem_heads if self.memory_head_dim is None else self.memory_head_dim

  @property
  def memory_widths(self) -> tuple[int, ...]:
    """Widths of the memory MLP's activations: ``(E, hidden, ..., E)``."""
    e = self.mem_head_size
    return (e,) + (e * self.memory_expansion,) * (self.memory_depth - 1) + (e,)

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def attention_mask(self) -> masks.Mask:
    """The attention mask in the frame [persistent (| memory tokens) | tokens]."""
    if self.variant == "mac":
      prefix = self.num_persistent + self.num_memory_tokens
      return masks.causal() | masks.global_tokens(prefix) if prefix else masks.causal()
    local = masks.sliding_window(self.window)
    if self.num_persistent:
      local = local | masks.global_tokens(self.num_persistent)
    return local & masks.causal()

  def flops_per_token(self, seq_len: int) -> float:
    """Approximate training FLOPs per token (3 x forward), for MFU.

    Projections: 2 per weight. Attention: ``4 H E`` per visible key. Memory per layer and token:
    gradients at the chunk-start weights (forward + backward, ~3 x 2 |M|), the dual-form read
    (``2 C`` per activation of every layer: scores and their product with the gradients), and the
    chunk-end update (2 |M|).
    """
    del seq_len
    d, h, e, f = self.d_model, self.num_heads, self.head_size, self.mlp_dim
    mh, me = self.mem_heads, self.mem_head_size
    widths = self.memory_widths
    mem_weights = sum(a * b for a, b in zip(widths[:-1], widths[1:]))
    memory = 2 * (3 * d * mh * me + 3 * d * mh + 2 * d * mh * me)  # q,k,v, gates, gate + out
    memory += mh * (8 * mem_weights + 2 * self.memory_chunk * 2 * sum(widths))
    attention = 0
    if self.variant != "lmm":
      keys = (
        self.num_persistent
        + (self.window + 1) / 2
        + (self.num_memory_tokens if self.variant == "mac" else 0)
      )
      attention = 2 * 4 * d * h * e + 4 * h * e * keys
    mlp = 2 * 3 * d * f
    return 3 * (self.num_layers * (memory + attention + mlp) + 2 * d * self.vocab_size)

  # Presets: the byte vocabulary of the default corpus.
  @classmethod
  def tiny(cls, **kw):
    """~1M params: CPU in minutes."""
    return cls(
      **{
        **dict(d_model=128, num_layers=4, num_heads=4, mlp_dim=384, window=64, memory_chunk=16),
        **kw,
      }
    )

  @classmethod
  def small(cls, **kw):
    """~6M params."""
    return cls(
      **{
        **dict(d_model=256, num_layers=6, num_heads=8, mlp_dim=768, window=128, memory_chunk=32),
        **kw,
      }
    )

  @classmethod
  def base(cls, **kw):
    """~90M params (non-embedding), GPT-2 small width and depth."""
    return cls(
      **{
        **dict(
          d_model=768,
          num_layers=12,
          num_heads=12,
          mlp_dim=2048,
          window=512,
          memory_chunk=64,
          memory_heads=12,
        ),
        **kw,
      }
    )


PRESETS = {
  f"titans-{variant}-{size}": functools.partial(getattr(TitansConfig, size), variant=variant)
  for variant in VARIANTS
  for size in ("tiny", "small", "base")
}


# --------------------------------------------------------------------------- the memory, pure


class MemoryState(NamedTuple):
  """Per-row memory: MLP weights and their momentum (``[B, H, in, out]`` per layer) and the
  last ``memory_conv - 1`` pre-conv projections of q, k, v (``[B, conv - 1, 3, H, E]``)."""

  weights: tuple[jax.Array, ...]
  momentum: tuple[jax.Array, ...]
  conv: jax.Array


class Chunk(NamedTuple):
  """One chunk's memory inputs: keys, values, queries ``[B, H, C, E]``; log gates and step sizes
  ``[B, H, C]`` (``log eta``, ``log (1 - alpha)``, ``theta``)."""

  k: jax.Array
  v: jax.Array
  q: jax.Array
  log_eta: jax.Array
  log_keep: jax.Array
  theta: jax.Array


def _mm(x, w):
  return jnp.einsum("bhti,bhio->bhto", x, w, precision=jax.lax.Precision.HIGHEST)


def memory_mlp(weights, x):
  """The memory ``M``: ``x [B, H, T, in]`` through SiLU layers (no activation on the last)."""
  for i, w in enumerate(weights):
    x = _mm(x, w)
    if i < len(weights) - 1:
      x = jax.nn.silu(x)
  return x


def associative_grads(weights, k, v):
  """Per-token gradients of ``||M(k_t) - v_t||^2`` at ``weights``, in factored form.

  The gradient of layer ``l`` for token ``t`` is the outer product ``a_t^T d_t`` of the layer's
  input ``a_t`` and the loss gradient ``d_t`` at its output; returns ``(inputs, deltas)`` lists of
  ``[B, H, T, width]``. (The deltas come from one ``jax.grad`` with respect to zero offsets added
  to each layer's output: the loss is a sum over tokens, so each token's offset gets its own.)
  """

  def loss(offsets):
    x, inputs = k, []
    for i, (w, offset) in enumerate(zip(weights, offsets)):
      inputs.append(x)
      x = _mm(x, w) + offset
      if i < len(weights) - 1:
        x = jax.nn.silu(x)
    return jnp.sum(jnp.square(x - v)), inputs

  offsets = [jnp.zeros(k.shape[:3] + (w.shape[-1],), jnp.float32) for w in weights]
  deltas, inputs = jax.grad(loss, has_aux=True)(offsets)
  return inputs, deltas


def _segment_sums(x):
  """``out[..., t, s] = sum_{s < r <= t} x[..., r]`` for ``s <= t``, ``-inf`` above the diagonal
  (each sum is accumulated directly, not as a difference of cumulative sums, which would cancel)."""
  c = x.shape[-1]
  lead = (1,) * (x.ndim - 1)
  r, s = jnp.arange(c)[:, None], jnp.arange(c)[None, :]
  terms = jnp.where((r > s).reshape(lead + (c, c)), x[..., :, None], 0.0)
  sums = jnp.cumsum(terms, axis=-2)
  return jnp.where((r >= s).reshape(lead + (c, c)), sums, -jnp.inf)


def chunk_update(weights, momentum, chunk: Chunk, grad_clip: float | None = None):
  """One chunk of the memory recurrence, every gradient at the chunk-start ``weights``.

  Returns ``(y [B, H, C, E], weights, momentum)``: the per-token reads ``M_t(q_t)`` and the state
  after the chunk. With ``P`` products of gates and ``D[t, s] = prod_{s < r <= t}`` (one per gate):
  ``S_t = Peta_t S - sum_s Deta[t, s] theta_s g_s`` and ``M_t = Pkeep_t M + B_t S - sum_s c_ts g_s``
  with ``B = Dkeep @ Peta`` and ``c = (Dkeep @ Deta) * theta``.

  ``grad_clip``: each token's gradient of each layer is scaled to Frobenius norm at most this
  (``||a^T d|| = ||a|| ||d||``, a per-token scalar folded into ``theta``). Without it a deep
  memory's inner loop can diverge: its curvature grows with its weights, and a run of repeated
  tokens (indentation) drives them up.
  """
  inputs, deltas = associative_grads(weights, chunk.k, chunk.v)
  steps = [chunk.theta] * len(weights)  # per layer: theta, times the clip factor
  if grad_clip is not None:
    norms = [
      jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(d, axis=-1) for a, d in zip(inputs, deltas)
    ]
    # The clip factor is a constant to the outer gradient: differentiating the norm would give
    # 0 * (0 / 0) = NaN wherever a vector vanishes.
    factors = [jnp.minimum(1.0, grad_clip / jnp.maximum(n, 1e-12)) for n in norms]
    steps = [chunk.theta * jax.lax.stop_gradient(f) for f in factors]
  decay_eta = jnp.exp(_segment_sums(chunk.log_eta))  # [B, H, C, C]
  decay_keep = jnp.exp(_segment_sums(chunk.log_keep))
  prod_eta = jnp.exp(jnp.cumsum(chunk.log_eta, axis=-1))  # [B, H, C]
  prod_keep = jnp.exp(jnp.cumsum(chunk.log_keep, axis=-1))
  hi = jax.lax.Precision.HIGHEST
  decay = jnp.einsum("bhtr,bhrs->bhts", decay_keep, decay_eta, precision=hi)
  from_momentum = jnp.einsum("bhtr,bhr->bht", decay_keep, prod_eta, precision=hi)

  # Reads through the per-token weights, layer by layer (the dual form).
  x = chunk.q
  for i, (w, m, a, d, step) in enumerate(zip(weights, momentum, inputs, deltas, steps)):
    scores = jnp.einsum("bhti,bhsi->bhts", x, a, precision=hi) * decay * step[:, :, None, :]
    x = (
      prod_keep[..., None] * _mm(x, w)
      + from_momentum[..., None] * _mm(x, m)
      - jnp.einsum("bhts,bhso->bhto", scores, d, precision=hi)
    )
    if i < len(weights) - 1:
      x = jax.nn.silu(x)

  # The state after the chunk: the last row of the same coefficients.
  new_weights, new_momentum = [], []
  for w, m, a, d, step in zip(weights, momentum, inputs, deltas, steps):
    new_weights.append(
      prod_keep[:, :, -1, None, None] * w
      + from_momentum[:, :, -1, None, None] * m
      - jnp.einsum("bhs,bhsi,bhso->bhio", decay[:, :, -1] * step, a, d, precision=hi)
    )
    new_momentum.append(
      prod_eta[:, :, -1, None, None] * m
      - jnp.einsum("bhs,bhsi,bhso->bhio", decay_eta[:, :, -1] * step, a, d, precision=hi)
    )
  return x, tuple(new_weights), tuple(new_momentum)


def scan_chunks(weights, momentum, inputs: Chunk, chunk_size: int, grad_clip: float | None = None):
  """The recurrence over ``T`` tokens (``T % chunk_size == 0``): chunks by ``lax.scan``.

  Returns ``(y [B, H, T, E], weights, momentum)``."""
  b, h, t = inputs.k.shape[:3]
  if t % chunk_size:
    raise ValueError(f"{t} tokens are not a multiple of the memory chunk {chunk_size}")
  n = t // chunk_size

  def split(x):  # [B, H, T, ...] -> [N, B, H, C, ...]
    return jnp.moveaxis(x.reshape((b, h, n, chunk_size) + x.shape[3:]), 2, 0)

  def body(carry, chunk):
    y, w, m = chunk_update(*carry, chunk, grad_clip)
    return (w, m), y

  (weights, momentum), ys = jax.lax.scan(
    body, (weights, momentum), Chunk(*(split(x) for x in inputs))
  )
  return jnp.moveaxis(ys, 0, 2).reshape((b, h, t) + ys.shape[4:]), weights, momentum


# --------------------------------------------------------------------------- Linen modules


def _l2_normalize(x, eps=1e-6):
  x32 = x.astype(jnp.float32)
  return x32 * jax.lax.rsqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True) + eps)


class NeuralMemory(nn.Module):
  """The long-term memory as a layer: ``x [B, T, D] -> [B, T, D]`` (with the state threaded).

  q, k, v: linear projections per memory head, a depthwise causal conv, SiLU, L2-normalized q and
  k. Gates from ``x``: ``eta = sigmoid(.)``, ``alpha = sigmoid(.)``, ``theta = max_lr sigmoid(.)``.
  Output: ``out(RMSNorm(y) * sigmoid(gate(x)))``.
  """

  config: TitansConfig

  def setup(self):
    cfg = self.config
    d, h, e = cfg.d_model, cfg.mem_heads, cfg.mem_head_size
    dense = functools.partial(layers.Dense, dtype=cfg.compute_dtype)
    self.q = dense((d, h, e), (sh.EMBED, sh.HEADS, sh.HEAD_DIM))
    self.k = dense((d, h, e), (sh.EMBED, sh.HEADS, sh.HEAD_DIM))
    self.v = dense((d, h, e), (sh.EMBED, sh.HEADS, sh.HEAD_DIM))
    self.gates = dense((d, 3, h), (sh.EMBED, None, sh.HEADS))
    # eta ~ 0.9 (momentum), alpha ~ 0.01 (forgetting), theta ~ max_lr / 2 at initialization.
    self.gate_bias = self.param(
      "gate_bias",
      nn.with_logical_partitioning(
        lambda *_: jnp.array([[2.2], [-4.6], [0.0]]) * jnp.ones((3, h)), (None, sh.HEADS)
      ),
      (3, h),
    )

    def identity_conv(key, shape, dtype=jnp.float32):  # the current token's tap is 1
      del key
      return jnp.zeros(shape, dtype).at[-1].set(1.0)

    self.conv = self.param(
      "conv",
      nn.with_logical_partitioning(identity_conv, (None, None, sh.HEADS, sh.HEAD_DIM)),
      (cfg.memory_conv, 3, h, e),
    )
    widths = cfg.memory_widths
    self.init_weights = [
      self.param(
        f"init_{i}",
        nn.with_logical_partitioning(layers.fan_in_init([1], [2]), (sh.HEADS, None, None)),
        (h, a, b),
        jnp.float32,
      )
      for i, (a, b) in enumerate(zip(widths[:-1], widths[1:]))
    ]
    self.out_norm = layers.RMSNorm(cfg.norm_eps, jnp.float32)
    self.out_gate = dense((d, h, e), (sh.EMBED, sh.HEADS, sh.HEAD_DIM))
    self.out = dense((h, e, d), (sh.HEADS, sh.HEAD_DIM, sh.EMBED), num_in=2)
    if cfg.variant == "mac" and cfg.num_memory_tokens:
      self.probes = self.param(
        "probes",
        nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, sh.HEADS, sh.HEAD_DIM)),
        (cfg.num_memory_tokens, h, e),
      )
      self.probe_out = dense((h, e, d), (sh.HEADS, sh.HEAD_DIM, sh.EMBED), num_in=2)

  def initial_state(self, batch: int) -> MemoryState:
    """The learned initial weights, zero momentum, an empty conv window."""
    cfg = self.config
    weights = tuple(jnp.broadcast_to(w, (batch,) + w.shape) for w in self.init_weights)
    return MemoryState(
      weights,
      tuple(jnp.zeros_like(w) for w in weights),
      jnp.zeros((batch, cfg.memory_conv - 1, 3, cfg.mem_heads, cfg.mem_head_size), jnp.float32),
    )

  def _inputs(self, x_BTD, conv_state):
    """Memory inputs of ``x`` (a ``Chunk`` of any length) and the conv window after ``x``."""
    cfg = self.config
    qkv = jnp.stack([self.q(x_BTD), self.k(x_BTD), self.v(x_BTD)], axis=2)  # [B, T, 3, H, E]
    window = jnp.concatenate([conv_state, qkv.astype(jnp.float32)], axis=1)
    t = x_BTD.shape[1]
    qkv = sum(self.conv[j][None, None] * window[:, j : j + t] for j in range(cfg.memory_conv))
    qkv = jax.nn.silu(qkv).transpose(2, 0, 3, 1, 4)  # [3, B, H, T, E]
    q, k, v = _l2_normalize(qkv[0]), _l2_normalize(qkv[1]), qkv[2]
    gates = self.gates(x_BTD).astype(jnp.float32) + self.gate_bias[None, None]  # [B, T, 3, H]
    gates = gates.transpose(2, 0, 3, 1)
    chunk = Chunk(
      k=k,
      v=v,
      q=q,
      log_eta=jax.nn.log_sigmoid(gates[0]),
      log_keep=jax.nn.log_sigmoid(-gates[1]),
      theta=cfg.memory_max_lr * jax.nn.sigmoid(gates[2]),
    )
    return chunk, window[:, t:]

  def _output(self, x_BTD, y_BHTE):
    y = self.out_norm(y_BHTE.transpose(0, 2, 1, 3))  # [B, T, H, E]
    gate = jax.nn.sigmoid(self.out_gate(x_BTD).astype(jnp.float32))
    return self.out((y * gate).astype(self.config.compute_dtype))

  def __call__(self, x_BTD, state: MemoryState | None = None):
    """Reads and learns ``x``; returns ``(out [B, T, D], state after x)``.

    ``T`` is padded up to a multiple of ``memory_chunk`` at the end (outputs are causal, so the
    padding changes none of them); the returned state is exact only when no padding was needed.
    """
    cfg = self.config
    if state is None:
      state = self.initial_state(x_BTD.shape[0])
    chunk, conv = self._inputs(x_BTD, state.conv)
    t = x_BTD.shape[1]
    pad = -t % cfg.memory_chunk
    if pad:
      chunk = Chunk(
        *(jnp.pad(a, [(0, 0)] * 2 + [(0, pad)] + [(0, 0)] * (a.ndim - 3)) for a in chunk)
      )
    y, weights, momentum = scan_chunks(
      state.weights, state.momentum, chunk, cfg.memory_chunk, cfg.memory_grad_clip
    )
    return self._output(x_BTD, y[:, :, :t]), MemoryState(weights, momentum, conv)

  def memory_tokens(self, state: MemoryState):
    """MAC: the memory read with the learned probes, as ``[B, num_memory_tokens, D]`` tokens."""
    probes = _l2_normalize(self.probes).transpose(1, 0, 2)  # [H, N, E]
    batch = state.weights[0].shape[0]
    y = memory_mlp(state.weights, jnp.broadcast_to(probes, (batch,) + probes.shape))
    return self.probe_out(y.transpose(0, 2, 1, 3).astype(self.config.compute_dtype))

  # Decoding: the cache holds the state of the last chunk boundary and the current chunk so far.

  def empty_cache(self, batch: int):
    cfg = self.config
    state = self.initial_state(batch)
    h, c, e = cfg.mem_heads, cfg.memory_chunk, cfg.mem_head_size
    rows = jnp.zeros((batch, h, c, e), jnp.float32)
    gates = jnp.zeros((batch, h, c), jnp.float32)
    return {
      "state": jax.tree.map(jnp.zeros_like, state),
      "chunk": Chunk(rows, rows, rows, gates, gates, gates),
    }

  def current_state(self, cache, index) -> MemoryState:
    """The state at the last chunk boundary (the initial state before the first token; an empty
    cache is all zeros)."""
    initial = self.initial_state(cache["state"].conv.shape[0])
    return jax.tree.map(lambda a, b: jnp.where(index == 0, a, b), initial, cache["state"])

  def step(self, x_B1D, cache, index):
    """One token at stream position ``index``: ``(out [B, 1, D], new cache)``."""
    c = self.config.memory_chunk
    state = self.current_state(cache, index)
    token, conv = self._inputs(x_B1D, state.conv)
    pos = index % c
    chunk = Chunk(
      *(
        jax.lax.dynamic_update_slice_in_dim(buf, new, pos, axis=2)
        for buf, new in zip(cache["chunk"], token)
      )
    )
    y, weights, momentum = chunk_update(
      state.weights, state.momentum, chunk, self.config.memory_grad_clip
    )
    y = jax.lax.dynamic_slice_in_dim(y, pos, 1, axis=2)
    full = pos == c - 1  # the chunk is complete: commit its end state
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(full, a, b), new, old)
    state = MemoryState(keep(weights, state.weights), keep(momentum, state.momentum), conv)
    return self._output(x_B1D, y), {"state": state, "chunk": chunk}


class PrefixAttention(nn.Module):
  """Attention over ``[prefix | x]`` in one frame (RoPE positions 0, 1, ... over the frame)
  under ``mask``; returns the outputs of ``x`` only.

  With ``decode=True``, ``x`` is one token at frame position ``len(prefix) + write_at``: its key
  and value are written there in a cache of ``frame`` positions (the prefix's at the front, when
  ``write_at == 0``) and it attends to the cache.
  """

  num_heads: int
  head_dim: int
  mask: masks.Mask
  rope_theta: float = 10_000.0
  implementation: str | None = None
  decode: bool = False
  frame: int = 0  # decode: cache positions (prefix included)
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, prefix_BPD, x_BLD, write_at=None):
    d, h, e = x_BLD.shape[-1], self.num_heads, self.head_dim
    p = prefix_BPD.shape[1]
    z = jnp.concatenate([prefix_BPD.astype(x_BLD.dtype), x_BLD], axis=1)
    dense = functools.partial(layers.Dense, dtype=self.dtype)
    q = dense((d, h, e), (sh.EMBED, sh.HEADS, sh.HEAD_DIM), name="q")(z)
    k = dense((d, h, e), (sh.EMBED, sh.HEADS, sh.HEAD_DIM), name="k")(z)
    v = dense((d, h, e), (sh.EMBED, sh.HEADS, sh.HEAD_DIM), name="v")(z)
    batch, frame = z.shape[:2]
    if not self.decode:
      positions = jnp.broadcast_to(jnp.arange(frame), (batch, frame))
      q = layers.apply_rope(q, positions, self.rope_theta)
      k = layers.apply_rope(k, positions, self.rope_theta)
      sharded = layers._kernel_mesh(  # pylint: disable=protected-access
        self.implementation, frame, self.mask
      )
      out = kernels.block_sparse_attention(
        q, k, v, self.mask, implementation=self.implementation, **sharded
      )[:, p:]
    else:
      positions = jnp.broadcast_to(
        jnp.concatenate([jnp.arange(p), p + write_at[None]]), (batch, p + 1)
      )
      q = layers.apply_rope(q, positions, self.rope_theta)
      k = layers.apply_rope(k, positions, self.rope_theta)
      cached_k = self.variable("cache", "key", jnp.zeros, (batch, self.frame, h, e), k.dtype)
      cached_v = self.variable("cache", "value", jnp.zeros, (batch, self.frame, h, e), v.dtype)
      for cached, new in ((cached_k, k), (cached_v, v)):
        value = jax.lax.dynamic_update_slice_in_dim(cached.value, new[:, p:], p + write_at, 1)
        with_prefix = jax.lax.dynamic_update_slice_in_dim(value, new[:, :p], 0, 1)
        cached.value = jnp.where(write_at == 0, with_prefix, value)
      out = attention_reference.attention(
        q[:, p:], cached_k.value, cached_v.value, mask=self.mask, q_offset=p + write_at
      )
    return dense((h, e, d), (sh.HEADS, sh.HEAD_DIM, sh.EMBED), num_in=2, name="o")(out)


def _memory(block: nn.Module, memory: NeuralMemory, x_BTD, index):
  """The memory layer of ``block``: the chunked forward, or one decode step on its cache."""
  if index is None:
    return memory(x_BTD)[0]
  cache = block.variable("cache", "memory_cache", memory.empty_cache, x_BTD.shape[0])
  out, cache.value = memory.step(x_BTD, cache.value, index)
  return out


class TitansBlock(nn.Module):
  """One layer of an LMM, MAG or MAL stack (MAC: ``MACBlock``); ``index`` is the decode position
  (``None``: a full forward)."""

  config: TitansConfig
  decode: bool = False
  cache_len: int = 0

  @nn.compact
  def __call__(self, x_BLD, index=None):
    cfg, dtype = self.config, self.config.compute_dtype
    norm = lambda name: layers.RMSNorm(cfg.norm_eps, dtype, name=name)
    x_BLD = sh.constrain(x_BLD, (sh.BATCH, sh.LENGTH, sh.EMBED))
    memory = NeuralMemory(cfg, name="memory")

    def attention(h):
      persistent = self.param(
        "persistent",
        nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, sh.EMBED)),
        (cfg.num_persistent, cfg.d_model),
      )
      prefix = jnp.broadcast_to(persistent, (h.shape[0],) + persistent.shape)
      return PrefixAttention(
        cfg.num_heads,
        cfg.head_size,
        cfg.attention_mask,
        cfg.rope_theta,
        cfg.attention_impl,
        self.decode,
        cfg.num_persistent + self.cache_len,
        dtype,
        name="attn",
      )(prefix, h, index)

    if cfg.variant == "mag":
      h = norm("mixer_norm")(x_BLD)
      a, m = attention(h), _memory(self, memory, h, index)
      gate = jax.nn.sigmoid(
        layers.Dense((cfg.d_model, cfg.d_model), (sh.EMBED, sh.MLP), dtype=dtype, name="mix_gate")(
          h
        )
      )
      x_BLD = x_BLD + gate * a + (1 - gate) * m
    else:
      x_BLD = x_BLD + _memory(self, memory, norm("memory_norm")(x_BLD), index)
      if cfg.variant == "mal":
        x_BLD = x_BLD + attention(norm("attn_norm")(x_BLD))
    h = layers.Mlp(cfg.d_model, cfg.mlp_dim, "swiglu", dtype, name="mlp")(norm("mlp_norm")(x_BLD))
    return sh.constrain(x_BLD + h, (sh.BATCH, sh.LENGTH, sh.EMBED))


class MACSegment(nn.Module):
  """MAC on one segment (full forward, scanned over segments) or one token (decode).

  Attention over [persistent | memory tokens | segment] (memory tokens: the memory at the segment
  start read with learned probes), then the memory learns from the attention output and its read
  is added, then the MLP.
  """

  config: TitansConfig
  decode: bool = False

  @nn.compact
  def __call__(self, state, inputs):
    cfg, dtype = self.config, self.config.compute_dtype
    norm = lambda name: layers.RMSNorm(cfg.norm_eps, dtype, name=name)
    memory = NeuralMemory(cfg, name="memory")
    x_BWD, first = inputs
    batch = x_BWD.shape[0]
    if self.decode:  # ``first`` is the stream position; the memory cache holds the state
      index = first
      cache = self.variable("cache", "memory_cache", memory.empty_cache, batch)
      state = memory.current_state(cache.value, index)
      write_at = index % cfg.window
    else:
      state = jax.tree.map(lambda a, b: jnp.where(first, a, b), memory.initial_state(batch), state)
      write_at = None
    persistent = self.param(
      "persistent",
      nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, sh.EMBED)),
      (cfg.num_persistent, cfg.d_model),
    )
    prefix = [jnp.broadcast_to(persistent, (batch,) + persistent.shape).astype(dtype)]
    if cfg.num_memory_tokens:
      prefix.append(memory.memory_tokens(state))
    prefix = jnp.concatenate(prefix, axis=1)
    x_BWD = x_BWD + PrefixAttention(
      cfg.num_heads,
      cfg.head_size,
      cfg.attention_mask,
      cfg.rope_theta,
      cfg.attention_impl,
      self.decode,
      prefix.shape[1] + cfg.window,
      dtype,
      name="attn",
    )(prefix, norm("attn_norm")(x_BWD), write_at)
    h = norm("memory_norm")(x_BWD)
    if self.decode:
      m, cache.value = memory.step(h, cache.value, index)
    else:
      m, state = memory(h, state)
    x_BWD = x_BWD + m
    x_BWD = x_BWD + layers.Mlp(cfg.d_model, cfg.mlp_dim, "swiglu", dtype, name="mlp")(
      norm("mlp_norm")(x_BWD)
    )
    return state, x_BWD


def zero_state(cfg: TitansConfig, batch: int) -> MemoryState:
  """A ``MemoryState`` of zeros with the shapes of ``cfg`` (the scan's initial carry)."""
  widths, h = cfg.memory_widths, cfg.mem_heads
  weights = tuple(jnp.zeros((batch, h, a, b), jnp.float32) for a, b in zip(widths[:-1], widths[1:]))
  return MemoryState(
    weights, weights, jnp.zeros((batch, cfg.memory_conv - 1, 3, h, cfg.mem_head_size), jnp.float32)
  )


class MACBlock(nn.Module):
  """One MAC layer: ``MACSegment`` scanned over the segments, the memory state carried."""

  config: TitansConfig
  decode: bool = False

  @nn.compact
  def __call__(self, x_BLD, index=None):
    cfg = self.config
    if self.decode:
      return MACSegment(cfg, decode=True, name="segments")(None, (x_BLD, index))[1]
    batch, length, d = x_BLD.shape
    w = cfg.window
    n = -(-length // w)
    x = jnp.pad(x_BLD, ((0, 0), (0, n * w - length), (0, 0)))
    segments = jnp.moveaxis(x.reshape(batch, n, w, d), 1, 0)  # [N, B, W, D]
    scan = nn.scan(
      MACSegment,
      variable_broadcast="params",
      split_rngs={"params": False},
      in_axes=0,
      out_axes=0,
      length=n,
    )
    _, out = scan(cfg, name="segments")(zero_state(cfg, batch), (segments, jnp.arange(n) == 0))
    return jnp.moveaxis(out, 0, 1).reshape(batch, n * w, d)[:, :length]


class TitansStack(nn.Module):
  config: TitansConfig
  decode: bool = False
  cache_len: int = 0

  @nn.compact
  def __call__(self, x_BLD):
    cfg = self.config
    index = None
    if self.decode:
      counter = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
      index = counter.value
      counter.value = index + 1
    for i in range(cfg.num_layers):
      if cfg.variant == "mac":
        x_BLD = MACBlock(cfg, self.decode, name=f"layers_{i}")(x_BLD, index)
      else:
        x_BLD = TitansBlock(cfg, self.decode, self.cache_len, name=f"layers_{i}")(x_BLD, index)
    return x_BLD


class Titans(nn.Module):
  """Titans LM: tokens ``[B, L]`` -> float32 logits ``[B, L, V]``."""

  config: TitansConfig

  @nn.compact
  def __call__(self, tokens_BL, *, segment_ids=None, positions=None, decode: bool = False):
    """``segment_ids`` and ``positions`` are accepted for the shared LM task and not used: each
    row is one stream (see the module docstring). ``decode=True`` reads and writes the ``cache``
    collection (``sampling.init_cache``), one token at a time."""
    del segment_ids, positions
    cfg = self.config
    if not jnp.issubdtype(tokens_BL.dtype, jnp.integer):  # jnp.take would say "indices"
      raise ValueError(f"tokens_BL must be integer token ids, got {tokens_BL.dtype}")
    embed = layers.Embed(cfg.vocab_size, cfg.d_model, cfg.compute_dtype, name="embed")
    x_BLD = embed(tokens_BL)
    stack = TitansStack(cfg, decode, tokens_BL.shape[1], name="stack")
    if not decode:
      x_BLD = stack(x_BLD)
    elif self.is_initializing():  # creates the cache (a scan needs its carried variables)
      x_BLD = jnp.repeat(stack(x_BLD[:, :1]), tokens_BL.shape[1], axis=1)
    else:

      def step(module, carry, x_BD):
        return carry, module(x_BD[:, None])[:, 0]

      _, x_BLD = nn.scan(
        step,
        variable_broadcast="params",
        variable_carry="cache",
        split_rngs={"params": False},
        in_axes=1,
        out_axes=1,
      )(stack, None, x_BLD)
    x_BLD = layers.RMSNorm(cfg.norm_eps, cfg.compute_dtype, name="final_norm")(x_BLD)
    if cfg.tie_embeddings:
      logits = embed.attend(x_BLD)
    else:
      logits = layers.Dense(
        (cfg.d_model, cfg.vocab_size), (sh.EMBED, sh.VOCAB), dtype=cfg.compute_dtype, name="unembed"
      )(x_BLD)
    return sh.constrain(logits.astype(jnp.float32), (sh.BATCH, sh.LENGTH, sh.VOCAB))
