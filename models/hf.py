"""Hugging Face checkpoints in and out (local folders only): Llama, Mistral, Qwen2, Gemma,
Gemma 2 and GPT-2.

    from flaxseed.models import hf
    model, params = hf.from_pretrained("/path/to/dir")   # config.json + *.safetensors (sharded too)
    tok = hf.tokenizer("/path/to/dir")                   # tokenizer.json or tokenizer.model
    hf.to_pretrained(model, params, "/path/to/out")      # config.json + model.safetensors
    hf.to_peft(adapters, lora_cfg, "/path/to/adapter")   # LoRA adapters in peft's layout

Every family is the one ``transformer.Transformer`` with some config fields set (``FAMILIES``
lists them): Qwen2 is Llama with q/k/v biases; Gemma adds the norm offset (``1 + scale``), the
``sqrt(d)`` embedding scale and GeGLU; Gemma 2 adds post-sublayer norms, logit soft-caps, its
score scale and alternating sliding-window layers; GPT-2 is LayerNorm, learned positions,
biases everywhere and a tanh-GELU MLP. The Llama-layout families map name by name:

    flaxseed (per layer)          Hugging Face (``model.layers.{i}.``)
    attn_norm/scale               input_layernorm.weight
    attn/{q,k,v}/kernel [D,H,E]   self_attn.{q,k,v}_proj.weight [H*E, D]   (and .bias [H*E])
    attn/o/kernel [H,E,D]         self_attn.o_proj.weight [D, H*E]
    mlp_norm/scale                post_attention_layernorm.weight  (Gemma 2: pre_feedforward_...)
    attn_post_norm, mlp_post_norm post_attention_layernorm, post_feedforward_layernorm (Gemma 2)
    mlp/{gate,up,down}/kernel     mlp.{gate,up,down}_proj.weight (transposed)
    embed/embedding, final_norm/scale, unembed/kernel: model.embed_tokens, model.norm, lm_head

A kernel ``[in..., out...]`` is the matrix ``W [I, O]`` (``params.zoo_num_in`` says which axes
are inputs); ``torch.nn.Linear`` stores ``W^T [O, I]``; GPT-2's ``Conv1D`` stores ``W [I, O]`` and
fuses q, k, v into one ``c_attn`` (split here by output columns). No permutation of q/k is needed:
these families use the rotate-half RoPE layout. Layers may be scanned (``layers/...`` with a
leading layer axis) or unrolled (``layers_{i}/...``). ``module_name`` is the one place that maps a
parameter path to a Hugging Face module; ``to_peft`` uses it to write LoRA adapters in peft's
layout.

Whatever a family's ``config.json`` asks for that the transformer cannot do (another rope
scaling, an exact-erf GELU, Qwen2's per-layer sliding windows...) raises a ``ValueError`` naming
the field; so do tensors no parameter reads (a config with fewer layers than the weights) and
files that cannot be read (naming the file). Parameters are float32 (bf16 files are upcast).
``from_pretrained(dir, mesh=...)`` places each parameter straight into its sharded device arrays
(one layer's tensor at a time on the host).
``safetensors`` is the one extra dependency (the ``hf`` extra).
"""

import dataclasses
import json
import math
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxseed.data import tokenizers
from flaxseed.models import layers
from flaxseed.models import lora
from flaxseed.models import params as params_lib
from flaxseed.models import sharding as sh
from flaxseed.models import transformer

# ------------------------------------------------------------------------------------ layouts

# The transformer fields that make each family; to_hf_config picks the first family whose
# fields all match a config (Mistral is Llama with a sliding window, chosen by its pattern).
_ROPE_BASE = dict(
  norm="rms",
  position_embedding="rope",
  logit_soft_cap=None,
  attn_logit_soft_cap=None,
  attn_scale=None,
  post_norms=False,
  norm_offset=0.0,
  embed_scale=False,
  biases="none",
  mlp_activation="swiglu",
)
_GEMMA = {
  **_ROPE_BASE,
  "norm_offset": 1.0,
  "embed_scale": True,
  "mlp_activation": "geglu",
  "tie_embeddings": True,
}
FAMILIES = {
  "llama": _ROPE_BASE,
  "qwen2": {**_ROPE_BASE, "biases": "qkv"},
  "gemma": _GEMMA,
  "gemma2": {
    **_GEMMA,
    "post_norms": True,
    "logit_soft_cap": ...,
    "attn_logit_soft_cap": ...,
    "attn_scale": ...,
  },  # ...: any value
  "gpt2": dict(
    norm="layer",
    position_embedding="learned",
    biases="all",
    mlp_activation="gelu",
    tie_embeddings=True,
    logit_soft_cap=None,
    attn_logit_soft_cap=None,
    attn_scale=None,
    post_norms=False,
    embed_scale=False,
    num_kv_heads=None,
    head_dim=None,
  ),
}
MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma", "gemma2", "gpt2")
_COMMON = dict(causal=True, quant=None)  # every family


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where a family keeps each parameter: flaxseed module -> Hugging Face module, per layer
  (under ``layer_prefix``) and at the top. A value ``(module, part)`` is one third (q, k or v)
  of a fused projection; ``conv1d``: weights stored ``[I, O]`` (GPT-2) rather than ``[O, I]``."""

  layer_prefix: str
  layer_modules: dict
  top_modules: dict
  conv1d: bool = False


_LLAMA_LAYER = {
  "attn_norm": "input_layernorm",
  "attn/q": "self_attn.q_proj",
  "attn/k": "self_attn.k_proj",
  "attn/v": "self_attn.v_proj",
  "attn/o": "self_attn.o_proj",
  "mlp_norm": "post_attention_layernorm",
  "mlp/gate": "mlp.gate_proj",
  "mlp/up": "mlp.up_proj",
  "mlp/down": "mlp.down_proj",
}
_LLAMA_TOP = {"embed": "model.embed_tokens", "final_norm": "model.norm", "unembed": "lm_head"}
LLAMA = Layout("model.layers.{i}.", _LLAMA_LAYER, _LLAMA_TOP)
GEMMA2 = Layout(
  "model.layers.{i}.",
  {
    **_LLAMA_LAYER,
    "attn_post_norm": "post_attention_layernorm",
    "mlp_norm": "pre_feedforward_layernorm",
    "mlp_post_norm": "post_feedforward_layernorm",
  },
  _LLAMA_TOP,
)
GPT2 = Layout(
  "transformer.h.{i}.",
  {
    "attn_norm": "ln_1",
    "attn/q": ("attn.c_attn", 0),
    "attn/k": ("attn.c_attn", 1),
    "attn/v": ("attn.c_attn", 2),
    "attn/o": "attn.c_proj",
    "mlp_norm": "ln_2",
    "mlp/up": "mlp.c_fc",
    "mlp/down": "mlp.c_proj",
  },
  {
    "embed": "transformer.wte",
    "pos_embed": "transformer.wpe",
    "final_norm": "transformer.ln_f",
    "unembed": "lm_head",
  },
  conv1d=True,
)


def layout(cfg: transformer.TransformerConfig) -> Layout:
  if cfg.norm == "layer":
    return GPT2
  return GEMMA2 if cfg.post_norms else LLAMA


def _split_path(path: str) -> tuple[bool, int | None, int | None, str]:
  """``(stacked, layer index, block, module path inside the layer or model)``: ``layers/...``
  is stacked over layers, ``layers/block_{j}/...`` over periods of an attention pattern (block
  ``j`` of each), ``layers_{i}/...`` is layer ``i`` unrolled."""
  module = path.rpartition("/")[0]
  m = re.fullmatch(r"layers/block_(\d+)/(.*)", module)
  if m:
    return True, None, int(m.group(1)), m.group(2)
  if module.startswith("layers/"):
    return True, None, None, module[len("layers/") :]
  m = re.fullmatch(r"layers_(\d+)/(.*)", module)
  if m:
    return False, int(m.group(1)), None, m.group(2)
  return False, None, None, module


def _locate(
  path: str, layer: int | None, lay: Layout, period: int | None = None
) -> tuple[str, int | None]:
  """``(Hugging Face module, part of a fused q/k/v or None)`` of a parameter path; ``layer``:
  the index along a stacked parameter's leading axis, ``period``: the attention pattern's length
  when the stack is grouped (``layers/block_{j}``)."""
  stacked, index, block, module = _split_path(path)
  if stacked or index is not None:
    if module not in lay.layer_modules:
      raise ValueError(
        f"parameter {path!r} has no Hugging Face name (a layer holds {sorted(lay.layer_modules)})"
      )
    if stacked and layer is None:
      raise ValueError(f"parameter {path!r} is stacked over layers: give its layer index")
    if block is not None:
      if period is None:
        raise ValueError(f"parameter {path!r} is stacked over pattern periods: give the period")
      index = layer * period + block
    target = lay.layer_modules[module]
    prefix = lay.layer_prefix.format(i=index if index is not None else layer)
  else:
    if module not in lay.top_modules:
      raise ValueError(
        f"parameter {path!r} has no Hugging Face name (known: "
        f"{sorted(lay.top_modules)} and layer parameters)"
      )
    target, prefix = lay.top_modules[module], ""
  name, part = target if isinstance(target, tuple) else (target, None)
  return prefix + name, part


def module_name(
  path: str, layer: int | None = None, lay: Layout = LLAMA, period: int | None = None
) -> str:
  """The Hugging Face module of the flaxseed parameter ``path`` (``layer``: the index within a
  scanned stack, for ``layers/...`` paths; see ``_locate``). Raises a ``ValueError`` for unmapped
  paths."""
  name, part = _locate(path, layer, lay, period)
  if part is not None:
    raise ValueError(f"parameter {path!r} is part of the fused module {name!r}")
  return name


def _tensor_name(path: str, layer: int | None, cfg) -> tuple[str, int | None]:
  name, part = _locate(path, layer, layout(cfg), max(1, len(cfg.attention_pattern)))
  return f"{name}.{'bias' if path.endswith('/bias') else 'weight'}", part


def _to_hf(path: str, x: np.ndarray, lay: Layout) -> np.ndarray:
  """A flaxseed parameter (one layer's) in the Hugging Face layout."""
  if path.endswith("/kernel"):
    w = x.reshape(math.prod(x.shape[: params_lib.zoo_num_in(path)]), -1)  # [I, O]
    return w if lay.conv1d else np.ascontiguousarray(w.T)
  return x.reshape(-1) if path.endswith("/bias") else x  # embeddings [V, D], norms [D]


def _from_hf(path: str, w: np.ndarray, shape: tuple[int, ...], lay: Layout) -> np.ndarray:
  if path.endswith("/kernel") and not lay.conv1d:
    w = w.T
  return w.reshape(shape)


# ------------------------------------------------------------------------------------ config


def _family(cfg: transformer.TransformerConfig) -> str:
  """The Hugging Face family of ``cfg``, or a ``ValueError`` saying what stands in the way."""
  mismatches = {}
  for name, fields in FAMILIES.items():
    bad = [
      f"{k}={getattr(cfg, k)!r} (needs {v!r})"
      for k, v in {**fields, **_COMMON}.items()
      if v is not ... and getattr(cfg, k) != v
    ]
    if not bad:
      return name
    mismatches[name] = bad
  closest = min(mismatches, key=lambda n: len(mismatches[n]))
  raise ValueError(
    f"this TransformerConfig matches no Hugging Face family; the closest, "
    f"{closest}, needs: {', '.join(mismatches[closest])}"
  )


def _rope_out(cfg) -> dict:
  params = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
  params.update(layers.parse_rope_scaling(cfg.rope_scaling) or {})
  if "original_max_position_embeddings" in params:  # a length: an int in config.json
    params["original_max_position_embeddings"] = int(params["original_max_position_embeddings"])
  return {
    "rope_theta": cfg.rope_theta,
    "rope_parameters": params,
    "rope_scaling": None if cfg.rope_scaling is None else params,
  }


def _pattern_out(cfg, family) -> tuple[str, dict]:
  """``(model_type, config keys)`` for ``cfg.attention_pattern``: Mistral is Llama with one
  sliding window on every layer; Gemma 2 lists each layer's kind."""
  specs = [
    cfg.attention_pattern[i % len(cfg.attention_pattern)] if cfg.attention_pattern else "global"
    for i in range(cfg.num_layers)
  ]
  if all(s == "global" for s in specs):
    return family, {}
  windows = {re.fullmatch(r"sliding_window:(\d+)", s) for s in specs if s != "global"}
  if None not in windows and len({m.group(1) for m in windows}) == 1:
    window = int(windows.pop().group(1))
    if family == "gemma2":
      kinds = ["full_attention" if s == "global" else "sliding_attention" for s in specs]
      return family, {"sliding_window": window, "layer_types": kinds}
    if family == "llama" and "global" not in specs:
      return "mistral", {"sliding_window": window}
  raise ValueError(
    f"attention_pattern={cfg.attention_pattern} has no {family} equivalent "
    "(Mistral: one sliding window on every layer; Gemma 2: windows and global "
    "layers)"
  )


def to_hf_config(cfg: transformer.TransformerConfig) -> dict:
  """The ``config.json`` of ``cfg``'s architecture in its Hugging Face family."""
  family = _family(cfg)
  model_type, pattern = _pattern_out(cfg, family)
  if family == "gpt2":
    return {
      "architectures": ["GPT2LMHeadModel"],
      "model_type": "gpt2",
      "vocab_size": cfg.vocab_size,
      "n_embd": cfg.d_model,
      "n_layer": cfg.num_layers,
      "n_head": cfg.num_heads,
      "n_inner": cfg.mlp_dim,
      "n_positions": cfg.max_positions,
      "activation_function": "gelu_new",
      "layer_norm_epsilon": cfg.norm_eps,
      "tie_word_embeddings": True,
      "scale_attn_weights": True,
      "torch_dtype": "float32",
    }
  arch = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
  }[model_type]
  out = {
    "architectures": [arch],
    "model_type": model_type,
    "vocab_size": cfg.vocab_size,
    "hidden_size": cfg.d_model,
    "intermediate_size": cfg.mlp_dim,
    "num_hidden_layers": cfg.num_layers,
    "num_attention_heads": cfg.num_heads,
    "num_key_value_heads": cfg.kv_heads,
    "head_dim": cfg.head_size,
    "rms_norm_eps": cfg.norm_eps,
    "tie_word_embeddings": cfg.tie_embeddings,
    "max_position_embeddings": 8192,
    "torch_dtype": "float32",
    **_rope_out(cfg),
    **pattern,
  }
  if family in ("gemma", "gemma2"):
    out["hidden_act"] = out["hidden_activation"] = "gelu_pytorch_tanh"
  else:
    out["hidden_act"] = "silu"
  if family in ("llama", "gemma", "gemma2"):
    out.update(attention_bias=False, mlp_bias=False)
  if family == "qwen2":
    out["use_sliding_window"] = False
  if family == "gemma2":
    scale = cfg.attn_scale if cfg.attn_scale is not None else cfg.head_size**-0.5
    scalar = round(scale**-2)  # transformers wants an int
    if abs(scalar * scale**2 - 1) > 1e-6:
      raise ValueError(
        f"attn_scale={cfg.attn_scale} is not 1/sqrt(an integer), which Gemma 2's "
        "query_pre_attn_scalar must be"
      )
    out.update(
      query_pre_attn_scalar=scalar,
      final_logit_softcapping=cfg.logit_soft_cap,
      attn_logit_softcapping=cfg.attn_logit_soft_cap,
    )
    out.setdefault("sliding_window", None)
    out.setdefault("layer_types", ["full_attention"] * cfg.num_layers)
  return out


def _require(hf: dict, key: str, allowed, default=None):
  value = hf.get(key, default)
  if value not in allowed:
    raise ValueError(f"config.json: {key}={value!r} is not supported (supported: {allowed})")
  return value


def _rope_in(hf: dict) -> dict:
  """``rope_theta`` and ``rope_scaling`` from either spelling (``rope_parameters`` since
  transformers 5, ``rope_scaling`` + ``rope_theta`` before)."""
  rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  kind = rope.pop("rope_type", rope.pop("type", "default"))
  theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10_000.0)))
  if kind == "default":
    return {"rope_theta": theta}
  if kind not in layers.ROPE_SCALINGS:
    raise ValueError(
      f"config.json: rope_type={kind!r} is not supported (supported: default, "
      f"{', '.join(layers.ROPE_SCALINGS)})"
    )
  fields = {k: v for k, v in rope.items() if k in layers.ROPE_SCALINGS[kind]}
  spec = kind + ":" + ",".join(f"{k}={v}" for k, v in sorted(fields.items()))
  layers.parse_rope_scaling(spec)  # raises, naming a bad field
  return {"rope_theta": theta, "rope_scaling": spec}


def _period(kinds: list) -> list:
  """The shortest prefix that repeats to make ``kinds`` (the scanned unit of the pattern)."""
  for p in range(1, len(kinds) + 1):
    if len(kinds) % p == 0 and kinds == kinds[:p] * (len(kinds) // p):
      return kinds[:p]
  return kinds


def from_hf_config(hf: dict, **overrides) -> transformer.TransformerConfig:
  """The ``TransformerConfig`` of a Hugging Face ``config.json`` dict (``overrides``: extra
  fields such as ``scan_layers`` or ``dtype``). A required key it lacks is a ``ValueError``
  naming it."""
  try:
    return _from_hf_config(hf, **overrides)
  except KeyError as e:
    raise ValueError(
      f"config.json has no {e.args[0]!r} (needed for model_type={hf.get('model_type')!r})"
    ) from None


def _from_hf_config(hf: dict, **overrides) -> transformer.TransformerConfig:
  model_type = _require(hf, "model_type", MODEL_TYPES)
  if model_type == "gpt2":
    for key, want in (
      ("scale_attn_weights", True),
      ("scale_attn_by_inverse_layer_idx", False),
      ("add_cross_attention", False),
    ):
      _require(hf, key, (want,), want)
    _require(hf, "activation_function", ("gelu_new", "gelu_pytorch_tanh"), "gelu_new")
    width = hf["n_embd"]
    fields = dict(
      FAMILIES["gpt2"],
      vocab_size=hf["vocab_size"],
      d_model=width,
      num_layers=hf["n_layer"],
      num_heads=hf["n_head"],
      mlp_dim=hf.get("n_inner") or 4 * width,
      max_positions=hf["n_positions"],
      norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
    )
    return transformer.TransformerConfig(**{**fields, **overrides})

  family = "llama" if model_type == "mistral" else model_type
  fields = {k: v for k, v in FAMILIES[family].items() if v is not ...}
  if family in ("gemma", "gemma2"):
    act = hf.get("hidden_activation") or hf.get("hidden_act")
    _require({"hidden_act": act}, "hidden_act", ("gelu_pytorch_tanh", "gelu_new"))
  else:
    _require(hf, "hidden_act", ("silu",), "silu")
  for key in ("attention_bias", "mlp_bias"):
    if family != "qwen2":
      _require(hf, key, (False,), False)
  heads, width = hf["num_attention_heads"], hf["hidden_size"]
  kv_heads, head_dim = hf.get("num_key_value_heads") or heads, hf.get("head_dim") or width // heads
  fields.update(
    vocab_size=hf["vocab_size"],
    d_model=width,
    mlp_dim=hf["intermediate_size"],
    num_layers=hf["num_hidden_layers"],
    num_heads=heads,
    num_kv_heads=None if kv_heads == heads else kv_heads,  # the config's own defaults
    head_dim=None if head_dim * heads == width else head_dim,
    tie_embeddings=bool(hf.get("tie_word_embeddings", family.startswith("gemma"))),
    norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
    **_rope_in(hf),
  )
  window = hf.get("sliding_window")
  if model_type == "mistral" and window is not None:
    fields["attention_pattern"] = (f"sliding_window:{window}",)
  elif model_type == "qwen2":
    _require(hf, "use_sliding_window", (False,), False)
  elif model_type == "gemma2":
    kinds = hf.get("layer_types")
    if kinds is None:  # Gemma 2's default: sliding and global layers alternate
      kinds = (["sliding_attention", "full_attention"] * fields["num_layers"])[
        : fields["num_layers"]
      ]
    elif len(kinds) != fields["num_layers"]:  # never cut or padded to fit
      raise ValueError(
        f"config.json: layer_types has {len(kinds)} entries but num_hidden_layers="
        f"{fields['num_layers']}"
      )
    for kind in kinds:
      _require({"layer_types": kind}, "layer_types", ("sliding_attention", "full_attention"))
    if "sliding_attention" in kinds:
      fields["attention_pattern"] = tuple(
        f"sliding_window:{window}" if k == "sliding_attention" else "global" for k in _period(kinds)
      )
    fields.update(
      attn_scale=float(hf.get("query_pre_attn_scalar", head_dim)) ** -0.5,
      logit_soft_cap=hf.get("final_logit_softcapping"),
      attn_logit_soft_cap=hf.get("attn_logit_softcapping"),
    )
  elif window is not None and family != "gemma":
    raise ValueError(f"config.json: sliding_window={window!r} is not supported for {model_type}")
  return transformer.TransformerConfig(**{**fields, **overrides})


# ----------------------------------------------------------------------------- state dicts


def to_state_dict(params, cfg: transformer.TransformerConfig) -> dict[str, np.ndarray]:
  """Hugging Face tensor name -> float32 array of a transformer's ``params``."""
  lay, out, fused = layout(cfg), {}, {}
  for key_path, leaf in jax.tree_util.tree_leaves_with_path(nn.unbox(params)):
    path, leaf = params_lib.path_string(key_path), np.asarray(leaf, np.float32)
    stacked = _split_path(path)[0]
    for i, x in enumerate(leaf) if stacked else [(None, leaf)]:
      name, part = _tensor_name(path, i, cfg)
      if part is None:
        out[name] = _to_hf(path, x, lay)
      else:
        fused.setdefault(name, {})[part] = _to_hf(path, x, lay)
  for name, parts in fused.items():  # [I, 3 O] weights, [3 O] biases
    out[name] = np.concatenate([parts[p] for p in range(3)], axis=-1)
  return out


def _reader(tensors, cfg, source="checkpoint"):
  """``read(path, layer, shape)``: one parameter (one layer of it) from ``tensors``."""
  lay = layout(cfg)

  def read(path, layer, shape):
    name, part = _tensor_name(path, layer, cfg)
    if name not in tensors:
      raise ValueError(f"{source} has no tensor {name!r} (for parameter {path!r})")
    w = np.asarray(tensors[name], np.float32)
    if part is not None:  # one third of a fused q/k/v along the output columns
      w = np.split(w, 3, axis=-1)[part]
    if w.size != math.prod(shape):
      raise ValueError(f"tensor {name!r} has shape {w.shape}; parameter {path!r} needs {shape}")
    return _from_hf(path, w, shape, lay)

  return read


# Tensors a checkpoint may hold that no parameter reads (``_unread``): rotary caches of older
# RoPE-family exports, GPT-2's causal-mask buffers; ``lm_head.weight`` when tied is handled there.
_ROPE_BUFFERS = r"model\.(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq"
_GPT2_BUFFERS = r"transformer\.h\.\d+\.attn\.(bias|masked_bias)"


def _unread(names, boxed, cfg) -> list[str]:
  """The tensor ``names`` that no parameter of ``boxed`` reads, less the allowed buffers and,
  with tied embeddings, ``lm_head.weight`` (a copy of the embedding)."""
  wanted = set()
  for key_path, x in jax.tree_util.tree_leaves_with_path(nn.unbox(boxed)):
    path = params_lib.path_string(key_path)
    for i in range(x.shape[0]) if _split_path(path)[0] else [None]:
      wanted.add(_tensor_name(path, i, cfg)[0])
  buffers = _GPT2_BUFFERS if layout(cfg).conv1d else _ROPE_BUFFERS
  return sorted(
    n
    for n in names
    if n not in wanted
    and not re.fullmatch(buffers, n)
    and not (n == "lm_head.weight" and cfg.tie_embeddings)
  )


def _summary(names: list[str], limit: int = 6) -> str:
  """``names`` with each layer's tensors as one ``prefix.{i}.*`` entry, at most ``limit``."""
  groups = {}
  for n in names:
    m = re.match(r"(.*?\.(?:layers|h)\.)(\d+)\.", n)
    key = (m.group(1), int(m.group(2))) if m else (n, -1)
    groups.setdefault(key, []).append(n)
  items = [
    f"{prefix}{i}.* ({len(g)} tensors)" if i >= 0 else prefix
    for (prefix, i), g in sorted(groups.items())
  ]
  more = f", and {len(items) - limit} more" if len(items) > limit else ""
  return ", ".join(items[:limit]) + more


def from_state_dict(
  model: transformer.Transformer,
  tensors,
  *,
  mesh=None,
  rules=sh.DEFAULT_RULES,
  source: str = "checkpoint",
  abstract=None,
) -> dict:
  """``params`` of ``model`` from ``tensors`` (name -> array; a mapping read lazily is fine).

  With a ``jax.sharding.Mesh``, each parameter goes straight to its sharded device arrays
  (``rules``: logical axis rules): every device's shard is cut from one tensor (one layer's, for
  stacked parameters) at a time on the host, so no host holds the model, nor a whole stack of
  layers. Missing names and names no parameter reads (extra layers: a config that does not match
  the weights) raise a ``ValueError`` naming ``source``; rotary caches, GPT-2's attention-mask
  buffers and a tied ``lm_head.weight`` are ignored.
  """
  cfg = model.config
  if abstract is None:
    boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    shardings = None
    if mesh is not None:
      shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    abstract = nn.unbox(boxed)
  else:  # shapes and shardings given (a training setup's abstract parameters)
    shardings = jax.tree.map(lambda a: a.sharding, abstract)
  unread = _unread(tensors.keys(), abstract, cfg)
  if unread:
    raise ValueError(
      f"{source}: no parameter of this config (num_layers={cfg.num_layers}, "
      f"tie_embeddings={cfg.tie_embeddings}) reads {len(unread)} of its tensors: "
      f"{_summary(unread)}; does the config match the weights?"
    )
  read = _reader(tensors, cfg, source)

  def host(path, shape, index=None):
    """The parameter (``index``: the part of it that one device holds) as a host array; a
    stacked one is read layer by layer, so the host holds one layer's tensor at a time."""
    index = index or tuple(slice(None) for _ in shape)
    if not _split_path(path)[0]:
      return read(path, None, shape)[index]
    return np.stack([read(path, i, shape[1:])[index[1:]] for i in range(shape[0])[index[0]]])

  def leaf(key_path, x):
    path = params_lib.path_string(key_path)
    if shardings is None:
      return jnp.asarray(host(path, x.shape))
    return jax.make_array_from_callback(
      x.shape, params_lib.get(shardings, path), lambda index: host(path, x.shape, index)
    )

  return jax.tree_util.tree_map_with_path(leaf, abstract)


# ---------------------------------------------------------------------------------- folders


class _Tensors:
  """name -> array over one or several safetensors files, read on access."""

  def __init__(self, directory: str):
    from safetensors import SafetensorError  # pylint: disable=g-import-not-at-top
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top

    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
      weight_map = _read_json(index).get("weight_map")
      if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: no 'weight_map' object (tensor name -> file)")
      files = sorted(set(weight_map.values()))
    else:
      files = [n for n in sorted(os.listdir(directory)) if n.endswith(".safetensors")]
    if not files:
      raise ValueError(f"{directory}: no *.safetensors files")
    self._handles = []
    for n in files:
      path = os.path.join(directory, n)
      try:  # framework="flax" reads bf16 (numpy has no bfloat16); arrays are upcast on read.
        self._handles.append(safe_open(path, framework="flax"))
      except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: cannot be read as safetensors: {e}") from e
    self._where = {k: h for h in self._handles for k in h.keys()}

  def keys(self):
    return self._where.keys()

  def __contains__(self, name):
    return name in self._where

  def __getitem__(self, name):
    return np.asarray(self._where[name].get_tensor(name).astype(jnp.float32))


def from_pretrained(directory: str, *, mesh=None, rules=sh.DEFAULT_RULES, **overrides):
  """``(model, params)`` from a local Hugging Face folder (``config.json`` + safetensors).
  ``mesh``/``rules``: place the parameters sharded (see ``from_state_dict``); ``overrides``:
  ``TransformerConfig`` fields (``scan_layers``, ``dtype``, ...)."""
  model = transformer.Transformer(model_config(directory, **overrides))
  return model, load_params(model, directory, mesh=mesh, rules=rules)


def model_config(directory: str, **overrides) -> transformer.TransformerConfig:
  """The ``TransformerConfig`` of the folder's ``config.json`` (``overrides``: fields of it)."""
  path = os.path.join(directory, "config.json")
  if not os.path.exists(path):
    raise ValueError(f"{directory}: no config.json (flaxseed reads local Hugging Face folders)")
  return from_hf_config(_read_json(path), **overrides)


def is_folder(path: str) -> bool:
  """Whether ``path`` is a Hugging Face model folder (``config.json`` and safetensors files) rather
  than a flaxseed run's workdir (which has ``checkpoints/``)."""
  return (
    os.path.isdir(path)
    and os.path.isfile(os.path.join(path, "config.json"))
    and not os.path.isdir(os.path.join(path, "checkpoints"))
    and any(n.endswith(".safetensors") for n in os.listdir(path))
  )


# Fields that change how a model runs, never its weights or what it computes.
_EXECUTION_FIELDS = (
  "kv_cache",
  "kv_cache_dtype",
  "dtype",
  "scan_layers",
  "remat_policy",
  "attention_impl",
  "attention_interpret",
  "quant",
)


def _canonical(cfg: transformer.TransformerConfig) -> dict:
  fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _EXECUTION_FIELDS}
  fields.update(num_kv_heads=cfg.kv_heads, head_dim=cfg.head_size)
  fields["attention_pattern"] = tuple(fields["attention_pattern"])
  return fields


def check_matches(directory: str, cfg: transformer.TransformerConfig, what: str) -> None:
  """A ``ValueError`` naming ``what`` and every differing field unless the folder's
  ``config.json`` describes the model ``cfg`` describes (up to how it runs: dtype, scanning,
  rematerialization, attention kernel); read before anything compiles."""
  folder = model_config(directory)
  have, want = _canonical(folder), _canonical(cfg)
  diffs = [f"{k}: folder {have[k]!r}, config {want[k]!r}" for k in have if have[k] != want[k]]
  if diffs:
    raise ValueError(
      f"{what}={directory!r}: its config.json describes another model than config.model: "
      + "; ".join(diffs)
    )


def load_params(
  model: transformer.Transformer,
  directory: str,
  *,
  mesh=None,
  rules=sh.DEFAULT_RULES,
  abstract=None,
):
  """``model``'s parameters from the Hugging Face folder ``directory`` (see ``from_state_dict``;
  ``abstract``: a tree of ``jax.ShapeDtypeStruct`` with shardings to place them in)."""
  return from_state_dict(
    model, _Tensors(directory), mesh=mesh, rules=rules, source=directory, abstract=abstract
  )


def _read_json(path: str) -> dict:
  """The JSON object in ``path``, or a ``ValueError`` naming the file and what is wrong."""
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: not valid JSON: {e}") from e
  if not isinstance(value, dict):
    raise ValueError(f"{path}: not a JSON object (got a {type(value).__name__})")
  return value


def tokenizer_file(directory: str) -> str | None:
  """The folder's ``tokenizer.json`` or SentencePiece ``tokenizer.model`` (``None``: neither)."""
  for name in ("tokenizer.json", "tokenizer.model"):
    if os.path.isfile(os.path.join(directory, name)):
      return os.path.join(directory, name)
  return None


def tokenizer(directory: str):
  """The folder's tokenizer (``tokenizer_file``); a ``ValueError`` when it has none."""
  path = tokenizer_file(directory)
  if path is None:
    raise ValueError(f"{directory}: no tokenizer.json or tokenizer.model")
  return tokenizers.load(path, key=path)


def to_pretrained(model: transformer.Transformer, params, directory: str) -> None:
  """Writes ``config.json`` and ``model.safetensors`` (float32) that ``transformers`` loads as
  the family's ``*ForCausalLM`` (``to_hf_config`` names it)."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  config = to_hf_config(model.config)
  tensors = to_state_dict(params, model.config)
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2)
  save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})


def to_peft(
  adapters, cfg: lora.LoraConfig, directory: str, *, base_model_name_or_path: str | None = None
) -> None:
  """Writes LoRA ``adapters`` (``models/lora.py``) as ``adapter_model.safetensors`` and
  ``adapter_config.json`` in peft's layout, for a transformer in the Llama layout
  (``to_pretrained`` writes the base; with ``init="pissa"`` the base to pair is the residual the
  adapters were trained on).

  peft stores ``lora_A.weight = a^T [r, I]``, ``lora_B.weight = b^T [O, r]`` and DoRA's
  ``lora_magnitude_vector [O]`` per module, under ``base_model.model.<module>``; scanned layers
  are split into one module per layer.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  tensors, modules = {}, set()
  for path, entry in lora.entries(adapters).items():
    entry = {k: np.asarray(v, np.float32) for k, v in entry.items()}
    layer_ids = range(entry["a"].shape[0]) if params_lib.zoo_stacked(path) else [None]
    for i in layer_ids:
      pick = (lambda x: x) if i is None else (lambda x, i=i: x[i])  # noqa: E731
      name = "base_model.model." + module_name(path, i)
      modules.add(name.rsplit(".", 1)[-1])
      tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(pick(entry["a"]).T)
      tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(pick(entry["b"]).T)
      if "magnitude" in entry:
        tensors[f"{name}.lora_magnitude_vector"] = pick(entry["magnitude"]).reshape(-1)
  config = {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "r": cfg.rank,
    "lora_alpha": cfg.alpha,
    "target_modules": sorted(modules),
    "use_rslora": cfg.variant == "rslora",
    "use_dora": cfg.variant == "dora",
    "init_lora_weights": True,
    "lora_dropout": 0.0,
    "bias": "none",
    "fan_in_fan_out": False,
    "modules_to_save": None,
    "inference_mode": True,
    "base_model_name_or_path": base_model_name_or_path,
  }
  os.makedirs(directory, exist_ok=True)
  save_file(
    tensors, os.path.join(directory, "adapter_model.safetensors"), metadata={"format": "pt"}
  )
  with open(os.path.join(directory, "adapter_config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2)
