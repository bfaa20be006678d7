"""Multi-token prediction heads: the loss each head trains on, document boundaries, decoding."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from flaxseed.configs import lm as lm_configs
from flaxseed.models import sampling
from flaxseed.models import transformer
from flaxseed.training.tasks import lm as lm_task

L = 12  # inputs per row; rows hold L + 1 tokens


def _task(style, heads=3, weight=0.5):
  cfg = transformer.TransformerConfig.tiny(
    d_model=32, num_layers=2, num_heads=2, mlp_dim=64, mtp_heads=heads, mtp_style=style
  )
  return lm_task.LMTask(
    transformer.Transformer(cfg),
    seq_len=L,
    data_config=lm_configs.get_config("test").data,
    mtp_weight=weight,
  )


def _batch(rng, segments=None):
  tokens = rng.integers(0, 256, (2, L + 1)).astype(np.int32)
  segments = np.ones_like(tokens) if segments is None else segments
  positions = np.zeros_like(tokens)
  for b in range(tokens.shape[0]):  # positions restart at each document
    for i in range(1, tokens.shape[1]):
      same = segments[b, i] == segments[b, i - 1]
      positions[b, i] = positions[b, i - 1] + 1 if same else 0
  return {"tokens": tokens, "segment_ids": segments, "positions": positions}


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  return (
    x
    - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))
    - x.max(-1, keepdims=True)
  )


@pytest.mark.parametrize("style", ["parallel", "sequential"])
def test_head_k_is_cross_entropy_against_tokens_k_further_ahead(style):
  task = _task(style)
  batch = _batch(np.random.default_rng(0))
  params, _ = task.init(jax.random.key(0), batch)
  loss, metrics = task.loss(params, {}, batch, None)
  logits, extra = task.model.apply({"params": params}, batch["tokens"][:, :-1], mtp=True)
  logits, extra = np.asarray(logits), np.asarray(extra)
  tokens, want = batch["tokens"], []
  for k in range(1, 4):  # head k reads position i and predicts the token at i + 1 + k
    logp = _log_softmax(extra[k - 1])
    n = L - k  # positions whose target lies in the row
    nll = -np.take_along_axis(logp[:, :n], tokens[:, 1 + k : 1 + k + n, None], -1)
    want.append(nll.mean())
    assert float(metrics[f"mtp_{k}/loss"]) == pytest.approx(want[-1], rel=1e-5)
    acc = (np.argmax(extra[k - 1][:, :n], -1) == tokens[:, 1 + k :]).mean()
    assert float(metrics[f"mtp_{k}/accuracy"]) == pytest.approx(acc, abs=1e-6)
  main = -np.take_along_axis(_log_softmax(logits), tokens[:, 1:, None], -1).mean()
  assert float(metrics["loss"]) == pytest.approx(main, rel=1e-5)
  assert float(loss) == pytest.approx(main + 0.5 * np.mean(want), rel=1e-5)
  # The main head's logits are those of the same model without heads.
  plain = task.model.apply({"params": params}, batch["tokens"][:, :-1])
  np.testing.assert_array_equal(plain, logits)
  sums = task.evaluate(params, {}, batch, None)
  total, count = sums["mtp_2/loss"]
  assert float(total / count) == pytest.approx(want[1], rel=1e-5) and count == 2 * (L - 2)


@pytest.mark.parametrize("style", ["parallel", "sequential"])
def test_packed_documents_never_predict_across_a_boundary(style):
  task = _task(style)
  segments = np.ones((2, L + 1), np.int32)
  segments[:, 7:] = 2  # document 1 is tokens 0..6, document 2 starts at token 7
  rng = np.random.default_rng(1)
  batch = _batch(rng, segments)
  params, _ = task.init(jax.random.key(0), batch)
  heads = task._heads(params, {}, batch)  # pylint: disable=protected-access
  for k, (_, _, _, weights) in enumerate(heads):
    for i in range(L):
      target = i + 1 + k
      want = target <= L and segments[0, target] == segments[0, i]
      assert weights[0, i] == want, (k, i)
  # Whatever document 2 holds, every counted loss of document 1 is unchanged.
  other = dict(batch, tokens=batch["tokens"].copy())
  other["tokens"][:, 7:] = rng.integers(0, 256, (2, L + 1 - 7))
  for (nll_a, _, _, w), (nll_b, _, _, _) in zip(heads, task._heads(params, {}, other)):  # pylint: disable=protected-access
    np.testing.assert_allclose(
      np.where(w[:, :7] > 0, nll_a[:, :7], 0), np.where(w[:, :7] > 0, nll_b[:, :7], 0), rtol=1e-6
    )


def test_parallel_heads_decode_like_the_full_forward():
  model = _task("parallel").model
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 256, (2, 10)), jnp.int32)
  params = model.init(jax.random.key(0), tokens)["params"]
  full, full_extra = model.apply({"params": params}, tokens, mtp=True)
  cache = sampling.init_cache(model, 2, 10)
  outs = []
  for start, stop in ((0, 4), (4, 5), (5, 10)):  # a prefill, one step, a chunk (a verify pass)
    (logits, extra), variables = model.apply(
      {"params": params, "cache": cache},
      tokens[:, start:stop],
      decode=True,
      mtp=True,
      mutable=["cache"],
    )
    cache = variables["cache"]
    outs.append((logits, extra))
  np.testing.assert_allclose(jnp.concatenate([o[0] for o in outs], 1), full, atol=1e-5)
  np.testing.assert_allclose(jnp.concatenate([o[1] for o in outs], 2), full_extra, atol=1e-5)


def test_sequential_heads_decode_like_the_full_forward():
  """Decoding, head k's entry for position j sits at the slot of token j + k: its logits at slot
  p equal the full forward's at j = p - k, across a prefill, one step and a chunk, each carrying
  the depths' last hidden states; and one drafting step of head 1 equals the full forward."""
  model = _task("sequential").model
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, 256, (2, 10)), jnp.int32)
  params = model.init(jax.random.key(0), tokens)["params"]
  full, full_extra = model.apply({"params": params}, tokens, mtp=True)
  cache, carry, mains, extras = sampling.init_cache(model, 2, 10), None, [], []
  for start, stop in ((0, 4), (4, 5), (5, 10)):
    positions = jnp.broadcast_to(jnp.arange(start, stop), (2, stop - start))
    (logits, extra, hiddens), variables = model.apply(
      {"params": params, "cache": cache},
      tokens[:, start:stop],
      decode=True,
      mtp=True,
      mtp_carry=carry,
      positions=positions,
      mutable=["cache"],
    )
    cache, carry = variables["cache"], hiddens[:, :, -1]
    mains.append(logits)
    extras.append(extra)
    if start == 0:  # after the prefill: head 1 drafts at position 3 from token 4
      (draft, _), _ = model.apply(
        {"params": params, "cache": cache},
        tokens[:, 4:5],
        decode=True,
        mtp_draft=(1, hiddens[0][:, -1:]),
        positions=jnp.full((2, 1), 3),
        mutable=["cache"],
      )
      np.testing.assert_allclose(draft[:, 0], full_extra[0][:, 3], atol=1e-5)
  np.testing.assert_allclose(jnp.concatenate(mains, 1), full, atol=1e-5)
  extra = jnp.concatenate(extras, 2)
  for k in range(1, 4):
    np.testing.assert_allclose(extra[k - 1][:, k:], full_extra[k - 1][:, : 10 - k], atol=1e-5)


def test_errors():
  with pytest.raises(ValueError, match="mtp_style='tree' is not one of"):
    transformer.TransformerConfig.tiny(mtp_heads=2, mtp_style="tree")
  with pytest.raises(ValueError, match="mtp_heads must be >= 0"):
    transformer.TransformerConfig.tiny(mtp_heads=-1)
  plain = transformer.Transformer(transformer.TransformerConfig.tiny(d_model=32, num_heads=2))
  tokens = jnp.zeros((1, 4), jnp.int32)
  params = plain.init(jax.random.key(0), tokens)["params"]
  with pytest.raises(ValueError, match="mtp=True needs config.mtp_heads > 0"):
    plain.apply({"params": params}, tokens, mtp=True)
  model = _task("sequential").model
  with pytest.raises(ValueError, match="decoding sequential heads .* needs explicit positions"):
    model.init(jax.random.key(0), tokens, decode=True, mtp=True)
  with pytest.raises(ValueError, match="mtp_carry and mtp_draft decode sequential heads"):
    model.init(jax.random.key(0), tokens, mtp_draft=(1, jnp.zeros((1, 4, 32))))
  config = ml_collections.ConfigDict({"z_loss": 0.0, "mtp_weight": -1.0})
  with pytest.raises(ValueError, match="config.mtp_weight=-1.0 must be >= 0"):
    lm_task.LMTask.lm_options(config, _task("parallel").model)


def test_trains_through_the_loop_sharded_like_one_device(tmp_path, losses, train_metrics):
  """``--config.model.mtp_heads=2``: the LM task trains the heads (their metrics are logged and
  evaluated); the 2 x 2 x 2 mesh gives the one-device losses."""
  from flaxseed import training  # pylint: disable=g-import-not-at-top
  from flaxseed.configs import common  # pylint: disable=g-import-not-at-top

  config = common.override(
    lm_configs.get_config("test"),
    **{"model.mtp_heads": 2, "model.mtp_style": "sequential", "steps": 3, "sample_tokens": 0},
  )
  one = training.train(
    common.override(config.copy_and_resolve_references(), **{"mesh.data": 1}), str(tmp_path / "one")
  )
  training.train(
    common.override(config, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}),
    str(tmp_path / "mesh"),
  )
  assert {"eval/mtp_1/accuracy", "eval/mtp_2/loss"} <= set(one), sorted(one)
  a, b = losses(tmp_path / "one"), losses(tmp_path / "mesh")
  assert list(a) == [1, 2, 3]
  for step in a:
    assert b[step] == pytest.approx(a[step], abs=1e-5), (step, a, b)
  assert {"mtp_1/loss", "mtp_2/accuracy"} <= set(train_metrics(tmp_path / "one")[3])


def test_heads_train_on_a_frozen_trunk(tmp_path):
  """Medusa-1: ``config.mtp_freeze_trunk`` trains only the heads on ``init_from``'s model, whose
  parameters stay those of the run it came from, bit for bit; resuming may not swap them."""
  from flaxseed import training  # pylint: disable=g-import-not-at-top
  from flaxseed.configs import common  # pylint: disable=g-import-not-at-top

  base = common.override(
    lm_configs.get_config("test"), **{"steps": 2, "sample_tokens": 0, "mesh.data": 1}
  )
  training.train(base, str(tmp_path / "base"))
  copy = lambda c: c.copy_and_resolve_references()  # noqa: E731  (override sets keys in place)
  heads = common.override(
    copy(base),
    **{
      "model.mtp_heads": 2,
      "mtp_freeze_trunk": True,
      "init_from": str(tmp_path / "base"),
      "steps": 3,
      "mtp_weight": 1.0,
    },
  )
  training.train(heads, str(tmp_path / "heads"))
  trained = training.restore(heads, str(tmp_path / "heads"))
  assert set(trained.params) == {"mtp_0", "mtp_1"}  # the heads are all that trains
  base_params = training.restore(base, str(tmp_path / "base")).params
  for a, b in zip(jax.tree.leaves(trained.frozen), jax.tree.leaves(base_params)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="mtp_freeze_trunk=True needs config.init_from"):
    training.train(common.override(copy(heads), init_from=""), str(tmp_path / "none"))
  with pytest.raises(ValueError, match="mtp_freeze_trunk=True trains heads"):
    training.train(common.override(copy(heads), **{"model.mtp_heads": 0}), str(tmp_path / "none"))
  with pytest.raises(ValueError, match="init_from"):  # resuming on another trunk
    training.train(
      common.override(copy(heads), init_from=str(tmp_path / "heads"), steps=4),
      str(tmp_path / "heads"),
    )
