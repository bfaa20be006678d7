"""Reading and steering (``models/steering.py``): planted directions, operators, the model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxseed.models import sampling
from flaxseed.models import sites
from flaxseed.models import steering
from flaxseed.models import transformer

D = 32


def _planted(n=1000, seed=0):
  """Paired activations: shared isotropic noise per pair, positives displaced along a planted
  unit direction ``u`` by a varying amount (about 3 noise standard deviations), plus independent
  noise. (With anisotropic noise a logistic probe finds the discriminant, cov^-1 u, not u.)"""
  rng = np.random.default_rng(seed)
  u = rng.normal(size=D)
  u /= np.linalg.norm(u)
  base = rng.normal(size=(n, D))
  shift = rng.uniform(0.5, 1.5, size=(n, 1)) * u * 3.0
  pos = base + shift + 0.1 * rng.normal(size=(n, D))
  neg = base + 0.1 * rng.normal(size=(n, D))
  return pos, neg, u


@pytest.mark.parametrize("reader", steering.READERS)
def test_readers_recover_a_planted_direction_with_the_right_sign(reader):
  pos, neg, u = _planted()
  d = steering.read(pos, neg, reader, site="layers_0/resid_post")
  cos = d.vector @ u / np.linalg.norm(d.vector)
  assert cos > 0.95, cos  # positive: the sign is fixed
  assert steering.accuracy(d, pos, neg) > 0.85  # Phi(1.5) = 0.93 along u
  flipped = steering.read(neg, pos, reader, site="layers_0/resid_post")
  assert flipped.vector @ u < 0  # the sign follows which side is positive


def test_operators():
  h = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, D)), jnp.float32)
  v = jnp.asarray(np.random.default_rng(2).normal(size=D), jnp.float32)
  unit = v / jnp.linalg.norm(v)
  args = lambda c: {"v": v, "c": jnp.float32(c)}  # noqa: E731
  add = steering.Operator("add")
  np.testing.assert_allclose(add(h, args(2.0)), h + 2.0 * v[None, None], rtol=1e-6)
  np.testing.assert_array_equal(add(h, args(0.0)), h)
  projected = steering.Operator("project")(h, args(1.0))
  np.testing.assert_allclose(projected @ unit, 0.0, atol=1e-5)  # the component is gone
  piece = steering.Operator("piecewise")(h, args(1.0))
  sign = jnp.sign(h @ v)[..., None]
  np.testing.assert_allclose(piece, h + sign * v[None, None], rtol=1e-6)
  kept = steering.Operator("add", normalize=True)(h, args(5.0))
  np.testing.assert_allclose(jnp.linalg.norm(kept, axis=-1), jnp.linalg.norm(h, axis=-1), rtol=1e-5)


@pytest.fixture(scope="module")
def model_and_params():
  cfg = transformer.TransformerConfig(
    d_model=D, num_layers=2, num_heads=4, mlp_dim=64, scan_layers=False
  )
  model = transformer.Transformer(cfg)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  return model, params


def test_reading_and_steering_a_model(model_and_params, tmp_path):
  """Activations at the last token equal ``sites.capture``; a steered greedy generation equals
  the argmax of the spliced full forward; a saved direction loads back; a sweep compiles once."""
  model, params = model_and_params
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (6, 10)), jnp.int32)
  site = "layers_0/resid_post"
  acts = steering.activations(model, params, tokens, [site, "layers_1/mlp_out"])
  captured = sites.capture(model, {"params": params}, tokens, site)
  np.testing.assert_allclose(acts[site], captured[:, -1], rtol=1e-6)
  pooled = steering.activations(model, params, tokens, [site], index=None)[site]
  np.testing.assert_allclose(pooled, captured.mean(1), rtol=1e-5)
  d = steering.read(acts[site][:3], acts[site][3:], "mean_diff", site=site)
  hook = steering.steer(d, 3.0, "add")
  out = sampling.generate(
    model, params, tokens[:2, :4], max_new_tokens=5, temperature=0.0, interventions=[hook]
  )
  spliced = sites.splice(model, {"params": params}, out, site, lambda h: hook[1](h, hook[2]))
  np.testing.assert_array_equal(out[:, 4:], jnp.argmax(spliced[:, 3:-1], -1))
  size = sampling._generate._cache_size()  # pylint: disable=protected-access
  sampling.generate(
    model,
    params,
    tokens[:2, :4],
    max_new_tokens=5,
    temperature=0.0,
    interventions=[steering.steer(d, -1.0, "add")],
  )
  assert sampling._generate._cache_size() == size  # pylint: disable=protected-access
  pytest.importorskip("safetensors")
  steering.save(str(tmp_path / "d.safetensors"), d)
  back = steering.load(str(tmp_path / "d.safetensors"), width=D)
  np.testing.assert_array_equal(back.vector, d.vector)
  assert (back.site, back.reader) == (site, "mean_diff")
  with pytest.raises(ValueError, match=r"d.safetensors: the direction has width 32, the model 64"):
    steering.load(str(tmp_path / "d.safetensors"), width=64)


def test_bad_steering_input_is_named(model_and_params):
  model, params = model_and_params
  wrong = steering.Direction(np.ones(D + 1, np.float32), "layers_0/resid_post", "mean_diff")
  with pytest.raises(ValueError, match=r"direction has width 33 but the activation .* has 32"):
    sampling.generate(
      model, params, [[1, 2]], max_new_tokens=2, interventions=[steering.steer(wrong, 1.0)]
    )
  nowhere = steering.Direction(np.ones(D, np.float32), "layers_9/resid_post", "mean_diff")
  with pytest.raises(ValueError, match=r"site 'layers_9/resid_post'.*sites: \["):
    sampling.generate(
      model, params, [[1, 2]], max_new_tokens=2, interventions=[steering.steer(nowhere, 1.0)]
    )
  with pytest.raises(ValueError, match=r"reader='cluster' is not one of"):
    steering.read(np.ones((2, D)), np.zeros((2, D)), "cluster", site="x")
  with pytest.raises(ValueError, match=r"operator 'scale' is not one of"):
    steering.Operator("scale")
