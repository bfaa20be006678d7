"""Hugging Face checkpoints in and out (local folders only): the Llama layout.

    from flaxseed.models import hf
    model, params = hf.from_pretrained("/path/to/dir")   # config.json + *.safetensors (sharded too)
    hf.to_pretrained(model, params, "/path/to/out")      # config.json + model.safetensors

The zoo's transformer is Llama-shaped (pre-norm RMSNorm, rotate-half RoPE, SwiGLU, no biases), so a
Llama checkpoint maps onto it name by name:

    flaxseed (per layer)          Hugging Face (``model.layers.{i}.``)
    attn_norm/scale               input_layernorm.weight
    attn/{q,k,v}/kernel [D,H,E]   self_attn.{q,k,v}_proj.weight [H*E, D]
    attn/o/kernel [H,E,D]         self_attn.o_proj.weight [D, H*E]
    mlp_norm/scale                post_attention_layernorm.weight
    mlp/{gate,up,down}/kernel     mlp.{gate,up,down}_proj.weight (transposed)
    embed/embedding, final_norm/scale, unembed/kernel: model.embed_tokens, model.norm, lm_head

A kernel ``[in..., out...]`` is the matrix ``W [I, O]`` (``quantize.zoo_num_in`` says which axes
are inputs) and Hugging Face stores ``W^T [O, I]``; no permutation of q/k is needed because both
use the rotate-half RoPE layout. Layers may be scanned (``layers/...`` with a leading layer axis)
or unrolled (``layers_{i}/...``). ``module_name`` is the one place that maps a parameter path to a
Hugging Face module; ``lora.to_peft`` uses it for adapters.

Supported ``model_type``: ``llama`` and ``mistral`` (without a sliding window), no rope scaling,
no biases. Anything else raises a ``ValueError`` naming the field; Qwen2, Gemma and GPT-2 (biases,
norm offsets, LayerNorm, learned positions) are the next families. Parameters are float32 (bf16
files are upcast). ``safetensors`` is the one extra dependency (the ``hf`` extra).
"""

import json
import math
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxseed.models import quantize
from flaxseed.models import transformer

MODEL_TYPES = ("llama", "mistral")

# flaxseed path inside one layer -> Hugging Face module inside ``model.layers.{i}``.
LAYER_MODULES = {
    "attn_norm/scale": "input_layernorm",
    "attn/q/kernel": "self_attn.q_proj",
    "attn/k/kernel": "self_attn.k_proj",
    "attn/v/kernel": "self_attn.v_proj",
    "attn/o/kernel": "self_attn.o_proj",
    "mlp_norm/scale": "post_attention_layernorm",
    "mlp/gate/kernel": "mlp.gate_proj",
    "mlp/up/kernel": "mlp.up_proj",
    "mlp/down/kernel": "mlp.down_proj",
}
TOP_MODULES = {"embed/embedding": "model.embed_tokens", "final_norm/scale": "model.norm",
               "unembed/kernel": "lm_head"}


def _layer_path(path: str) -> tuple[bool, int | None, str]:
  """``(stacked, layer index or None, path inside the layer)`` of a parameter path."""
  if path.startswith("layers/"):
    return True, None, path[len("layers/"):]
  m = re.match(r"layers_(\d+)/(.*)", path)
  if m:
    return False, int(m.group(1)), m.group(2)
  return False, None, path


def module_name(path: str, layer: int | None = None) -> str:
  """The Hugging Face module of the flaxseed parameter ``path`` (``layer``: the index within a
  scanned stack, for ``layers/...`` paths). Raises a ``ValueError`` for unmapped paths."""
  stacked, index, inner = _layer_path(path)
  if stacked or index is not None:
    if inner not in LAYER_MODULES:
      raise ValueError(f"parameter {path!r} has no Hugging Face Llama name (a layer holds "
                       f"{sorted(LAYER_MODULES)})")
    if stacked and layer is None:
      raise ValueError(f"parameter {path!r} is stacked over layers: give its layer index")
    return f"model.layers.{index if index is not None else layer}.{LAYER_MODULES[inner]}"
  if path not in TOP_MODULES:
    raise ValueError(f"parameter {path!r} has no Hugging Face Llama name (known: "
                     f"{sorted(TOP_MODULES)} and layer parameters)")
  return TOP_MODULES[path]


def _to_hf(path: str, x: np.ndarray) -> np.ndarray:
  if not path.endswith("/kernel"):
    return x  # embeddings [V, D] and norm scales: the same layout
  num_in = quantize.zoo_num_in(path)
  return np.ascontiguousarray(x.reshape(math.prod(x.shape[:num_in]), -1).T)


def _from_hf(path: str, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  if not path.endswith("/kernel"):
    return w.reshape(shape)
  return w.T.reshape(shape)


# ------------------------------------------------------------------------------------ config

def to_hf_config(cfg: transformer.TransformerConfig) -> dict:
  """The ``config.json`` of a Llama with ``cfg``'s architecture."""
  unsupported = {"mlp_activation": cfg.mlp_activation != "swiglu", "causal": not cfg.causal,
                 "logit_soft_cap": cfg.logit_soft_cap is not None,
                 "attn_logit_soft_cap": cfg.attn_logit_soft_cap is not None,
                 "attention_pattern": bool(cfg.attention_pattern), "quant": cfg.quant is not None}
  for name, bad in unsupported.items():
    if bad:
      raise ValueError(f"TransformerConfig.{name}={getattr(cfg, name)!r} has no Llama "
                       "equivalent (hf supports the plain causal SwiGLU transformer)")
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
      "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.kv_heads,
      "head_dim": cfg.head_size, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
      "rope_theta": cfg.rope_theta, "rope_scaling": None,
      "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "mlp_bias": False,
      "max_position_embeddings": 4096, "torch_dtype": "float32",
  }


def from_hf_config(hf: dict, **overrides) -> transformer.TransformerConfig:
  """The ``TransformerConfig`` of a Hugging Face ``config.json`` dict (``overrides``: extra
  fields such as ``scan_layers`` or ``dtype``)."""
  model_type = hf.get("model_type")
  if model_type not in MODEL_TYPES:
    raise ValueError(f"config.json: model_type={model_type!r} is not supported; hf reads "
                     f"{MODEL_TYPES}")
  rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
  if rope.get("rope_type", rope.get("type", "default")) != "default":
    raise ValueError(f"config.json: rope scaling {rope} is not supported yet")
  for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False),
                    ("sliding_window", None)):
    if hf.get(key, want) != want:
      raise ValueError(f"config.json: {key}={hf[key]!r} is not supported (needs {want!r})")
  heads, width = hf["num_attention_heads"], hf["hidden_size"]
  kv_heads, head_dim = hf.get("num_key_value_heads") or heads, hf.get("head_dim") or width // heads
  theta = hf.get("rope_theta", rope.get("rope_theta", 10_000.0))
  fields = dict(
      vocab_size=hf["vocab_size"], d_model=width, mlp_dim=hf["intermediate_size"],
      num_layers=hf["num_hidden_layers"], num_heads=heads,
      num_kv_heads=None if kv_heads == heads else kv_heads,  # the config's own defaults
      head_dim=None if head_dim * heads == width else head_dim, mlp_activation="swiglu",
      rope_theta=float(theta), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)))
  fields.update(overrides)
  return transformer.TransformerConfig(**fields)


# ----------------------------------------------------------------------------- state dicts

def to_state_dict(params) -> dict[str, np.ndarray]:
  """Hugging Face tensor name -> float32 array of a transformer's ``params``."""
  out = {}
  for key_path, leaf in jax.tree_util.tree_leaves_with_path(nn.unbox(params)):
    path, leaf = quantize.path_string(key_path), np.asarray(leaf, np.float32)
    stacked, _, _ = _layer_path(path)
    for i, x in enumerate(leaf) if stacked else [(None, leaf)]:
      out[module_name(path, i) + ".weight"] = _to_hf(path, x)
  return out


def from_state_dict(model: transformer.Transformer, tensors) -> dict:
  """``params`` of ``model`` from ``tensors`` (name -> array; a mapping read lazily is fine).
  Missing names raise a ``ValueError``; extra ones (e.g. rotary caches) are ignored."""
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  abstract = nn.unbox(abstract["params"])

  def read(name, path, shape):
    if name not in tensors:
      raise ValueError(f"checkpoint has no tensor {name!r} (for parameter {path!r})")
    w = np.asarray(tensors[name], np.float32)
    want = math.prod(shape)
    if w.size != want:
      raise ValueError(f"tensor {name!r} has shape {w.shape}; parameter {path!r} needs "
                       f"{shape}")
    return _from_hf(path, w, shape)

  def leaf(key_path, x):
    path = quantize.path_string(key_path)
    stacked, _, _ = _layer_path(path)
    if not stacked:
      return jnp.asarray(read(module_name(path) + ".weight", path, x.shape))
    return jnp.asarray(np.stack([read(module_name(path, i) + ".weight", path, x.shape[1:])
                                 for i in range(x.shape[0])]))

  return jax.tree_util.tree_map_with_path(leaf, abstract)


# ---------------------------------------------------------------------------------- folders

class _Tensors:
  """name -> array over one or several safetensors files, read on access."""

  def __init__(self, directory: str):
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
      with open(index, encoding="utf-8") as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    else:
      files = [n for n in sorted(os.listdir(directory)) if n.endswith(".safetensors")]
    if not files:
      raise ValueError(f"{directory}: no *.safetensors files")
    # framework="flax" reads bf16 (numpy has no bfloat16); arrays are upcast on read.
    self._handles = [safe_open(os.path.join(directory, n), framework="flax") for n in files]
    self._where = {k: h for h in self._handles for k in h.keys()}

  def __contains__(self, name):
    return name in self._where

  def __getitem__(self, name):
    return np.asarray(self._where[name].get_tensor(name).astype(jnp.float32))


def from_pretrained(directory: str, **overrides):
  """``(model, params)`` from a local Hugging Face folder (``config.json`` + safetensors).
  ``overrides``: ``TransformerConfig`` fields (``scan_layers``, ``dtype``, ...)."""
  path = os.path.join(directory, "config.json")
  if not os.path.exists(path):
    raise ValueError(f"{directory}: no config.json (hf.from_pretrained reads local folders)")
  with open(path, encoding="utf-8") as f:
    model = transformer.Transformer(from_hf_config(json.load(f), **overrides))
  return model, from_state_dict(model, _Tensors(directory))


def to_pretrained(model: transformer.Transformer, params, directory: str) -> None:
  """Writes ``config.json`` and ``model.safetensors`` (float32) that ``transformers`` loads as
  ``LlamaForCausalLM``."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  config = to_hf_config(model.config)
  tensors = to_state_dict(params)
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2)
  save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
