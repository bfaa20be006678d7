"""A decoder-only transformer LM in Flax Linen, readable top to bottom.

Pre-norm RMSNorm blocks of RoPE attention (MHA, GQA or MQA) and a SwiGLU or GELU MLP; tied or
untied embeddings; optional logit soft-caps; ``causal=False`` turns it into the bidirectional
network that the masked-diffusion LM reuses. The fields in which the open model families differ
(LayerNorm, learned positions, biases, Gemma's norm offset, post-norms and embedding scale, GeGLU,
a score scale, Llama 3 rope scaling) are config fields of this one model, so ``models/hf.py``
loads Llama, Mistral, Qwen2, Gemma, Gemma 2 and GPT-2 checkpoints into it. Layers are stacked
with ``nn.scan`` (one compiled block, a leading ``layers`` axis on every block parameter) and
rematerialized by a named policy.
Attention goes through ``flaxseed.kernels`` (``attention_impl`` picks the implementation) under a
per-layer mask: ``attention_pattern=("sliding_window:4096", "global")`` alternates local and global
layers, and the scanned unit becomes one period of the pattern (``layers/block_0``, ``block_1``).

    from flaxseed.models import transformer
    model = transformer.Transformer(transformer.TransformerConfig.tiny())
    params = model.init(rng, tokens)["params"]
    logits = model.apply({"params": params}, tokens)                  # [B, L, V] float32

Packed sequences pass ``segment_ids`` (tokens attend within their segment) and ``positions``
(RoPE positions, restarting at each document). Incremental decoding: ``sampling.init_cache`` then
``apply(..., decode=True, mutable=["cache"])`` one chunk of tokens at a time
(``flaxseed.models.sampling.generate`` does this for you).
"""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxseed.kernels import masks
from flaxseed.models import kv_cache as kv_cache_lib
from flaxseed.models import layers
from flaxseed.models import sharding as sh

MLP_ACTIVATIONS = ("swiglu", "geglu", "gelu")  # gated SiLU, gated tanh-GELU, plain tanh-GELU
NORMS = ("rms", "layer")
BIASES = ("none", "qkv", "all")
POSITION_EMBEDDINGS = ("rope", "learned")
QUANT_MODES = (None, "ternary")
MTP_STYLES = ("parallel", "sequential")
DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = {
  "none": None,  # keep every activation
  "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block
  "dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs
  # keep weight matmuls
  "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransformerConfig:
  """Architecture of ``Transformer``. Presets are classmethods (``TransformerConfig.tiny()``)."""

  vocab_size: int = 256
  d_model: int = 128
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int | None = None  # None: num_heads (MHA); 1: MQA; in between: GQA
  head_dim: int | None = None  # None: d_model // num_heads
  mlp_dim: int = 512
  mlp_activation: str = "swiglu"  # see MLP_ACTIVATIONS
  rope_theta: float = 10_000.0
  rope_scaling: str | None = None  # layers.parse_rope_scaling spec, e.g. "llama3:factor=8"
  tie_embeddings: bool = True
  norm_eps: float = 1e-6
  causal: bool = True
  logit_soft_cap: float | None = None  # on the output logits
  attn_logit_soft_cap: float | None = None  # on the attention scores
  dtype: str = "float32"  # compute dtype; parameters are always float32
  scan_layers: bool = True
  remat_policy: str = "none"  # see REMAT_POLICIES
  attention_impl: str | None = None  # kernels.flash_attention implementation; None: best
  attention_interpret: bool = False  # run a Pallas attention_impl in interpret mode (CPU tests)
  # Per-layer attention masks, cycled over the layers: "global" (the model's causal/full mask) or
  # a kernels.masks.parse spec such as "sliding_window:4096". E.g. ("sliding_window:4096",
  # "global") alternates local and global layers (Gemma 2, Mistral-style local attention).
  # A causal model intersects every pattern with the causal mask.
  attention_pattern: tuple[str, ...] = ()
  # "ternary": BitNet b1.58 quantization-aware training of the attention and MLP projections
  # (absmean ternary weights, 8-bit absmax activations, straight-through gradients); export with
  # models.quantize.quantize_params(params, fmt="ternary"). Embeddings stay in float.
  quant: str | None = None
  # What the open model families differ in (models/hf.py maps their checkpoints onto these):
  norm: str = "rms"  # rms | layer (LayerNorm with a bias: GPT-2)
  norm_offset: float = 0.0  # RMSNorm multiplies by (offset + scale); Gemma stores scale - 1: 1.0
  post_norms: bool = False  # also normalize each sublayer's output before the residual (Gemma 2)
  biases: str = "none"  # none | qkv (q, k, v projections: Qwen2) | all (every projection: GPT-2)
  position_embedding: str = "rope"  # rope | learned (a [max_positions, D] table added: GPT-2)
  max_positions: int | None = None  # the learned table's length; longer inputs raise
  embed_scale: bool = False  # multiply the embeddings by sqrt(d_model) (Gemma)
  attn_scale: float | None = None  # attention score scale; None: head_dim ** -0.5
  # Multi-token prediction: extra heads predicting the tokens 2..mtp_heads+1 ahead, read with
  # ``apply(..., mtp=True)``. "parallel" (Gloeckle et al. 2024, Medusa): head k is one block and
  # a norm on the trunk's last hidden state. "sequential" (DeepSeek-V3): module k projects
  # [norm(embed(token i+k)), norm(h_{k-1})] to d_model and runs one block, a causal chain.
  # Both share the unembedding; the main head is unchanged, so plain decoding ignores them.
  mtp_heads: int = 0
  mtp_style: str = "parallel"
  # KV-cache compression when decoding (models/kv_cache.py): "window:recent=W,sinks=S"
  # (StreamingLLM), "h2o:heavy=H,recent=R", "quest:budget=B,page=P"; None: the full cache.
  kv_cache: str | None = None
  kv_cache_dtype: str = "float"  # "int8": int8 keys and values with absmax scales per token

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "mlp_dim"):
      if getattr(self, name) <= 0:
        raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
    for name in ("num_kv_heads", "head_dim"):
      if getattr(self, name) is not None and getattr(self, name) <= 0:
        raise ValueError(f"{name} must be positive or None, got {getattr(self, name)}")
    if self.head_dim is None and self.d_model % self.num_heads:
      raise ValueError(
        f"num_heads={self.num_heads} must divide d_model={self.d_model} (or set head_dim)"
      )
    if self.num_heads % self.kv_heads:
      raise ValueError(f"num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}")
    if self.position_embedding not in POSITION_EMBEDDINGS:
      raise ValueError(
        f"position_embedding={self.position_embedding!r} is not one of {POSITION_EMBEDDINGS}"
      )
    if self.position_embedding == "rope":
      if self.head_size % 2:
        raise ValueError(f"the head dim ({self.head_size}) must be even for RoPE")
      # raises, naming the bad field; equal scalings compare (and hash) equal
      object.__setattr__(self, "rope_scaling", layers.canonical_rope_scaling(self.rope_scaling))
    elif self.rope_scaling is not None:
      raise ValueError("rope_scaling needs position_embedding='rope'")
    if self.position_embedding == "learned" and (self.max_positions or 0) <= 0:
      raise ValueError(
        f"position_embedding='learned' needs max_positions > 0, got {self.max_positions}"
      )
    if self.norm not in NORMS:
      raise ValueError(f"norm={self.norm!r} is not one of {NORMS}")
    if self.norm == "layer" and self.norm_offset:
      raise ValueError("norm_offset applies to norm='rms' only")
    if self.biases not in BIASES:
      raise ValueError(f"biases={self.biases!r} is not one of {BIASES}")
    # The float checks are written so that NaN fails them (every comparison with NaN is False).
    if self.attn_scale is not None and not layers.finite_positive(self.attn_scale):
      raise ValueError(f"attn_scale must be positive and finite, or None, got {self.attn_scale}")
    if self.mlp_activation not in MLP_ACTIVATIONS:
      raise ValueError(f"mlp_activation={self.mlp_activation!r} is not one of {MLP_ACTIVATIONS}")
    if self.dtype not in DTYPES:
      raise ValueError(f"dtype={self.dtype!r} is not one of {DTYPES}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy={self.remat_policy!r} is not one of {tuple(REMAT_POLICIES)}")
    for name in ("logit_soft_cap", "attn_logit_soft_cap"):
      if getattr(self, name) is not None and not layers.finite_positive(getattr(self, name)):
        raise ValueError(f"{name} must be positive and finite, or None, got {getattr(self, name)}")
    if not layers.finite_positive(self.rope_theta):
      raise ValueError(f"rope_theta must be positive and finite, got {self.rope_theta}")
    if not layers.finite_positive(self.norm_eps):
      raise ValueError(f"norm_eps must be positive and finite, got {self.norm_eps}")
    if not math.isfinite(self.norm_offset):
      raise ValueError(f"norm_offset must be finite, got {self.norm_offset}")
    kv_cache_lib.parse(self.kv_cache)  # raises, naming the bad spec
    if self.kv_cache_dtype not in ("float", "int8"):
      raise ValueError(f"kv_cache_dtype={self.kv_cache_dtype!r} is not one of ('float', 'int8')")
    if self.mtp_heads < 0:
      raise ValueError(f"mtp_heads must be >= 0, got {self.mtp_heads}")
    if self.mtp_style not in MTP_STYLES:
      raise ValueError(f"mtp_style={self.mtp_style!r} is not one of {MTP_STYLES}")
    if self.mtp_heads and not self.causal:
      raise ValueError("mtp_heads needs a causal model (causal=False)")
    if self.quant not in QUANT_MODES:
      raise ValueError(f"quant={self.quant!r} is not one of {QUANT_MODES}")
    if isinstance(self.attention_pattern, str):
      raise ValueError("attention_pattern must be a tuple of mask specs, got a string")
    object.__setattr__(self, "attention_pattern", tuple(self.attention_pattern))
    for spec in self.attention_pattern:
      if spec != "global":
        masks.parse(spec)  # raises, naming the bad spec
    if (
      self.scan_layers
      and len(self.attention_pattern) > 1
      and self.num_layers % len(self.attention_pattern)
    ):
      raise ValueError(
        f"with scan_layers, num_layers={self.num_layers} must be a multiple of "
        f"len(attention_pattern)={len(self.attention_pattern)} (the scanned unit)"
      )

  def layer_mask(self, layer: int) -> masks.Mask | None:
    """The attention mask of ``layer``: ``None`` for no mask (bidirectional global layers)."""
    spec = (
      self.attention_pattern[layer % len(self.attention_pattern)]
      if (self.attention_pattern)
      else "global"
    )
    if spec == "global":
      return masks.causal() if self.causal else None
    mask = masks.parse(spec)
    return mask & masks.causal() if self.causal else mask

  @property
  def kv_heads(self) -> int:
    return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

  @property
  def head_size(self) -> int:
    return self.d_model // self.num_heads if self.head_dim is None else self.head_dim

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward), the MFU numerator.

    Matmuls: 2 FLOPs per weight per token forward (the embedding lookup is free; the unembedding
    is a matmul, tied or not). Attention: ``q k^T`` and ``p v`` cost ``4 H E`` per visible key; a
    causal query sees ``(L + 1) / 2`` keys on average (the work a causal kernel must do).
    """
    d, h, k, e, f = self.d_model, self.num_heads, self.kv_heads, self.head_size, self.mlp_dim
    mlp_mats = 2 if self.mlp_activation == "gelu" else 3
    per_layer = d * h * e * 2 + d * k * e * 2 + mlp_mats * d * f
    matmul_params = self.num_layers * per_layer + d * self.vocab_size
    keys = sum(_visible_keys(self.layer_mask(i), seq_len) for i in range(self.num_layers))
    attention = 4 * h * e * keys
    return 3 * (2 * matmul_params + attention)

  # Presets. The generic ladder uses the byte vocabulary of the default corpus; the named families
  # carry their own vocabularies so their checkpoints can be imported.
  # The CPU presets unroll their few layers: nn.scan's gain is compile time for deep stacks, and
  # on XLA:CPU its stacking costs ~8% of the step (experiments/benchmarks/train_step.py).
  @classmethod
  def tiny(cls, **kw):
    """0.9M params: trains on a laptop CPU in minutes."""
    return cls(
      **{**dict(d_model=128, num_layers=4, num_heads=4, mlp_dim=384, scan_layers=False), **kw}
    )

  @classmethod
  def small(cls, **kw):
    """5M params."""
    return cls(
      **{**dict(d_model=256, num_layers=6, num_heads=8, mlp_dim=768, scan_layers=False), **kw}
    )

  @classmethod
  def base(cls, **kw):
    """85M params (non-embedding), GPT-2 small width and depth."""
    return cls(**{**dict(d_model=768, num_layers=12, num_heads=12, mlp_dim=2048), **kw})

  @classmethod
  def large(cls, **kw):
    """270M params, GPT-2 medium width and depth, grouped-query attention."""
    return cls(
      **{**dict(d_model=1024, num_layers=24, num_heads=16, num_kv_heads=4, mlp_dim=2816), **kw}
    )

  @classmethod
  def one_b(cls, **kw):
    """1.1B params."""
    return cls(
      **{
        **dict(
          d_model=2048,
          num_layers=24,
          num_heads=16,
          num_kv_heads=4,
          mlp_dim=5632,
          remat_policy="dots_no_batch",
        ),
        **kw,
      }
    )

  @classmethod
  def llama_1b(cls, **kw):
    """Llama 3.2 1B sizes."""
    return cls(
      **{
        **dict(
          vocab_size=128_256,
          d_model=2048,
          num_layers=16,
          num_heads=32,
          num_kv_heads=8,
          head_dim=64,
          mlp_dim=8192,
          rope_theta=500_000.0,
          tie_embeddings=True,
          norm_eps=1e-5,
          remat_policy="dots_no_batch",
        ),
        **kw,
      }
    )

  @classmethod
  def llama_8b(cls, **kw):
    """Llama 3 8B sizes."""
    return cls(
      **{
        **dict(
          vocab_size=128_256,
          d_model=4096,
          num_layers=32,
          num_heads=32,
          num_kv_heads=8,
          mlp_dim=14_336,
          rope_theta=500_000.0,
          tie_embeddings=False,
          norm_eps=1e-5,
          remat_policy="full",
        ),
        **kw,
      }
    )

  @classmethod
  def qwen2_0_5b(cls, **kw):
    """Qwen2.5 0.5B sizes: q/k/v biases, tied embeddings."""
    return cls(
      **{
        **dict(
          vocab_size=151_936,
          d_model=896,
          num_layers=24,
          num_heads=14,
          num_kv_heads=2,
          mlp_dim=4864,
          rope_theta=1_000_000.0,
          biases="qkv",
          remat_policy="dots_no_batch",
        ),
        **kw,
      }
    )

  @classmethod
  def gemma2_2b(cls, **kw):
    """Gemma 2 2B sizes: norms around 1 + scale before and after each sublayer, sqrt(d)
    embedding scale, GeGLU, soft-capped logits, local (4096) and global layers alternating."""
    return cls(
      **{
        **dict(
          vocab_size=256_000,
          d_model=2304,
          num_layers=26,
          num_heads=8,
          num_kv_heads=4,
          head_dim=256,
          mlp_dim=9216,
          mlp_activation="geglu",
          norm_offset=1.0,
          post_norms=True,
          embed_scale=True,
          attn_scale=1 / 16,
          logit_soft_cap=30.0,
          attn_logit_soft_cap=50.0,
          attention_pattern=("sliding_window:4096", "global"),
          remat_policy="dots_no_batch",
        ),
        **kw,
      }
    )

  @classmethod
  def gpt2_124m(cls, **kw):
    """GPT-2 (small): LayerNorm, learned positions (1024), biases, tanh-GELU MLP, tied
    embeddings, 50257-token vocabulary."""
    return cls(**{**_GPT2, **dict(d_model=768, num_layers=12, num_heads=12, mlp_dim=3072), **kw})

  @classmethod
  def gpt2_355m(cls, **kw):
    """GPT-2 medium."""
    return cls(**{**_GPT2, **dict(d_model=1024, num_layers=24, num_heads=16, mlp_dim=4096), **kw})

  @classmethod
  def gpt2_1_5b(cls, **kw):
    """GPT-2 XL."""
    return cls(
      **{
        **_GPT2,
        **dict(
          d_model=1600, num_layers=48, num_heads=25, mlp_dim=6400, remat_policy="dots_no_batch"
        ),
        **kw,
      }
    )


_GPT2 = dict(
  vocab_size=50_257,
  norm="layer",
  position_embedding="learned",
  max_positions=1024,
  biases="all",
  mlp_activation="gelu",
  norm_eps=1e-5,
)


PRESETS = {
  "transformer-tiny": TransformerConfig.tiny,
  "transformer-small": TransformerConfig.small,
  "transformer-base": TransformerConfig.base,
  "transformer-large": TransformerConfig.large,
  "transformer-1b": TransformerConfig.one_b,
  "llama-style-1b": TransformerConfig.llama_1b,
  "llama-style-8b": TransformerConfig.llama_8b,
  "qwen2-style-0.5b": TransformerConfig.qwen2_0_5b,
  "gemma2-style-2b": TransformerConfig.gemma2_2b,
  "gpt2-style-124m": TransformerConfig.gpt2_124m,
  "gpt2-style-355m": TransformerConfig.gpt2_355m,
  "gpt2-style-1.5b": TransformerConfig.gpt2_1_5b,
}


@functools.lru_cache(maxsize=32)
def _visible_keys(mask: masks.Mask | None, seq_len: int) -> float:
  """Keys a query sees on average under ``mask`` (exact; counted by rows on the host)."""
  if mask is None:
    return float(seq_len)
  if mask == masks.causal():
    return (seq_len + 1) / 2
  idx, total = np.arange(seq_len), 0
  for start in range(0, seq_len, 1024):
    total += int(np.count_nonzero(mask(idx[start : start + 1024, None], idx[None, :])))
  return total / seq_len


class Block(nn.Module):
  """``x + attn(norm(x))`` then ``x + mlp(norm(x))``; the scan body (carry, broadcasts)."""

  config: TransformerConfig
  decode: bool = False
  mask: masks.Mask | None = None  # this layer's attention mask (config.layer_mask)

  @nn.compact
  def __call__(self, x_BLD, segment_ids_BL, positions_BL):
    cfg, dtype = self.config, self.config.compute_dtype
    x_BLD = sh.constrain(x_BLD, (sh.BATCH, sh.LENGTH, sh.EMBED))
    h = norm(cfg, "attn_norm")(x_BLD)
    h = layers.Attention(
      cfg.num_heads,
      cfg.kv_heads,
      cfg.head_size,
      rope_theta=cfg.rope_theta if cfg.position_embedding == "rope" else None,
      rope_scaling=cfg.rope_scaling,
      mask=self.mask,
      sm_scale=cfg.attn_scale,
      logit_soft_cap=cfg.attn_logit_soft_cap,
      implementation=cfg.attention_impl,
      interpret=cfg.attention_interpret,
      decode=self.decode,
      dtype=dtype,
      quant=cfg.quant,
      qkv_bias=cfg.biases != "none",
      out_bias=cfg.biases == "all",
      kv_cache=cfg.kv_cache,
      kv_cache_dtype=cfg.kv_cache_dtype,
      name="attn",
    )(h, segment_ids_BL, positions_BL)
    if cfg.post_norms:
      h = norm(cfg, "attn_post_norm")(h)
    x_BLD = x_BLD + h
    h = norm(cfg, "mlp_norm")(x_BLD)
    h = layers.Mlp(
      cfg.d_model,
      cfg.mlp_dim,
      cfg.mlp_activation,
      dtype,
      quant=cfg.quant,
      use_bias=cfg.biases == "all",
      name="mlp",
    )(h)
    if cfg.post_norms:
      h = norm(cfg, "mlp_post_norm")(h)
    x_BLD = sh.constrain(x_BLD + h, (sh.BATCH, sh.LENGTH, sh.EMBED))
    return x_BLD, None


def norm(cfg: TransformerConfig, name: str) -> nn.Module:
  """The config's normalization layer (RMSNorm, with Gemma's offset, or LayerNorm)."""
  if cfg.norm == "layer":
    return layers.LayerNorm(cfg.norm_eps, cfg.compute_dtype, name=name)
  return layers.RMSNorm(cfg.norm_eps, cfg.compute_dtype, cfg.norm_offset, name=name)


class BlockGroup(nn.Module):
  """One period of ``config.attention_pattern``: consecutive blocks with their own masks (the
  scanned unit when layers differ, so the stack still compiles one body)."""

  config: TransformerConfig
  decode: bool = False

  @nn.compact
  def __call__(self, x_BLD, segment_ids_BL, positions_BL):
    cfg = self.config
    for j in range(len(cfg.attention_pattern)):
      x_BLD, _ = _block_class(cfg)(cfg, self.decode, cfg.layer_mask(j), name=f"block_{j}")(
        x_BLD, segment_ids_BL, positions_BL
      )
    return x_BLD, None


def _block_class(cfg: TransformerConfig):
  if cfg.remat_policy == "none":
    return Block
  return nn.remat(Block, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers)


class MtpHead(nn.Module):
  """One extra prediction head (``TransformerConfig.mtp_style``): a block on the trunk's hidden
  state (parallel) or on a projection of [norm(embed(the next token)), norm(the previous depth's
  hidden state)] (sequential). Returns (its hidden state, normalized for the unembedding)."""

  config: TransformerConfig
  decode: bool = False

  @nn.compact
  def __call__(self, h_BLD, next_embed_BLD, segment_ids_BL, positions_BL):
    cfg = self.config
    if cfg.mtp_style == "sequential":
      x_BLE = jnp.concatenate(
        [norm(cfg, "embed_norm")(next_embed_BLD), norm(cfg, "hidden_norm")(h_BLD)], axis=-1
      )
      h_BLD = layers.Dense(
        (2 * cfg.d_model, cfg.d_model), (sh.MLP, sh.EMBED), dtype=cfg.compute_dtype, name="proj"
      )(x_BLE)
    h_BLD, _ = _block_class(cfg)(cfg, self.decode, masks.causal(), name="block")(
      h_BLD, segment_ids_BL, positions_BL
    )
    return h_BLD, norm(cfg, "norm")(h_BLD)


class Transformer(nn.Module):
  """Decoder LM: tokens ``[B, L]`` -> float32 logits ``[B, L, V]``."""

  config: TransformerConfig

  @nn.compact
  def __call__(
    self,
    tokens_BL,
    *,
    segment_ids=None,
    positions=None,
    decode: bool = False,
    mtp: bool = False,
    mtp_carry=None,
    mtp_draft=None,
  ):
    """Args:
    tokens_BL: int tokens.
    segment_ids: ``[B, L]`` document ids of packed rows (0 usually marks padding); ``None``:
      one document per row.
    positions: ``[B, L]`` RoPE positions; ``None``: ``0..L-1`` (or, when decoding, continuing
      from the cache index).
    decode: read and write the ``cache`` collection (see ``sampling.init_cache``).
    mtp: also return the multi-token heads' logits: ``(logits [B, L, V], extra [K, B, L, V])``
      where ``extra[k - 1, :, i]`` predicts the token at ``i + 1 + k`` (``config.mtp_heads = K``).
      A sequential head k reads the token at ``i + k``: within ``tokens_BL``, so the last k
      positions read wrapped tokens (their targets lie past the row; never use them).
    mtp_carry, mtp_draft: decoding with sequential heads (``models/speculative.py``), below.

    Decoding sequential heads. Head k's entry for position j reads token ``j + k``, so a decode
    step writes it at the cache slot of token ``j + k`` (RoPE position ``j``): in a chunk of
    tokens at positions ``p``, head k reads the embedding of token ``p`` and the previous depth's
    hidden state at ``p - 1`` (``mtp_carry [K, B, D]``: each depth's input from before the
    chunk), so ``extra[k - 1, :, i]`` predicts the token after position ``p_i`` (the main head's
    target, from less of the trunk). With ``decode=True, mtp=True`` the call returns ``(logits,
    extra, hiddens [K, B, L, D])``, each depth's input for the next; ``positions`` are required.
    ``mtp_draft=(k, hidden [B, L, D])`` runs head k alone on ``tokens_BL`` and returns
    ``(logits, its hidden state)``: one drafting step.
    """
    cfg = self.config
    if decode and not cfg.causal:
      raise ValueError("decode=True needs a causal model (config.causal=False)")
    if (mtp or mtp_draft is not None) and not cfg.mtp_heads:
      raise ValueError("mtp=True needs config.mtp_heads > 0")
    sequential_decode = decode and cfg.mtp_style == "sequential" and cfg.mtp_heads
    if (mtp_carry is not None or mtp_draft is not None) and not (
      sequential_decode and positions is not None
    ):
      raise ValueError(
        "mtp_carry and mtp_draft decode sequential heads: they need decode=True, "
        "mtp_style='sequential' and explicit positions"
      )
    if mtp and sequential_decode and positions is None:
      raise ValueError("decoding sequential heads (mtp=True, decode=True) needs explicit positions")
    if not jnp.issubdtype(tokens_BL.dtype, jnp.integer):  # jnp.take would say "indices"
      raise ValueError(f"tokens_BL must be integer token ids, got {tokens_BL.dtype}")
    if cfg.max_positions is not None and tokens_BL.shape[1] > cfg.max_positions:
      raise ValueError(
        f"{tokens_BL.shape[1]} tokens exceed max_positions={cfg.max_positions} "
        "(the learned position table)"
      )
    if positions is None and not decode:
      positions = jnp.broadcast_to(jnp.arange(tokens_BL.shape[1]), tokens_BL.shape)
    embed = layers.Embed(cfg.vocab_size, cfg.d_model, cfg.compute_dtype, name="embed")
    unembed_layer = None
    if not cfg.tie_embeddings:
      unembed_layer = layers.Dense(
        (cfg.d_model, cfg.vocab_size), (sh.EMBED, sh.VOCAB), dtype=cfg.compute_dtype, name="unembed"
      )

    def unembed(h_BLD):
      logits = embed.attend(h_BLD) if unembed_layer is None else unembed_layer(h_BLD)
      logits = logits.astype(jnp.float32)
      if cfg.logit_soft_cap is not None:
        logits = cfg.logit_soft_cap * jnp.tanh(logits / cfg.logit_soft_cap)
      return sh.constrain(logits, (sh.BATCH, sh.LENGTH, sh.VOCAB))

    tokens_embed_BLD = x_BLD = self._embed(embed, tokens_BL)
    if mtp_draft is not None:  # one sequential head alone: a drafting step
      k, hidden_BLD = mtp_draft
      h_BLD, out_BLD = MtpHead(cfg, decode, name=f"mtp_{k - 1}")(
        hidden_BLD, tokens_embed_BLD, segment_ids, positions
      )
      return unembed(out_BLD), h_BLD
    if cfg.position_embedding == "learned":
      x_BLD = x_BLD + self._learned_positions(tokens_BL, positions, decode)

    if cfg.scan_layers:
      # The scanned unit: one block, or one period of blocks when layers' masks differ.
      period = max(1, len(cfg.attention_pattern))
      if period == 1:
        unit, unit_args = _block_class(cfg), (cfg, decode, cfg.layer_mask(0))
      else:
        unit, unit_args = BlockGroup, (cfg, decode)
      stack = nn.scan(
        unit,
        variable_axes={"params": 0, "cache": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast),
        length=cfg.num_layers // period,
        metadata_params={nn.PARTITION_NAME: sh.LAYERS},
      )
      x_BLD, _ = stack(*unit_args, name="layers")(x_BLD, segment_ids, positions)
    else:
      for i in range(cfg.num_layers):
        x_BLD, _ = _block_class(cfg)(cfg, decode, cfg.layer_mask(i), name=f"layers_{i}")(
          x_BLD, segment_ids, positions
        )

    logits = unembed(norm(cfg, "final_norm")(x_BLD))
    if not (mtp or (cfg.mtp_heads and self.is_initializing())):
      return logits
    if sequential_decode and positions is not None:
      return self._decode_sequential(
        x_BLD, tokens_embed_BLD, logits, unembed, segment_ids, positions, mtp_carry, mtp
      )
    extra, h_BLD = [], x_BLD
    for k in range(1, cfg.mtp_heads + 1):
      # Parallel heads all read the trunk; a sequential head reads the previous depth and the
      # embedding of the token k ahead (the tokens rolled left; the wrapped tail is never a target).
      source = x_BLD if cfg.mtp_style == "parallel" else h_BLD
      ahead = jnp.roll(tokens_embed_BLD, -k, axis=1) if cfg.mtp_style == "sequential" else None
      h_BLD, out_BLD = MtpHead(cfg, decode, name=f"mtp_{k - 1}")(
        source, ahead, segment_ids, positions
      )
      extra.append(unembed(out_BLD))
    return (logits, jnp.stack(extra)) if mtp else logits  # init creates the heads either way

  def _decode_sequential(
    self, x_BLD, tokens_embed_BLD, logits, unembed, segment_ids, positions, carry_KBD, mtp
  ):
    """A decode chunk through the sequential heads (the ``__call__`` docstring): head k at slot
    ``p`` reads token ``p`` and the previous depth at ``p - 1``, at RoPE position ``p - k``."""
    cfg = self.config
    batch, _, width = x_BLD.shape
    if carry_KBD is None:
      carry_KBD = jnp.zeros((cfg.mtp_heads, batch, width), x_BLD.dtype)
    if segment_ids is None:
      segment_ids = jnp.ones(positions.shape, jnp.int32)
    extra, hiddens, prev_BLD = [], [], x_BLD
    for k in range(1, cfg.mtp_heads + 1):
      hiddens.append(prev_BLD)
      source = jnp.concatenate(
        [carry_KBD[k - 1][:, None].astype(prev_BLD.dtype), prev_BLD[:, :-1]], axis=1
      )
      # the entry for position p - k exists once p - k >= 0
      segments_k = jnp.where(positions - k >= 0, segment_ids, 0)
      prev_BLD, out_BLD = MtpHead(cfg, True, name=f"mtp_{k - 1}")(
        source, tokens_embed_BLD, segments_k, positions - k
      )
      extra.append(unembed(out_BLD))
    if not mtp:
      return logits
    return logits, jnp.stack(extra), jnp.stack(hiddens)

  def _embed(self, embed, tokens_BL):
    x_BLD = embed(tokens_BL)
    if self.config.embed_scale:  # Gemma: the scale rounded to the compute dtype, as its reference
      x_BLD = x_BLD * jnp.asarray(np.sqrt(self.config.d_model), x_BLD.dtype)
    return x_BLD

  def _learned_positions(self, tokens_BL, positions_BL, decode: bool):
    """Rows of the learned position table; when decoding without explicit positions, the
    cache's own counter continues from the tokens already written."""
    cfg = self.config
    if positions_BL is None:  # decode: count in the cache, as the attention layers do
      initialized = self.has_variable("cache", "position_index")
      index = self.variable("cache", "position_index", lambda: jnp.zeros((), jnp.int32))
      positions_BL = jnp.broadcast_to(index.value + jnp.arange(tokens_BL.shape[1]), tokens_BL.shape)
      if initialized:
        index.value = index.value + tokens_BL.shape[1]
    table = layers.Embed(
      cfg.max_positions,
      cfg.d_model,
      cfg.compute_dtype,
      axes=(sh.LENGTH, sh.EMBED),
      name="pos_embed",
    )
    return table(positions_BL)
