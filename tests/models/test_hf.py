"""Hugging Face checkpoints in and out (Llama, Mistral, Qwen2, Gemma, Gemma 2, GPT-2) and peft
adapter export.

Round trips run everywhere; the parity tests against ``transformers`` and ``peft`` run where
they are installed (the ``torch`` extra) and skip otherwise.
"""

import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxseed.models import hf
from flaxseed.models import lora
from flaxseed.models import transformer

pytest.importorskip("safetensors")

TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 12)), jnp.int32)


def _model(**kw):
  cfg = transformer.TransformerConfig(
    **{
      "vocab_size": 97,
      "d_model": 48,
      "num_layers": 2,
      "num_heads": 4,
      "num_kv_heads": 2,
      "mlp_dim": 80,
      "tie_embeddings": False,
      "norm_eps": 1e-5,
      "rope_theta": 500.0,
      **kw,
    }
  )
  model = transformer.Transformer(cfg)
  params = model.init(jax.random.key(0), TOKENS)["params"]
  # Norm scales and biases away from their init, so a wrong mapping of them shows.
  params = jax.tree_util.tree_map_with_path(
    lambda kp, x: (
      x + 0.1 * jax.random.normal(jax.random.key(len(kp)), x.shape)
      if re.search("scale|bias", jax.tree_util.keystr(kp))
      else x
    ),
    nn.unbox(params),
  )
  return model, params


# The transformer fields of each family (tiny shapes from _model), and its model_type.
FAMILIES = {
  "llama": ("llama", dict(rope_scaling="llama3:factor=8,original_max_position_embeddings=8")),
  "mistral": ("mistral", dict(attention_pattern=("sliding_window:4",))),
  "qwen2": ("qwen2", dict(biases="qkv")),
  "gemma": (
    "gemma",
    dict(
      norm_offset=1.0, embed_scale=True, mlp_activation="geglu", tie_embeddings=True, head_dim=16
    ),
  ),
  "gemma2": (
    "gemma2",
    dict(
      norm_offset=1.0,
      embed_scale=True,
      mlp_activation="geglu",
      tie_embeddings=True,
      head_dim=16,
      post_norms=True,
      logit_soft_cap=3.0,
      attn_logit_soft_cap=5.0,
      attn_scale=0.2,
      attention_pattern=("sliding_window:4", "global"),
    ),
  ),
  "gpt2": (
    "gpt2",
    dict(
      norm="layer",
      position_embedding="learned",
      max_positions=32,
      biases="all",
      mlp_activation="gelu",
      tie_embeddings=True,
      num_kv_heads=None,
      rope_theta=10_000.0,
    ),
  ),
}


def _adapters(params, cfg, seed=3):
  adapters = lora.init(jax.random.key(2), params, cfg)
  leaves, tree = jax.tree.flatten(adapters)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(
    tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  )


@pytest.mark.parametrize(
  "kw", [dict(scan_layers=True), dict(scan_layers=False, tie_embeddings=True)]
)
def test_round_trip_gives_the_same_parameters(tmp_path, kw):
  model, params = _model(**kw)
  hf.to_pretrained(model, params, str(tmp_path))
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["model_type"] == "llama" and config["num_key_value_heads"] == 2
  loaded_model, loaded = hf.from_pretrained(str(tmp_path), scan_layers=kw["scan_layers"])
  assert loaded_model.config == model.config
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # bf16 files (most published checkpoints) load upcast to float32.
  from safetensors import flax as st_flax  # pylint: disable=g-import-not-at-top

  bf16 = {
    k: v.astype(jnp.bfloat16)
    for k, v in st_flax.load_file(str(tmp_path / "model.safetensors")).items()
  }
  st_flax.save_file(bf16, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  _, loaded = hf.from_pretrained(str(tmp_path), scan_layers=kw["scan_layers"])
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
    assert b.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(a.astype(jnp.bfloat16).astype(jnp.float32)), b)
  # Scanned <-> unrolled through the checkpoint: the same function.
  other_model, other = hf.from_pretrained(str(tmp_path), scan_layers=not kw["scan_layers"])
  np.testing.assert_allclose(
    other_model.apply({"params": other}, TOKENS), model.apply({"params": loaded}, TOKENS), atol=1e-5
  )


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_round_trips(tmp_path, family):
  model_type, kw = FAMILIES[family]
  model, params = _model(scan_layers=family != "gpt2", **kw)
  hf.to_pretrained(model, params, str(tmp_path))
  assert json.loads((tmp_path / "config.json").read_text())["model_type"] == model_type
  loaded_model, loaded = hf.from_pretrained(str(tmp_path), scan_layers=family != "gpt2")
  assert loaded_model.config == model.config
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_loads_sharded_on_a_mesh(tmp_path):
  model, params = _model(biases="qkv", vocab_size=96)
  hf.to_pretrained(model, params, str(tmp_path))
  mesh = jax.make_mesh(
    (2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Explicit,) * 3
  )
  _, sharded = hf.from_pretrained(str(tmp_path), mesh=mesh)
  q = sharded["layers"]["attn"]["q"]["kernel"]  # [layers, D, H, E]: D over fsdp, H over tensor
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  assert q.addressable_shards[0].data.shape == (2, 24, 2, 12)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(sharded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_tokenizer_from_the_folder(tmp_path):
  pytest.importorskip("tokenizers")
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
  from tokenizers import models  # pylint: disable=g-import-not-at-top
  from tokenizers import pre_tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import trainers  # pylint: disable=g-import-not-at-top

  with pytest.raises(ValueError, match="no tokenizer.json or tokenizer.model"):
    hf.tokenizer(str(tmp_path))
  tok = Tokenizer(models.BPE(unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.train_from_iterator(
    ["hello world"] * 20, trainers.BpeTrainer(vocab_size=40, special_tokens=["[UNK]"])
  )
  tok.save(str(tmp_path / "tokenizer.json"))
  loaded = hf.tokenizer(str(tmp_path))
  assert loaded.decode(loaded.encode("hello world")).replace(" ", "") == "helloworld"


def test_peft_export_layout(tmp_path):
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

  model, params = _model()
  cfg = lora.LoraConfig(rank=4, alpha=8, targets=r".*(attn/(q|o)|mlp/down)/kernel", variant="dora")
  adapters = _adapters(params, cfg)
  hf.to_peft(adapters, cfg, str(tmp_path), base_model_name_or_path="base")
  config = json.loads((tmp_path / "adapter_config.json").read_text())
  assert config["target_modules"] == ["down_proj", "o_proj", "q_proj"]
  assert config["use_dora"] and config["r"] == 4 and config["lora_alpha"] == 8
  tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
  assert len(tensors) == 2 * 3 * 3  # layers x modules x (A, B, magnitude)
  prefix = "base_model.model.model.layers.1."
  assert tensors[prefix + "self_attn.q_proj.lora_A.weight"].shape == (4, 48)
  assert tensors[prefix + "self_attn.q_proj.lora_B.weight"].shape == (48, 4)  # H * E outputs
  assert tensors[prefix + "self_attn.o_proj.lora_A.weight"].shape == (4, 48)
  assert tensors[prefix + "mlp.down_proj.lora_A.weight"].shape == (4, 80)
  assert tensors[prefix + "mlp.down_proj.lora_magnitude_vector"].shape == (48,)
  np.testing.assert_array_equal(
    tensors[prefix + "self_attn.q_proj.lora_A.weight"],
    np.asarray(adapters["layers"]["attn"]["q"]["kernel"]["a"][1]).T,
  )


def test_unsupported_configs_are_refused(tmp_path):
  with pytest.raises(
    ValueError, match=r"closest, llama, needs: mlp_activation='gelu' \(needs 'swiglu'\)"
  ):
    hf.to_hf_config(transformer.TransformerConfig(mlp_activation="gelu"))
  with pytest.raises(ValueError, match="attention_pattern"):
    hf.to_hf_config(transformer.TransformerConfig(attention_pattern=("chunked_causal:4",)))
  base = hf.to_hf_config(transformer.TransformerConfig())
  for key, value, match in (
    ("model_type", "t5", "model_type='t5'"),
    ("attention_bias", True, "attention_bias"),
    ("hidden_act", "gelu", "hidden_act='gelu'"),
    ("rope_parameters", {"rope_type": "yarn", "factor": 8.0}, "yarn"),
    ("rope_parameters", {"rope_type": "linear"}, "factor"),
  ):
    with pytest.raises(ValueError, match=match):
      hf.from_hf_config({**base, key: value})
  with pytest.raises(ValueError, match="use_sliding_window"):
    hf.from_hf_config({**base, "model_type": "qwen2", "use_sliding_window": True})
  with pytest.raises(ValueError, match=r"config.json has no 'hidden_size' \(needed for model_type"):
    hf.from_hf_config({k: v for k, v in base.items() if k != "hidden_size"})
  gemma2 = hf.to_hf_config(transformer.TransformerConfig(num_layers=2, **FAMILIES["gemma2"][1]))
  kinds = gemma2["layer_types"]
  with pytest.raises(ValueError, match=r"layer_types has \d+ entries but num_hidden_layers"):
    hf.from_hf_config({**gemma2, "layer_types": kinds + kinds})  # never cut to fit
  with pytest.raises(ValueError, match="no config.json"):
    hf.from_pretrained(str(tmp_path))


def _save_file(tensors, path):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  save_file(tensors, str(path), metadata={"format": "pt"})


def _load_file(path):
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

  return load_file(str(path))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_tensors_no_parameter_reads_are_refused(tmp_path, family):
  # A config.json with fewer layers than the weights hold: the extra layers must not be dropped.
  kw = FAMILIES[family][1] if family == "gpt2" else {}
  model, params = _model(num_layers=3, **kw)
  hf.to_pretrained(model, params, str(tmp_path))
  config = json.loads((tmp_path / "config.json").read_text())
  config["n_layer" if family == "gpt2" else "num_hidden_layers"] = 2
  (tmp_path / "config.json").write_text(json.dumps(config))
  prefix = "transformer.h.2" if family == "gpt2" else "model.layers.2"
  with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path))}: .*{re.escape(prefix)}\.\*"):
    hf.from_pretrained(str(tmp_path))
  # A stray top-level tensor is named as it is.
  config["n_layer" if family == "gpt2" else "num_hidden_layers"] = 3
  (tmp_path / "config.json").write_text(json.dumps(config))
  tensors = _load_file(tmp_path / "model.safetensors")
  _save_file(
    {**tensors, "score.weight": np.zeros((2, 48), np.float32)}, tmp_path / "model.safetensors"
  )
  with pytest.raises(ValueError, match="reads 1 of its tensors: score.weight;"):
    hf.from_pretrained(str(tmp_path))
  with pytest.raises(ValueError, match="checkpoint: .* reads 1 of its tensors: score.weight;"):
    hf.from_state_dict(model, {**tensors, "score.weight": np.zeros(2, np.float32)})


def test_buffers_and_a_tied_lm_head_are_not_unread_tensors(tmp_path):
  # What published checkpoints carry besides parameters loads as before.
  model, params = _model(tie_embeddings=True)
  hf.to_pretrained(model, params, str(tmp_path / "llama"))
  tensors = _load_file(tmp_path / "llama" / "model.safetensors")
  extra = {
    "lm_head.weight": tensors["model.embed_tokens.weight"],
    "model.rotary_emb.inv_freq": np.ones(6, np.float32),
    "model.layers.1.self_attn.rotary_emb.inv_freq": np.ones(6, np.float32),
  }
  _save_file({**tensors, **extra}, tmp_path / "llama" / "model.safetensors")
  _, loaded = hf.from_pretrained(str(tmp_path / "llama"))
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  model, params = _model(scan_layers=False, **FAMILIES["gpt2"][1])
  hf.to_pretrained(model, params, str(tmp_path / "gpt2"))
  tensors = _load_file(tmp_path / "gpt2" / "model.safetensors")
  extra = {
    "lm_head.weight": tensors["transformer.wte.weight"],
    "transformer.h.0.attn.bias": np.tril(np.ones((1, 1, 32, 32), np.float32)),
    "transformer.h.1.attn.masked_bias": np.asarray(-1e4, np.float32),
  }
  _save_file({**tensors, **extra}, tmp_path / "gpt2" / "model.safetensors")
  _, loaded = hf.from_pretrained(str(tmp_path / "gpt2"), scan_layers=False)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_unreadable_files_are_named(tmp_path):
  model, params = _model()
  hf.to_pretrained(model, params, str(tmp_path / "cut"))
  weights = tmp_path / "cut" / "model.safetensors"
  weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
  with pytest.raises(
    ValueError, match=rf"{re.escape(str(weights))}: cannot be read as safetensors"
  ):
    hf.from_pretrained(str(tmp_path / "cut"))
  hf.to_pretrained(model, params, str(tmp_path / "json"))
  config = tmp_path / "json" / "config.json"
  config.write_text(config.read_text()[:-10])
  with pytest.raises(ValueError, match=rf"{re.escape(str(config))}: not valid JSON"):
    hf.from_pretrained(str(tmp_path / "json"))
  config.write_text("[1, 2]")
  with pytest.raises(ValueError, match=rf"{re.escape(str(config))}: not a JSON object"):
    hf.from_pretrained(str(tmp_path / "json"))
  hf.to_pretrained(model, params, str(tmp_path / "index"))
  index = tmp_path / "index" / "model.safetensors.index.json"
  index.write_text('{"weight_map": {"model.norm.weight": "model.safetensors"')
  with pytest.raises(ValueError, match=rf"{re.escape(str(index))}: not valid JSON"):
    hf.from_pretrained(str(tmp_path / "index"))
  index.write_text('{"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}')
  with pytest.raises(ValueError, match="model-00002-of-00002.safetensors: cannot be read"):
    hf.from_pretrained(str(tmp_path / "index"))


# ------------------------------------------------------------------ parity with transformers


def _torch_logits(model, tokens):
  torch = pytest.importorskip("torch")
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def _hf_config(transformers, family):
  """A tiny random config of ``family`` in transformers' own classes."""
  common = dict(
    vocab_size=97,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    rope_theta=500.0,
    tie_word_embeddings=False,
  )
  gemma = dict(common, head_dim=16, hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True)
  return {
    "llama": lambda: transformers.LlamaConfig(
      **common,
      rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8,
      },
    ),
    "mistral": lambda: transformers.MistralConfig(**common, sliding_window=4),
    "qwen2": lambda: transformers.Qwen2Config(**common),
    "gemma": lambda: transformers.GemmaConfig(**gemma),
    "gemma2": lambda: transformers.Gemma2Config(
      **gemma,
      query_pre_attn_scalar=24,
      sliding_window=4,
      final_logit_softcapping=3.0,
      attn_logit_softcapping=5.0,
    ),
    "gpt2": lambda: transformers.GPT2Config(
      vocab_size=97, n_embd=48, n_layer=2, n_head=4, n_positions=32
    ),
  }[family]()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_transformers_gives_the_same_logits_both_ways(tmp_path, family):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  auto = transformers.AutoModelForCausalLM
  # transformers' own random model (every weight moved off its init) -> flaxseed.
  torch.manual_seed(0)
  theirs = auto.from_config(_hf_config(transformers, family), attn_implementation="eager")
  with torch.no_grad():
    for p in theirs.parameters():
      p.add_(0.1 * torch.randn_like(p))
  theirs.eval().save_pretrained(str(tmp_path / "theirs"))
  model, params = hf.from_pretrained(str(tmp_path / "theirs"))
  assert hf.to_hf_config(model.config)["model_type"] == FAMILIES[family][0]
  want = _torch_logits(theirs, TOKENS)
  assert np.max(np.abs(np.asarray(model.apply({"params": params}, TOKENS)) - want)) <= 1e-4
  # flaxseed (moved off what was loaded) -> transformers.
  params = jax.tree.map(lambda x: x * 1.1, params)
  hf.to_pretrained(model, params, str(tmp_path / "ours"))
  loaded = auto.from_pretrained(str(tmp_path / "ours"), attn_implementation="eager").eval()
  got = _torch_logits(loaded, TOKENS)
  assert np.max(np.abs(got - np.asarray(model.apply({"params": params}, TOKENS)))) <= 1e-4


@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_peft_loads_the_adapter_with_the_same_logits(tmp_path, variant):
  pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  peft = pytest.importorskip("peft")
  model, params = _model()
  cfg = lora.LoraConfig(rank=4, alpha=8, targets=r".*(attn|mlp)/.*/kernel", variant=variant)
  adapters = _adapters(params, cfg)
  hf.to_pretrained(model, params, str(tmp_path / "base"))
  hf.to_peft(adapters, cfg, str(tmp_path / "adapter"))
  base = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "base"))
  theirs = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
  want = np.asarray(lora.apply(model, params, adapters, cfg, TOKENS))
  assert np.max(np.abs(want - np.asarray(model.apply({"params": params}, TOKENS)))) > 1e-2
  assert np.max(np.abs(_torch_logits(theirs, TOKENS) - want)) <= 1e-4
