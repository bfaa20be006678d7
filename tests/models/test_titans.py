"""Titans: the chunked memory against plain recurrences, test-time learning, causality of every
variant, decode == full forward, sharded == one device."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxseed import models
from flaxseed import training
from flaxseed.configs import common
from flaxseed.configs import titans as titans_configs
from flaxseed.models import sampling
from flaxseed.models import sharding
from flaxseed.models import titans
from flaxseed.training import mesh as mesh_lib

TINY = dict(
  d_model=32,
  num_layers=2,
  num_heads=2,
  mlp_dim=64,
  window=8,
  memory_chunk=4,
  num_persistent=2,
  num_memory_tokens=2,
  memory_max_lr=1.0,
)


def _random_inputs(key, *, batch=2, heads=2, length=8, width=4, max_lr=0.2):
  """A ``Chunk`` of random memory inputs with gates spread over (0, 1) and steps below
  ``max_lr`` (larger steps diverge without gradient clipping)."""
  ks = jax.random.split(key, 6)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  shape = (batch, heads, length)
  return titans.Chunk(
    k=unit(jax.random.normal(ks[0], shape + (width,))),
    v=jax.random.normal(ks[1], shape + (width,)),
    q=unit(jax.random.normal(ks[2], shape + (width,))),
    log_eta=jax.nn.log_sigmoid(jax.random.normal(ks[3], shape) + 1.0),
    log_keep=jax.nn.log_sigmoid(jax.random.normal(ks[4], shape) + 3.0),
    theta=max_lr * jax.nn.sigmoid(jax.random.normal(ks[5], shape)),
  )


def _random_state(key, widths, *, batch=2, heads=2):
  shapes = [(batch, heads, a, b) for a, b in zip(widths[:-1], widths[1:])]
  keys = jax.random.split(key, 2 * len(shapes))
  weights = tuple(jax.random.normal(k, s) / np.sqrt(s[2]) for k, s in zip(keys, shapes))
  momentum = tuple(0.1 * jax.random.normal(k, s) for k, s in zip(keys[len(shapes) :], shapes))
  return weights, momentum


def _loss(weights, k, v):
  return jnp.sum(jnp.square(titans.memory_mlp(weights, k) - v))


def _clipped(grads, clip):
  if clip is None:
    return grads
  norms = [jnp.sqrt(jnp.sum(jnp.square(g), axis=(-2, -1), keepdims=True)) for g in grads]
  return [g * jnp.minimum(1.0, clip / n) for g, n in zip(grads, norms)]


def _plain_recurrence(weights, momentum, x: titans.Chunk, clip=None):
  """Token by token: the (clipped) gradient at the current weights, then momentum, forgetting,
  read."""
  weights, momentum, ys = list(weights), list(momentum), []
  for t in range(x.k.shape[2]):
    grads = _clipped(jax.grad(_loss)(weights, x.k[:, :, t : t + 1], x.v[:, :, t : t + 1]), clip)
    eta, keep, theta = (
      jnp.exp(x.log_eta[:, :, t, None, None]),
      jnp.exp(x.log_keep[:, :, t, None, None]),
      x.theta[:, :, t, None, None],
    )
    momentum = [eta * m - theta * g for m, g in zip(momentum, grads)]
    weights = [keep * w + m for w, m in zip(weights, momentum)]
    ys.append(titans.memory_mlp(weights, x.q[:, :, t : t + 1]))
  return jnp.concatenate(ys, axis=2), weights, momentum


def _minibatch_recurrence(weights, momentum, x: titans.Chunk, chunk: int, clip=None):
  """The sequential mini-batch form: token by token, but every gradient of a chunk is taken at
  the weights of the chunk's start."""
  weights, momentum, ys = list(weights), list(momentum), []
  for t in range(x.k.shape[2]):
    if t % chunk == 0:
      start = list(weights)
    grads = _clipped(jax.grad(_loss)(start, x.k[:, :, t : t + 1], x.v[:, :, t : t + 1]), clip)
    eta, keep, theta = (
      jnp.exp(x.log_eta[:, :, t, None, None]),
      jnp.exp(x.log_keep[:, :, t, None, None]),
      x.theta[:, :, t, None, None],
    )
    momentum = [eta * m - theta * g for m, g in zip(momentum, grads)]
    weights = [keep * w + m for w, m in zip(weights, momentum)]
    ys.append(titans.memory_mlp(weights, x.q[:, :, t : t + 1]))
  return jnp.concatenate(ys, axis=2), weights, momentum


@pytest.mark.parametrize(
  "widths,clip", [((4, 4), None), ((4, 8, 4), None), ((4, 8, 8, 4), None), ((4, 8, 4), 0.5)]
)
def test_chunk_size_one_is_the_plain_per_token_recurrence(widths, clip):
  x = _random_inputs(jax.random.key(0), max_lr=0.2 if clip is None else 2.0)
  weights, momentum = _random_state(jax.random.key(1), widths)
  expected = _plain_recurrence(weights, momentum, x, clip)
  got = titans.scan_chunks(weights, momentum, x, 1, clip)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
  "widths,chunk,clip",
  [
    ((4, 4), 4, None),
    ((4, 8, 4), 2, None),
    ((4, 8, 4), 4, None),
    ((4, 8, 4), 8, None),
    ((4, 8, 8, 4), 4, None),
    ((4, 8, 4), 4, 0.5),
    ((4, 8, 8, 4), 8, 0.5),
  ],
)
def test_chunked_update_is_the_sequential_minibatch_form(widths, chunk, clip):
  x = _random_inputs(jax.random.key(2), length=16, max_lr=0.2 if clip is None else 2.0)
  weights, momentum = _random_state(jax.random.key(3), widths)
  expected = _minibatch_recurrence(weights, momentum, x, chunk, clip)
  got = titans.scan_chunks(weights, momentum, x, chunk, clip)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  # Chunking changes the function (gradients at older weights), so C = 1 differs.
  plain = _plain_recurrence(weights, momentum, x, clip)[0]
  assert np.abs(np.asarray(got[0] - plain)).max() > 1e-3
  if clip is not None:  # the clip is active: it changes the result
    unclipped = titans.scan_chunks(weights, momentum, x, chunk)[0]
    assert np.abs(np.asarray(got[0] - unclipped)).max() > 1e-3


@pytest.mark.parametrize("chunk", [1, 4])
def test_linear_memory_recalls_stored_pairs(chunk):
  """Test-time learning: a linear memory from zero, no momentum or forgetting and
  theta = 1/2 stores each (k, v) with orthonormal keys exactly; querying k_j reads v_j."""
  e, pairs = 8, 4
  keys = jnp.linalg.qr(jax.random.normal(jax.random.key(4), (e, e)))[0][:pairs]
  values = jax.random.normal(jax.random.key(5), (pairs, e))
  zeros = jnp.zeros((pairs, e))
  # Tokens 0..3 write the pairs; tokens 4..7 query them (theta = 0 there: no writing).
  x = titans.Chunk(
    k=jnp.concatenate([keys, zeros])[None, None],
    v=jnp.concatenate([values, zeros])[None, None],
    q=jnp.concatenate([keys, keys])[None, None],
    log_eta=jnp.full((1, 1, 2 * pairs), -1e4),
    log_keep=jnp.zeros((1, 1, 2 * pairs)),
    theta=jnp.concatenate([jnp.full(pairs, 0.5), jnp.zeros(pairs)])[None, None],
  )
  weights = (jnp.zeros((1, 1, e, e)),)
  y, _, _ = titans.scan_chunks(weights, weights, x, chunk)
  np.testing.assert_allclose(y[0, 0, pairs:], values, atol=1e-5)


def _model(variant, **kw):
  return titans.Titans(titans.TitansConfig(**{**TINY, "variant": variant, **kw}))


def _init(model, length=24, batch=2):
  return nn.unbox(model.init(jax.random.key(0), jnp.zeros((batch, length), jnp.int32))["params"])


@pytest.mark.parametrize("variant", titans.VARIANTS)
def test_every_variant_is_causal(variant):
  """A token changes no earlier output; every earlier token matters (through the memory when
  attention cannot see it), also in the middle of a MAC segment."""
  model = _model(variant, tie_embeddings=False, window=4)
  length, t = 24, 13  # the second token of the fourth MAC segment
  params = _init(model, length)
  tokens = jnp.arange(length, dtype=jnp.int32)[None]

  def out(embedding):
    p = {**params, "embed": {"embedding": embedding}}
    return model.apply({"params": p}, tokens)[:, t].sum()

  grad = jax.jit(jax.grad(out))(params["embed"]["embedding"])
  rows = np.abs(np.asarray(grad[:length])).sum(-1)
  assert np.all(rows[: t + 1] > 0), rows
  assert np.all(rows[t + 1 :] == 0), rows


@pytest.mark.parametrize("variant", titans.VARIANTS)
def test_decode_with_the_memory_in_the_cache_matches_the_full_forward(variant):
  model = _model(variant)
  params = _init(model)
  tokens = jax.random.randint(jax.random.key(1), (2, 21), 0, 256)
  full = model.apply({"params": params}, tokens)
  cache = sampling.init_cache(model, batch_size=2, max_len=24)
  apply = jax.jit(model.apply, static_argnames=("decode", "mutable"))
  # Prefill 7 tokens (not a chunk or segment boundary), then one at a time across boundaries.
  logits, state = apply(
    {"params": params, "cache": cache}, tokens[:, :7], decode=True, mutable=("cache",)
  )
  steps = [logits]
  for i in range(7, 21):
    logits, state = apply(
      {"params": params, "cache": state["cache"]},
      tokens[:, i : i + 1],
      decode=True,
      mutable=("cache",),
    )
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=2e-5, rtol=2e-5)


def test_generate_greedy_matches_argmax_of_the_full_forward():
  model = _model("mac")
  params = _init(model)
  prompt = jnp.array([[3, 1, 4, 1, 5]], jnp.int32)
  out = sampling.generate(model, params, prompt, max_new_tokens=6, temperature=0.0)
  logits = jax.jit(model.apply)({"params": params}, out)
  np.testing.assert_array_equal(out[0, 5:], jnp.argmax(logits[0, 4:-1], axis=-1))


@pytest.mark.parametrize(
  "bad,match",
  [
    (dict(memory_max_lr=float("nan")), "memory_max_lr must be positive and finite, got nan"),
    (dict(memory_grad_clip=float("nan")), "memory_grad_clip must be positive and finite"),
    (dict(memory_grad_clip=float("inf")), "memory_grad_clip must be positive and finite"),
  ],
)
def test_nan_and_inf_config_values_are_refused(bad, match):
  with pytest.raises(ValueError, match=match):  # NaN passed `<= 0`
    titans.TitansConfig(**{**TINY, **bad})


def test_model_refuses_float_tokens_naming_them():
  model = _model("mac")
  with pytest.raises(ValueError, match="tokens_BL must be integer token ids, got float32"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.float32))


def _config(variant, **overrides):
  return common.override(titans_configs.get_config(f"{variant}-test"), **overrides)


@pytest.mark.parametrize("variant", titans.VARIANTS)
def test_sharded_forward_equals_one_device(variant):
  """Parameters sharded by their logical axes over a 2 x 2 x 2 mesh of 8 CPU devices (heads
  over tensor, widths over fsdp), the batch over data x fsdp: the logits of one device."""
  model = _model(variant)
  tokens = jax.random.randint(jax.random.key(1), (4, 20), 0, 256)
  boxed = model.init(jax.random.key(0), tokens)["params"]
  params = nn.unbox(boxed)
  expected = jax.jit(model.apply)({"params": params}, tokens)
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rules = sharding.DEFAULT_RULES
  shardings = mesh_lib.logical_shardings(boxed, mesh, rules)
  assert any(s.spec != jax.sharding.PartitionSpec() for s in jax.tree.leaves(shardings))
  sharded = jax.device_put(params, shardings)
  with nn.logical_axis_rules(rules), jax.set_mesh(mesh):
    got = jax.jit(model.apply)(
      {"params": sharded}, jax.device_put(tokens, mesh_lib.batch_sharding(mesh))
    )
  np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_sharded_training_equals_one_device(tmp_path, losses):
  """LMM through the shared loop on the 2 x 2 x 2 mesh: the losses of one device (every
  variant's sharded forward is checked above; the memory is what training adds)."""
  one, mesh = tmp_path / "one", tmp_path / "mesh"
  common = dict(steps=3, sample_tokens=0)
  training.train(_config("lmm", **common, **{"mesh.data": 1}), str(one))
  training.train(
    _config("lmm", **common, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}), str(mesh)
  )
  one, mesh = losses(one), losses(mesh)
  assert list(one) == [1, 2, 3]
  for step in one:
    assert mesh[step] == pytest.approx(one[step], abs=1e-5), (step, one, mesh)


def test_zoo_has_every_variant():
  for variant in titans.VARIANTS:
    model = models.get(f"titans-{variant}-tiny")
    assert isinstance(model, titans.Titans) and model.config.variant == variant
  shapes = jax.eval_shape(
    models.get("titans-mal-tiny").init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32)
  )
  n = sum(x.size for x in jax.tree.leaves(nn.unbox(shapes)))
  assert 0.5e6 < n < 2e6, n


@pytest.mark.parametrize(
  "bad,match",
  [
    (dict(variant="mamba"), "variant='mamba' is not one of"),
    (dict(variant="mac", window=10, memory_chunk=4), "memory_chunk=4 must divide window=10"),
    (dict(memory_depth=0), "memory_depth must be positive"),
    (dict(memory_max_lr=0.0), "memory_max_lr must be positive"),
    (dict(num_persistent=-1), "num_persistent must be >= 0"),
  ],
)
def test_bad_config_values_name_the_field(bad, match):
  with pytest.raises(ValueError, match=match):
    titans.TitansConfig(**{**TINY, **bad})
  with pytest.raises(ValueError, match="unknown variant 'mac-huge'"):
    titans_configs.get_config("mac-huge")
