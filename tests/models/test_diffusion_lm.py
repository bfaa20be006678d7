"""Masked-diffusion LM: the losses by hand, the sampler's invariants, the ELBO by enumeration."""

import itertools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxseed import models
from flaxseed import training
from flaxseed.configs import common
from flaxseed.configs import diffusion_lm as diffusion_configs
from flaxseed.models import diffusion_lm
from flaxseed.training import tasks

MASK = 256


def _model(**kw):
  return diffusion_lm.DiffusionLM(
    diffusion_lm.DiffusionLMConfig.tiny(
      **{**dict(d_model=32, num_layers=2, num_heads=2, mlp_dim=64), **kw}
    )
  )


@pytest.fixture(scope="module")
def model_and_params():
  model = _model()
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  # Sharper predictions than at init, so confidences and orders differ from position to position.
  return model, jax.tree.map(lambda p: 3.0 * p, params)


def _log_softmax(logits):
  logits = np.asarray(logits, np.float64)
  m = logits.max(-1, keepdims=True)
  return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


# ---------------------------------------------------------------------------------------------
# Model and objective


def test_model_is_bidirectional_and_never_predicts_mask(model_and_params):
  model, params = model_and_params
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 256)
  logits = model.apply({"params": params}, tokens)
  assert logits.shape == (2, 12, 264)
  assert np.all(np.isneginf(logits[..., MASK])) and np.all(np.isfinite(logits[..., :MASK]))
  changed = model.apply({"params": params}, tokens.at[:, -1].set(MASK))
  assert not np.allclose(changed[:, 0], logits[:, 0])  # the first position sees the last


def test_noise_masks_only_noisable_tokens_at_rate_p():
  tokens = jnp.zeros((8, 4000), jnp.int32)
  noisable = jnp.arange(4000)[None] >= 1000
  noisy, masked, p = diffusion_lm.noise(
    jax.random.key(3), tokens, noisable, mask_token_id=MASK, eps=1e-3, antithetic=True
  )
  np.testing.assert_array_equal(np.asarray(noisy == MASK), np.asarray(masked))
  assert not masked[:, :1000].any()
  np.testing.assert_allclose(masked[:, 1000:].mean(-1), p, atol=0.03)
  # Antithetic times: one per stratum of width 1/B.
  t = (np.sort(np.asarray(p)) - 1e-3) / (1 - 1e-3)
  np.testing.assert_allclose(np.diff(t), 1 / 8, atol=1e-5)


def test_pretrain_loss_by_hand():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
  tokens = rng.integers(0, 7, (2, 5))
  masked = np.array([[1, 0, 1, 0, 0], [0, 1, 1, 1, 1]], bool)
  p = np.array([0.4, 0.9])
  expected = 0.0
  for b in range(2):
    for i in range(5):
      if masked[b, i]:
        expected -= _log_softmax(logits[b, i])[tokens[b, i]] / p[b]
  expected /= 2 * 5
  got = diffusion_lm.pretrain_loss(
    jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(masked), jnp.asarray(p, jnp.float32)
  )
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_sft_loss_by_hand():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 6, 7)).astype(np.float32)
  tokens = rng.integers(0, 7, (2, 6))
  answer = np.array([[0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]], bool)
  masked = np.array([[1, 0, 1, 0, 1, 1], [0, 1, 1, 0, 1, 0]], bool)  # prompt bits are ignored
  p = np.array([0.5, 0.25])
  rows = []
  for b in range(2):
    total = sum(
      -_log_softmax(logits[b, i])[tokens[b, i]] / p[b]
      for i in range(6)
      if masked[b, i] and answer[b, i]
    )
    rows.append(total / answer[b].sum())
  got = diffusion_lm.sft_loss(
    jnp.asarray(logits),
    jnp.asarray(tokens),
    jnp.asarray(masked),
    jnp.asarray(p, jnp.float32),
    jnp.asarray(answer),
  )
  np.testing.assert_allclose(got, np.mean(rows), rtol=1e-5)


def _config(**overrides):
  return common.override(diffusion_configs.get_config("test"), **overrides)


def test_task_loss_is_the_hand_computation_on_its_mask():
  """The task's loss on a batch equals the hand formula on the mask its rng draws."""
  config = _config(**{"diffusion.random_length_prob": 0.0})
  task = tasks.build(config)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 256, (4, 32)).astype(np.int32)
  segments = np.repeat([[1] * 20 + [2] * 12], 4, axis=0).astype(np.int32)
  positions = np.concatenate([np.arange(20), np.arange(12)])[None].repeat(4, 0).astype(np.int32)
  batch = {"tokens": tokens, "segment_ids": segments, "positions": positions}
  params, _ = task.init(jax.random.key(0), batch)
  key = jax.random.key(7)
  loss, metrics = task.loss(params, {}, batch, key)
  noisy, masked, p = diffusion_lm.noise(
    jax.random.split(key)[0], tokens, segments != 0, mask_token_id=MASK, eps=1e-3, antithetic=True
  )
  logits = task.model.apply({"params": params}, noisy, segment_ids=segments, positions=positions)
  logp = _log_softmax(logits)
  masked, p = np.asarray(masked), np.asarray(p, np.float64)
  expected = sum(-logp[b, i, tokens[b, i]] / p[b] for b, i in zip(*np.nonzero(masked))) / 128
  assert 0 < masked.sum() < masked.size
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert metrics["mask_rate"] == pytest.approx(masked.mean())


def test_sft_rows_and_loss_never_mask_the_prompt(tmp_path):
  path = tmp_path / "sft.jsonl"
  examples = [{"prompt": f"Q{i}?", "response": f"A{i}"} for i in range(20)]
  path.write_text("\n".join(json.dumps(e) for e in examples))
  config = _config(**{"diffusion.sft_data": str(path), "batch_size": 2, "seq_len": 8})
  task = tasks.build(config)
  train, held_out = task.datasets(
    global_batch=2, rows=(0, 2), train_batches=3, eval_batches=1, seed=0
  )
  batch = held_out[0]
  assert batch["tokens"].shape == (2, 8)
  text = bytes(batch["tokens"][0][:5].tolist()).decode()
  assert text == "Q9?A9" and list(batch["tokens"][0][5:]) == [257] * 3
  assert list(batch["prompt_mask"][0]) == [1, 1, 1, 0, 0, 0, 0, 0]
  batch = train[0]
  params, _ = task.init(jax.random.key(0), batch)
  for seed in range(5):  # the prompt is never masked; only answers (EOS padding included) are
    _, masked, _ = diffusion_lm.noise(
      jax.random.key(seed), batch["tokens"], batch["prompt_mask"] == 0, mask_token_id=MASK
    )
    assert not np.asarray(masked)[batch["prompt_mask"] == 1].any()
  loss, _ = task.loss(params, {}, batch, jax.random.key(0))
  assert np.isfinite(loss)
  metrics = task.evaluate(params, {}, held_out[0], task.init_state())
  assert float(metrics["loss"][1]) == (held_out[0]["prompt_mask"] == 0).sum()


def test_sft_data_errors_name_the_file_and_line(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "only a prompt"}\n')
  task = tasks.build(_config(**{"diffusion.sft_data": str(path)}))
  with pytest.raises(ValueError, match=r"bad.jsonl:2.*'prompt' and 'response'"):
    task.datasets(global_batch=2, rows=(0, 2), train_batches=1, eval_batches=1, seed=0)
  with pytest.raises(ValueError, match="mask_token_id=120"):  # 'x' is byte 120
    path.write_text(json.dumps({"prompt": "x", "response": "y"}))
    tasks.build(_config(**{"diffusion.sft_data": str(path), "model.mask_token_id": 120})).datasets(
      global_batch=1, rows=(0, 1), train_batches=1, eval_batches=0, seed=0
    )
  path.write_text(json.dumps({"prompt": "x" * 30, "response": "y" * 5}))
  task = tasks.build(_config(**{"diffusion.sft_data": str(path)}))
  with pytest.raises(ValueError, match=r"bad.jsonl:1.*seq_len=32"):
    task.datasets(global_batch=2, rows=(0, 2), train_batches=1, eval_batches=1, seed=0)
  path.write_text("\n\n")
  with pytest.raises(
    ValueError, match=r"diffusion.sft_data=.*bad.jsonl': the files hold no examples"
  ):
    task.datasets(global_batch=2, rows=(0, 2), train_batches=1, eval_batches=1, seed=0)


def test_trains_through_the_loop_sharded_like_one_device(tmp_path, losses, train_metrics):
  """The diffusion task in the shared loop: on a 2 x 2 x 2 mesh of 8 CPU devices the losses of one
  device, and an ELBO eval."""
  common_overrides = {"steps": 3, "sample_tokens": 8, "eval_every": 3}
  training.train(_config(**common_overrides, **{"mesh.data": 1}), str(tmp_path / "one"))
  training.train(
    _config(**common_overrides, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}),
    str(tmp_path / "mesh"),
  )
  one, mesh = losses(tmp_path / "one"), losses(tmp_path / "mesh")
  assert list(one) == [1, 2, 3]
  for step in one:
    assert mesh[step] == pytest.approx(one[step], abs=1e-5), (step, one, mesh)
  rows = [json.loads(line) for line in open(tmp_path / "one" / "metrics.jsonl")]
  evals = [r for r in rows if "eval/bpb" in r]
  assert evals and 5 < evals[-1]["eval/bpb"] < 12  # untrained: near log2(263) bits per byte


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match="causal"):
    diffusion_lm.DiffusionLMConfig.tiny(causal=True)
  with pytest.raises(ValueError, match="mask_token_id=300"):
    diffusion_lm.DiffusionLMConfig.tiny(mask_token_id=300)
  with pytest.raises(ValueError, match="config.diffusion.eps"):
    tasks.build(_config(**{"diffusion.eps": 0.0}))
  config = _config()
  with pytest.raises(ValueError, match="model_family='diffusion_lm'"):
    tasks.DiffusionTask(
      models.get("transformer-tiny"),
      seq_len=32,
      data_config=config.data,
      diffusion_config=config.diffusion,
    )


def test_zoo():
  model = models.get("diffusion-lm-tiny")
  assert isinstance(model, diffusion_lm.DiffusionLM)
  assert model.config.mask_token_id == MASK and not model.config.causal
  assert {"diffusion-lm-tiny", "diffusion-lm-small", "diffusion-lm-base"} <= set(models.list())


# ---------------------------------------------------------------------------------------------
# Sampling


def test_generate_keeps_prompt_fills_every_mask_on_schedule(model_and_params):
  """Semi-AR sampling: the prompt never changes, each step commits the specified number of
  tokens of the current block only, and no mask is left at the end."""
  model, params = model_and_params
  prompt = np.array([[5, 6, 7], [8, 9, 10]], np.int32)
  gen, block, steps = 12, 4, 9  # 3 blocks of 4 tokens in 3 steps each: 2, 1, 1
  out, trace = diffusion_lm.generate(
    model,
    params,
    prompt,
    gen_length=gen,
    steps=steps,
    block_length=block,
    temperature=1.0,
    rng=jax.random.key(0),
    return_trace=True,
  )
  out, trace = np.asarray(out), np.asarray(trace)
  assert trace.shape == (steps, 2, 15)
  np.testing.assert_array_equal(trace[:, :, :3], np.broadcast_to(prompt, (steps, 2, 3)))
  assert not (out == MASK).any() and np.array_equal(trace[-1], out)
  masks = np.concatenate([np.full((1, 2), gen), (trace[:, :, 3:] == MASK).sum(-1)])
  committed = -np.diff(masks, axis=0)
  assert diffusion_lm.commit_schedule(4, 3) == [2, 1, 1]
  np.testing.assert_array_equal(committed, np.repeat([[2, 1, 1] * 3], 2, 0).T)
  for s in range(steps):  # blocks fill left to right: later blocks stay masked
    block_now = s // 3
    assert (trace[s, :, 3 + 4 * (block_now + 1) :] == MASK).all()
    assert not (trace[s, :, 3 : 3 + 4 * block_now] == MASK).any()


@pytest.mark.parametrize("count,steps", [(10, 4), (7, 7), (9, 2), (5, 3)])
def test_commit_schedule_spreads_the_remainder_over_the_first_steps(count, steps):
  schedule = diffusion_lm.commit_schedule(count, steps)
  assert sum(schedule) == count and max(schedule) - min(schedule) <= 1
  assert schedule == sorted(schedule, reverse=True)


def test_low_confidence_with_guidance_commits_the_most_confident_guided_token(model_and_params):
  """One token per step: the first committed token is where the guided distribution
  ``un + (s + 1)(cond - un)`` (un: prompt masked) is most confident, and its argmax."""
  model, params = model_and_params
  prompt = np.array([[40, 41, 42, 43]], np.int32)
  scale = 1.5
  _, trace = diffusion_lm.generate(
    model, params, prompt, gen_length=6, steps=6, block_length=6, cfg_scale=scale, return_trace=True
  )
  canvas = np.concatenate([prompt, np.full((1, 6), MASK, np.int32)], 1)
  cond = np.asarray(model.apply({"params": params}, canvas), np.float64)
  uncond = np.asarray(model.apply({"params": params}, np.full_like(canvas, MASK)), np.float64)
  guided = uncond[..., :MASK] + (scale + 1) * (cond[..., :MASK] - uncond[..., :MASK])
  probs = np.exp(_log_softmax(guided))[0, 4:]
  where = int(np.argmax(probs.max(-1)))
  first = np.asarray(trace[0, 0, 4:])
  assert (first != MASK).sum() == 1
  assert first[where] == np.argmax(probs[where])


def test_same_seed_same_output_and_no_recompiles(model_and_params):
  model, params = model_and_params
  kw = dict(gen_length=8, steps=4, block_length=8, temperature=1.0, remasking="random")
  prompt = np.array([[1, 2, 3]], np.int32)
  a = diffusion_lm.generate(model, params, prompt, rng=jax.random.key(1), **kw)
  size = diffusion_lm._denoise._cache_size()  # pylint: disable=protected-access
  b = diffusion_lm.generate(model, params, prompt, rng=jax.random.key(1), **kw)
  c = diffusion_lm.generate(
    model, params, prompt + 1, rng=jax.random.key(2), **{**kw, "temperature": 0.7}
  )  # other values, same shapes
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a[:, 3:], c[:, 3:])
  assert diffusion_lm._denoise._cache_size() == size  # pylint: disable=protected-access


def test_infill_fills_every_mask_and_keeps_the_rest(model_and_params):
  model, params = model_and_params
  tokens = np.array([[MASK, MASK, MASK, 61, 62, MASK], [70, MASK, 72, MASK, MASK, MASK]])
  out, trace = diffusion_lm.infill(model, params, tokens, steps=2, return_trace=True)
  out, trace = np.asarray(out), np.asarray(trace)
  kept = tokens != MASK
  np.testing.assert_array_equal(out[kept], tokens[kept])
  assert not (out == MASK).any()
  np.testing.assert_array_equal((trace[0] == MASK).sum(-1), [2, 2])  # 4 masks in 2 steps: 2, 2
  with pytest.raises(ValueError, match="steps=5"):
    diffusion_lm.infill(model, params, tokens, steps=5)


def test_sampler_argument_errors(model_and_params):
  model, params = model_and_params
  prompt = np.ones((1, 2), np.int32)
  with pytest.raises(ValueError, match="block_length=5"):
    diffusion_lm.generate(model, params, prompt, gen_length=8, steps=8, block_length=5)
  with pytest.raises(ValueError, match="steps=3"):
    diffusion_lm.generate(model, params, prompt, gen_length=8, steps=3, block_length=4)
  with pytest.raises(ValueError, match="remasking"):
    diffusion_lm.generate(
      model, params, prompt, gen_length=8, steps=8, block_length=8, remasking="top"
    )
  with pytest.raises(ValueError, match="mask_token_id"):
    diffusion_lm.generate(model, params, prompt * MASK, gen_length=8, steps=8, block_length=8)


@pytest.mark.parametrize(
  "bad,match",
  [
    (dict(temperature=float("nan")), "temperature must be >= 0 and finite, got nan"),
    (dict(temperature=float("inf")), "temperature must be >= 0 and finite, got inf"),
    (dict(cfg_scale=float("nan")), "cfg_scale must be >= 0 and finite, got nan"),
    (dict(cfg_scale=float("inf")), "cfg_scale must be >= 0 and finite, got inf"),
    (dict(steps=8.0), "steps must be an integer, got 8.0"),
    (dict(block_length=8.0), "block_length must be an integer, got 8.0"),
  ],
)
def test_sampler_refuses_nan_inf_and_non_integer_arguments(model_and_params, bad, match):
  # NaN passed `temperature < 0` and gave all-zero tokens; NaN cfg_scale silently meant no guidance.
  model, params = model_and_params
  prompt = np.ones((1, 2), np.int32)
  kw = {**dict(gen_length=8, steps=8, block_length=8), **bad}
  with pytest.raises(ValueError, match=match):
    diffusion_lm.generate(model, params, prompt, **kw)
  if "temperature" in bad or "cfg_scale" in bad:
    tokens = np.array([[1, MASK, MASK]])
    with pytest.raises(ValueError, match=match):
      diffusion_lm.infill(model, params, tokens, steps=2, **bad)


def test_float_token_ids_are_refused(model_and_params):
  # They were truncated ([[1.7, 2.2]] ran as [[1, 2]]).
  model, params = model_and_params
  floats = np.array([[1.7, 2.2, 3.0]])
  with pytest.raises(ValueError, match="prompt_BP must be integer token ids, got float64"):
    diffusion_lm.generate(model, params, floats, gen_length=8, steps=8, block_length=8)
  with pytest.raises(ValueError, match="tokens_BL must be integer token ids, got float64"):
    diffusion_lm.infill(model, params, np.array([[1.5, MASK, MASK]]), steps=2)
  with pytest.raises(ValueError, match="tokens_BL must be integer token ids, got float64"):
    diffusion_lm.elbo(model, params, floats, num_samples=2)
  with pytest.raises(ValueError, match="prompt_len must be an integer, got 1.5"):
    diffusion_lm.elbo(model, params, np.array([[1, 2, 3]]), num_samples=2, prompt_len=1.5)
  with pytest.raises(ValueError, match="outside"):
    diffusion_lm.elbo(model, params, np.array([[1, 2, 264]]), num_samples=2)


# ---------------------------------------------------------------------------------------------
# Likelihood


def _tiny_vocab_model():
  config = diffusion_lm.DiffusionLMConfig(
    vocab_size=6, mask_token_id=4, eos_token_id=5, d_model=16, num_layers=1, num_heads=2, mlp_dim=32
  )
  model = diffusion_lm.DiffusionLM(config)
  params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  return model, jax.tree.map(lambda p: 4.0 * p, params)


def _exact(model, params, x, prompt_len=0):
  """(exact ELBO, exact NLL) in nats of the answer ``x[prompt_len:]`` by enumeration: the ELBO
  over every mask set, the NLL of the generative model (unmask one token at a time in a uniformly
  random order) over every order."""
  length = len(x)
  answer = list(range(prompt_len, length))

  apply, cache = jax.jit(model.apply), {}

  def logp_given(unmasked):  # log p(. | x at the prompt and the unmasked positions)
    key = frozenset(unmasked)
    if key not in cache:
      keep = np.isin(np.arange(length), list(key)) | (np.arange(length) < prompt_len)
      cache[key] = _log_softmax(apply({"params": params}, np.where(keep, x, 4)[None]))[0]
    return cache[key]

  elbo = 0.0
  for count in range(1, len(answer) + 1):
    sets = list(itertools.combinations(answer, count))
    for masked in sets:
      logp = logp_given(set(answer) - set(masked))
      elbo -= sum(logp[i, x[i]] for i in masked) / count / len(sets)
  probs = []
  for order in itertools.permutations(answer):
    logp_total = sum(logp_given(order[:k])[order[k], x[order[k]]] for k in range(len(order)))
    probs.append(math.exp(logp_total))
  return elbo, -math.log(np.mean(probs))


@pytest.mark.parametrize("prompt_len", [0, 1])
def test_elbo_bounds_the_exact_nll_and_its_spread_shrinks(prompt_len):
  model, params = _tiny_vocab_model()
  x = np.array([0, 3, 1, 2, 2])
  exact_elbo, exact_nll = _exact(model, params, x, prompt_len)
  assert exact_elbo > exact_nll + 1e-3  # Jensen, strictly for a model this uneven
  estimates = {}
  for n in (4, 64):
    estimates[n] = np.array(
      [
        diffusion_lm.elbo(
          model,
          params,
          x[None],
          num_samples=n,
          batch_size=4,
          prompt_len=prompt_len,
          rng=jax.random.key(seed),
        ).nats[0]
        for seed in range(24)
      ]
    )
  for n, e in estimates.items():  # unbiased: the mean is the exact ELBO within 4 standard errors
    assert abs(e.mean() - exact_elbo) < 4 * e.std() / math.sqrt(len(e)) + 1e-4, (n, e.mean())
  assert estimates[64].std() < estimates[4].std() / 2.5  # ~ 1/sqrt(16) or better
  assert estimates[64].mean() > exact_nll


def test_stratified_counts_cover_every_count_evenly():
  answer = jnp.broadcast_to(jnp.arange(10) >= 2, (3, 10))  # 8 answer tokens a row
  masked, count = diffusion_lm.stratified_masks(
    jax.random.key(0), jnp.array([0.1, 0.5, 0.97]), jnp.arange(16), 16, answer
  )
  for b in range(3):
    np.testing.assert_array_equal(np.bincount(count[:, b], minlength=9)[1:], [2] * 8)
  np.testing.assert_array_equal(masked.sum(-1), count)
  assert not masked[..., :2].any()
