"""Transformer properties: causality, decode == full forward, packing isolation, layouts."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxseed import models
from flaxseed.models import layers
from flaxseed.models import sae
from flaxseed.models import sampling
from flaxseed.models import transformer

TINY = dict(d_model=32, num_layers=2, num_heads=4, mlp_dim=64)


def _model(**kw):
  return transformer.Transformer(transformer.TransformerConfig(**{**TINY, **kw}))


def _init(model, length=16, batch=2):
  tokens = jnp.zeros((batch, length), jnp.int32)
  return nn.unbox(model.init(jax.random.key(0), tokens)["params"])


def _embedding_grad_rows(model, params, t, length):
  """Rows of d(sum logits[:, t]) / d(embedding), with token i placed at position i."""
  tokens = jnp.arange(length, dtype=jnp.int32)[None]

  def out(embedding):
    p = {**params, "embed": {"embedding": embedding}}
    return model.apply({"params": p}, tokens)[:, t].sum()

  grad = jax.grad(out)(params["embed"]["embedding"])
  return np.abs(np.asarray(grad[:length])).sum(-1)  # row i = token at position i


# The architecture fields of two Hugging Face families (models/hf.py), at tiny sizes.
GPT2_LIKE = dict(
  norm="layer", biases="all", position_embedding="learned", max_positions=16, mlp_activation="gelu"
)
GEMMA2_LIKE = dict(
  norm_offset=1.0,
  post_norms=True,
  embed_scale=True,
  mlp_activation="geglu",
  attn_scale=0.1,
  logit_soft_cap=5.0,
  attn_logit_soft_cap=3.0,
  attention_pattern=("sliding_window:4", "global"),
)


@pytest.mark.parametrize(
  "kw",
  [
    dict(),
    dict(num_kv_heads=2),
    dict(num_kv_heads=1),
    dict(scan_layers=False, mlp_activation="gelu"),
    GPT2_LIKE,
  ],
)
def test_causal_model_sees_no_future_token(kw):
  model = _model(tie_embeddings=False, **kw)  # untied: the gradient only flows through inputs
  length, t = 12, 5
  rows = _embedding_grad_rows(model, _init(model, length), t, length)
  assert np.all(rows[: t + 1] > 0), rows  # every past token matters
  assert np.all(rows[t + 1 :] == 0), rows  # no future token does


def test_bidirectional_model_sees_future_tokens():
  model = _model(tie_embeddings=False, causal=False)
  length, t = 12, 5
  rows = _embedding_grad_rows(model, _init(model, length), t, length)
  assert np.all(rows > 0), rows


@pytest.mark.parametrize(
  "kw",
  [
    dict(),
    dict(num_kv_heads=2, scan_layers=False),
    dict(num_kv_heads=1, attn_logit_soft_cap=3.0),
    dict(attention_pattern=("sliding_window:4", "global")),
    GPT2_LIKE,
    GEMMA2_LIKE,
    dict(biases="qkv", rope_scaling="llama3:factor=8"),
  ],
)
def test_kv_cache_decode_matches_full_forward(kw):
  model = _model(**kw)
  params = _init(model)
  tokens = jax.random.randint(jax.random.key(1), (2, 13), 0, 256)
  full = model.apply({"params": params}, tokens)
  cache = sampling.init_cache(model, batch_size=2, max_len=16)
  apply = jax.jit(model.apply, static_argnames=("decode", "mutable"))
  # Prefill 5 tokens, then decode one at a time.
  logits, state = apply(
    {"params": params, "cache": cache}, tokens[:, :5], decode=True, mutable=("cache",)
  )
  steps = [logits]
  for i in range(5, 13):
    logits, state = apply(
      {"params": params, "cache": state["cache"]},
      tokens[:, i : i + 1],
      decode=True,
      mutable=("cache",),
    )
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=2e-5, rtol=2e-5)


def test_generate_greedy_matches_argmax_of_full_forward():
  model = _model()
  params = _init(model)
  prompt = jnp.array([[5, 9, 33], [7, 7, 7]], jnp.int32)
  out = sampling.generate(model, params, prompt, max_new_tokens=6, temperature=0.0)
  assert out.shape == (2, 9)
  np.testing.assert_array_equal(out[:, :3], prompt)
  # Every generated token is the argmax given everything before it (one padded full forward:
  # causality makes the logits at i independent of what follows).
  logits = jax.jit(model.apply)({"params": params}, out)
  np.testing.assert_array_equal(out[:, 3:], jnp.argmax(logits[:, 2:-1], -1))


def test_generate_left_padded_prompts_continue_as_they_would_alone():
  model = _model()
  params = _init(model)
  prompts = [[5, 9, 33, 2, 8, 61], [7, 7], [250]]
  out = sampling.generate(model, params, prompts, max_new_tokens=5, temperature=0.0, pad_token=3)
  assert out.shape == (3, 11)
  np.testing.assert_array_equal(out[1, :4], [3, 3, 3, 3])  # left padding
  for row, prompt in zip(out, prompts):
    alone = sampling.generate(model, params, np.array([prompt]), max_new_tokens=5, temperature=0.0)
    np.testing.assert_array_equal(row[6:], alone[0, len(prompt) :])


def test_generate_stops_rows_at_their_stop_token():
  model = _model()
  params = _init(model)
  prompt = jnp.array([[5, 9, 33], [7, 7, 7]], jnp.int32)
  free = np.asarray(sampling.generate(model, params, prompt, max_new_tokens=8, temperature=0.0))[
    :, 3:
  ]
  stop = int(free[0, 2])
  first = int(np.argmax(free[0] == stop))
  out = np.asarray(
    sampling.generate(
      model, params, prompt, max_new_tokens=8, temperature=0.0, stop_tokens=(stop,), pad_token=0
    )
  )[:, 3:]
  np.testing.assert_array_equal(out[0, : first + 1], free[0, : first + 1])
  assert np.all(out[0, first + 1 :] == 0)
  hits = np.nonzero(free[1] == stop)[0]  # the other row runs on until its own stop, if any
  end = hits[0] + 1 if hits.size else 8
  np.testing.assert_array_equal(out[1, :end], free[1, :end])
  assert np.all(out[1, end:] == 0)


def test_generate_top_p_limits_the_nucleus():
  model = _model()
  params = _init(model)
  prompt = jnp.array([[5, 9, 33], [7, 7, 7]], jnp.int32)
  greedy = sampling.generate(model, params, prompt, max_new_tokens=6, temperature=0.0)
  rng = jax.random.key(4)
  tiny_nucleus = sampling.generate(
    model, params, prompt, max_new_tokens=6, temperature=1.0, top_p=1e-6, rng=rng
  )
  np.testing.assert_array_equal(tiny_nucleus, greedy)  # only the most likely token is left
  np.testing.assert_array_equal(
    sampling.generate(model, params, prompt, max_new_tokens=6, top_p=1.0, rng=rng),
    sampling.generate(model, params, prompt, max_new_tokens=6, rng=rng),
  )
  with pytest.raises(ValueError, match="top_p"):
    sampling.generate(model, params, prompt, max_new_tokens=2, top_p=0.0)
  with pytest.raises(ValueError, match="stop_tokens"):
    sampling.generate(model, params, prompt, max_new_tokens=2, stop_tokens=(999,))


def test_generate_rejects_out_of_vocabulary_prompt():
  model = _model()
  with pytest.raises(ValueError, match="outside"):
    sampling.generate(model, _init(model), np.array([[1, 256]]), max_new_tokens=2)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
  "bad,match",
  [
    (dict(temperature=NAN), "temperature must be >= 0 and finite, got nan"),
    (dict(temperature=INF), "temperature must be >= 0 and finite, got inf"),
    (dict(top_p=NAN), r"top_p must be in \(0, 1\], got nan"),
    (dict(top_k=NAN), "top_k must be an integer, got nan"),
    (dict(top_k=2.5), "top_k must be an integer, got 2.5"),
    (dict(max_new_tokens=2.0), "max_new_tokens must be an integer, got 2.0"),
    (dict(pad_token=1.5), "pad_token must be an integer, got 1.5"),
    (dict(stop_tokens=(2.7,)), "stop_tokens must be an integer, got 2.7"),
  ],
)
def test_generate_refuses_nan_and_non_integer_arguments(bad, match):
  # NaN slips through `x < 0` (every comparison with NaN is False): NaN temperature gave all-zero
  # samples; float counts and ids were cut to integers or failed inside jax.
  model = _model()
  args = {"max_new_tokens": 2, **bad}
  with pytest.raises(ValueError, match=match):
    sampling.generate(model, _init(model), np.array([[1, 2]]), **args)


@pytest.mark.parametrize(
  "prompts,match",
  [
    (np.array([[1.7, 2.2]]), "prompt_tokens must be integer token ids, got float64"),
    (jnp.array([[1.7, 2.2]]), "prompt_tokens must be integer token ids, got float32"),
    (np.array([[True, False]]), "prompt_tokens must be integer token ids, got bool"),
    ([[1, 2], [3.0]], r"prompt_tokens\[1\] must be integer token ids, got float64"),
  ],
)
def test_generate_refuses_float_token_ids(prompts, match):
  model = _model()
  with pytest.raises(ValueError, match=match):  # they were truncated: [[1.7, 2.2]] ran as [[1, 2]]
    sampling.generate(model, _init(model), prompts, max_new_tokens=2, temperature=0.0)


def test_model_refuses_float_tokens_naming_them():
  model = _model()
  with pytest.raises(ValueError, match="tokens_BL must be integer token ids, got float32"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.float32))


@pytest.mark.parametrize(
  "bad,match",
  [
    (dict(rope_theta=NAN), "rope_theta must be positive and finite, got nan"),
    (dict(rope_theta=INF), "rope_theta must be positive and finite, got inf"),
    (dict(attn_scale=NAN), "attn_scale must be positive and finite, or None, got nan"),
    (dict(logit_soft_cap=NAN), "logit_soft_cap must be positive and finite, or None, got nan"),
    (dict(attn_logit_soft_cap=INF), "attn_logit_soft_cap must be positive and finite"),
    (dict(rope_scaling="linear:factor=nan"), "factor must be a positive number, not nan"),
    (dict(rope_scaling="llama3:factor=8,low_freq_factor=inf"), "low_freq_factor must be a"),
  ],
)
def test_nan_and_inf_config_values_are_refused(bad, match):
  with pytest.raises(ValueError, match=match):
    transformer.TransformerConfig(**{**TINY, **bad})


def test_packed_documents_do_not_see_each_other():
  model = _model()
  params = _init(model, 16)
  key_a, key_b = jax.random.split(jax.random.key(3))
  doc_a = jax.random.randint(key_a, (1, 6), 0, 256)
  doc_b = jax.random.randint(key_b, (1, 10), 0, 256)
  packed = jnp.concatenate([doc_a, doc_b], axis=1)
  segment_ids = jnp.array([[1] * 6 + [2] * 10])
  positions = jnp.array([list(range(6)) + list(range(10))])
  packed_logits = model.apply(
    {"params": params}, packed, segment_ids=segment_ids, positions=positions
  )
  alone_b = model.apply({"params": params}, doc_b)
  np.testing.assert_allclose(packed_logits[:, 6:], alone_b, atol=1e-5, rtol=1e-5)
  # Changing document A changes nothing in document B.
  other = packed.at[:, :6].set((doc_a + 17) % 256)
  other_logits = model.apply(
    {"params": params}, other, segment_ids=segment_ids, positions=positions
  )
  np.testing.assert_allclose(other_logits[:, 6:], packed_logits[:, 6:], atol=1e-6)
  assert not np.allclose(other_logits[:, :6], packed_logits[:, :6])


def test_scan_and_loop_layers_compute_the_same_function():
  scanned, looped = _model(), _model(scan_layers=False)
  params = _init(scanned)
  per_layer = {k: v for k, v in params.items() if k != "layers"}
  for i in range(TINY["num_layers"]):
    per_layer[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
  tokens = jax.random.randint(jax.random.key(4), (2, 16), 0, 256)
  np.testing.assert_allclose(
    looped.apply({"params": per_layer}, tokens),
    scanned.apply({"params": params}, tokens),
    atol=1e-5,
  )


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch"])
def test_remat_policies_do_not_change_gradients(policy):
  tokens = jax.random.randint(jax.random.key(5), (2, 16), 0, 256)
  base = _model()
  params = _init(base)
  loss = lambda m: jax.grad(lambda p: m.apply({"params": p}, tokens).sum())(params)  # noqa: E731
  chex.assert_trees_all_close(loss(_model(remat_policy=policy)), loss(base), atol=1e-5)


def test_every_parameter_has_logical_axis_names():
  model = _model(tie_embeddings=False)
  boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves
  for leaf in leaves:
    assert isinstance(leaf, nn.LogicallyPartitioned), leaf
    assert len(leaf.names) == len(leaf.value.shape), leaf
    assert leaf.value.dtype == jnp.float32


def test_bfloat16_compute_keeps_float32_params_and_logits():
  model = _model(dtype="bfloat16")
  params = _init(model)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  logits = model.apply({"params": params}, jnp.zeros((2, 16), jnp.int32))
  assert logits.dtype == jnp.float32
  ref = _model().apply({"params": params}, jnp.zeros((2, 16), jnp.int32))
  np.testing.assert_allclose(logits, ref, atol=0.1)


def test_logit_soft_cap_bounds_logits():
  model = _model(logit_soft_cap=0.5)
  params = _init(model)
  params = jax.tree.map(lambda p: p * 50, params)
  logits = model.apply({"params": params}, jnp.arange(16)[None])
  assert float(jnp.max(jnp.abs(logits))) <= 0.5


def test_sliding_window_layers_see_exactly_their_window():
  """One layer with a window of 3: output t depends on tokens t-2..t and nothing else."""
  model = _model(tie_embeddings=False, num_layers=1, attention_pattern=("sliding_window:3",))
  length, t = 12, 7
  rows = _embedding_grad_rows(model, _init(model, length), t, length)
  assert np.all(rows[t - 2 : t + 1] > 0), rows
  assert np.all(rows[: t - 2] == 0) and np.all(rows[t + 1 :] == 0), rows


def test_attention_pattern_scans_by_period_like_the_loop():
  """Scanning a (local, global) pattern over periods == the unrolled layers with their masks."""
  kw = dict(num_layers=4, attention_pattern=("sliding_window:3", "global"))
  scanned, looped = _model(**kw), _model(scan_layers=False, **kw)
  params = _init(scanned)
  assert set(params["layers"]) == {"block_0", "block_1"}
  per_layer = {k: v for k, v in params.items() if k != "layers"}
  for i in range(4):
    per_layer[f"layers_{i}"] = jax.tree.map(
      lambda x, i=i: x[i // 2], params["layers"][f"block_{i % 2}"]
    )
  tokens = jax.random.randint(jax.random.key(4), (2, 16), 0, 256)
  np.testing.assert_allclose(
    looped.apply({"params": per_layer}, tokens),
    scanned.apply({"params": params}, tokens),
    atol=1e-5,
  )
  global_only = _model(num_layers=4, scan_layers=False).apply({"params": per_layer}, tokens)
  assert not np.allclose(global_only, looped.apply({"params": per_layer}, tokens), atol=1e-3)


def test_flops_per_token_counts_matmul_parameters():
  cfg = transformer.TransformerConfig(**TINY)
  params = _init(transformer.Transformer(cfg))
  # Every >= 2-D weight is a matmul weight (tied: the embedding is the unembedding); the stacked
  # norm scales are [layers, D] and are not.
  matmul = sum(
    p.size
    for path, p in jax.tree_util.tree_leaves_with_path(params)
    if p.ndim >= 2 and "norm" not in jax.tree_util.keystr(path)
  )
  attn = cfg.num_layers * 4 * cfg.num_heads * cfg.head_size * (16 + 1) / 2
  assert cfg.flops_per_token(16) == pytest.approx(3 * (2 * matmul + attn))


@pytest.mark.parametrize(
  "bad,match",
  [
    (dict(d_model=30, num_heads=4), "must divide d_model"),
    (dict(num_heads=4, num_kv_heads=3), "num_kv_heads=3 must divide"),
    (dict(num_layers=0), "num_layers must be positive"),
    (dict(mlp_dim=-1), "mlp_dim must be positive"),
    (dict(mlp_activation="relu"), "mlp_activation"),
    (dict(dtype="float64"), "dtype"),
    (dict(remat_policy="some"), "remat_policy"),
    (dict(attention_pattern=("sliding_window:x",)), "bad term 'sliding_window:x'"),
    (dict(attention_pattern=("global",) * 3), "multiple of len.attention_pattern.=3"),
    (dict(norm="batch"), "norm='batch'"),
    (dict(norm="layer", norm_offset=1.0), "norm_offset applies to norm='rms'"),
    (dict(biases="some"), "biases='some'"),
    (dict(position_embedding="learned"), "needs max_positions > 0"),
    (dict(rope_scaling="llama3:factr=8"), "no field 'factr'"),
    (dict(rope_scaling="yarn:factor=8"), "kind 'yarn'"),
    (dict(rope_scaling="linear"), "factor must be a positive number"),
  ],
)
def test_bad_config_values_name_the_field(bad, match):
  with pytest.raises(ValueError, match=match):
    transformer.TransformerConfig(**{**TINY, **bad})


def test_learned_positions_refuse_inputs_longer_than_their_table():
  model = _model(**GPT2_LIKE)
  _init(model, 16)
  with pytest.raises(ValueError, match="17 tokens exceed max_positions=16"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 17), jnp.int32))
  with pytest.raises(ValueError, match="max_positions=16"):  # the cache is as long as the table
    sampling.init_cache(model, batch_size=1, max_len=17)


def test_rope_scaling_rescales_the_low_frequencies():
  base = layers.rope_frequencies(64, 500_000.0)
  scaled = layers.rope_frequencies(64, 500_000.0, "llama3:factor=8")
  wavelen = 2 * np.pi / base
  np.testing.assert_allclose(scaled[wavelen < 8192 / 4], base[wavelen < 8192 / 4])  # high: kept
  np.testing.assert_allclose(scaled[wavelen > 8192], base[wavelen > 8192] / 8)  # low: / factor
  middle = (wavelen >= 8192 / 4) & (wavelen <= 8192)
  assert middle.any() and np.all(
    (scaled[middle] <= base[middle]) & (scaled[middle] >= base[middle] / 8)
  )
  np.testing.assert_allclose(
    layers.rope_frequencies(64, 1e4, "linear:factor=4"), layers.rope_frequencies(64, 1e4) / 4
  )
  assert transformer.TransformerConfig(rope_scaling="llama3:factor=8.0") == (
    transformer.TransformerConfig(rope_scaling="llama3:high_freq_factor=4,factor=8")
  )


def test_zoo_registry():
  names = models.list()
  assert "transformer-tiny" in names and "llama-style-1b" in names and "gpt2-style-124m" in names
  model = models.get("transformer-tiny")
  assert isinstance(model, transformer.Transformer)
  assert model.config == transformer.TransformerConfig.tiny()
  tokens = jnp.zeros((1, 8), jnp.int32)
  params = model.init(jax.random.key(0), tokens)["params"]
  assert model.apply({"params": params}, tokens).shape == (1, 8, 256)
  with pytest.raises(ValueError, match="unknown model 'nope'"):
    models.get("nope")


@pytest.mark.parametrize("name", models.list())
def test_every_preset_builds_abstractly(name):
  model = models.get(name)
  if isinstance(model, sae.SAE):  # reads activations, not tokens
    example = jnp.zeros((4, model.config.d_in), jnp.float32)
  else:
    example = jnp.zeros((1, 4), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), example)
  n = sum(np.prod(x.shape) for x in jax.tree.leaves(nn.unbox(shapes["params"])))
  assert n > 0


def test_default_attention_gets_the_mesh_where_it_resolves_to_a_pallas_kernel(monkeypatch):
  """``attention_impl=None`` is a Pallas kernel on GPU/TPU, which must run under shard_map:
  the layer hands it the ambient mesh exactly when the API's default is a Pallas kernel."""
  from flaxseed import kernels  # pylint: disable=g-import-not-at-top
  from flaxseed.kernels import masks  # pylint: disable=g-import-not-at-top
  from flaxseed.models import layers  # pylint: disable=g-import-not-at-top
  from flaxseed.training import mesh as mesh_lib  # pylint: disable=g-import-not-at-top

  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  with nn.logical_axis_rules(models.sharding.DEFAULT_RULES), jax.set_mesh(mesh):
    assert layers._kernel_mesh(None, 128, masks.causal()) == {}  # CPU: XLA, partitioned by GSPMD
    monkeypatch.setattr(
      kernels.attention.api, "default_implementation", lambda length, causal: "pallas_tpu"
    )
    got = layers._kernel_mesh(None, 128, masks.causal())
    assert got["mesh"].shape == mesh.shape
    assert got["spec"] == jax.sharding.PartitionSpec(("data", "fsdp"), None, "tensor", None)


@pytest.mark.parametrize("field", ["norm_eps", "norm_offset"])
def test_nan_norm_fields_are_refused(field):
  with pytest.raises(ValueError, match=rf"{field} must be"):
    transformer.TransformerConfig(**{field: float("nan")})
