"""Sparse autoencoders: sparsity per architecture, the decoder's unit norm, near-exact
reconstruction without sparsity, JumpReLU's straight-through gradient, geometric median."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxseed import models
from flaxseed.models import sae
from flaxseed.models import sites


def _data(n=64, d=16, seed=0):
  return jax.random.normal(jax.random.key(seed), (n, d)) * jnp.linspace(0.5, 2.0, d)[None]


def _init(cfg, x):
  model = sae.SAE(cfg)
  variables = model.init(jax.random.key(1), x)
  return model, {**variables, "params": nn.unbox(variables["params"])}


def test_topk_l0_is_exactly_k():
  x = _data(d=32)
  model, v = _init(sae.SAEConfig(d_in=32, num_latents=256, arch="topk", k=7), x)
  f = model.apply(v, x, method=model.encode)
  np.testing.assert_array_equal((f != 0).sum(-1), 7)
  _, metrics = sae.loss(model, v, x)
  assert metrics["l0"] == 7


def test_batch_topk_keeps_k_per_row_on_average_and_learns_its_threshold():
  x = _data(d=32)
  model, v = _init(sae.SAEConfig(d_in=32, num_latents=256, arch="batch_topk", k=5), x)
  f = model.apply(v, x, method=model.encode)
  assert (f != 0).sum() == 5 * 64 and len(set(np.asarray((f != 0).sum(-1)))) > 1
  v = sae.batch_topk_threshold(model, v, x, rate=1.0)
  assert v["batch_stats"]["threshold"] == pytest.approx(float(f[f > 0].min()))
  inference = model.apply(v, x, True, method=model.encode)
  assert (inference != 0).sum() == 5 * 64 - 1  # all kept ones above the smallest kept one


def test_decoder_rows_have_unit_norm_after_every_step():
  x = _data()
  model, v = _init(sae.SAEConfig(d_in=16, num_latents=64, arch="topk", k=4), x)
  params = sae.unit_norm_decoder(v["params"])
  opt = optax.adam(1e-2)
  state = opt.init(params)
  grad_fn = jax.jit(jax.grad(lambda p: sae.loss(model, {"params": p}, x)[0]))
  for _ in range(10):
    grads = sae.remove_parallel_grads(params, grad_fn(params))
    w = params["w_dec"] / jnp.linalg.norm(params["w_dec"], axis=-1, keepdims=True)
    np.testing.assert_allclose((grads["w_dec"] * w).sum(-1), 0.0, atol=1e-5)
    updates, state = opt.update(grads, state)
    params = sae.unit_norm_decoder(optax.apply_updates(params, updates))
    np.testing.assert_allclose(jnp.linalg.norm(params["w_dec"], axis=-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize(
  "arch,extra", [("relu_l1", dict(l1_coefficient=0.0)), ("topk", dict(k=32))]
)
def test_reconstruction_is_near_exact_without_sparsity(arch, extra):
  """Sparsity off (no L1; k = width) and width >= input: the SAE learns to pass x through."""
  x = _data(n=256)
  cfg = sae.SAEConfig(d_in=16, num_latents=32, arch=arch, **extra)
  model, v = _init(cfg, x)
  params = {**v["params"], "b_dec": sae.geometric_median(x)}
  opt = optax.adam(1e-2)
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    grads = jax.grad(lambda p: sae.loss(model, {"params": p}, x)[0])(params)
    updates, state = opt.update(sae.remove_parallel_grads(params, grads), state)
    return sae.unit_norm_decoder(optax.apply_updates(params, updates)), state

  for _ in range(600):
    params, state = step(params, state)
  x_hat, f = model.apply({"params": params}, x)
  metrics = sae.reconstruction_metrics(x, x_hat, f)
  assert metrics["fvu"] < 1e-3 and metrics["cossim"] > 0.999, metrics


def test_jumprelu_straight_through_gradients():
  """d/dtheta of sum(JumpReLU) is -theta/eps times the pre-activations within eps/2 of theta;
  d/dz is the step; the L0 term's d/dtheta is -1/eps per such pre-activation."""
  eps = 0.1
  z = jnp.array([[0.45, 0.52, 0.9], [0.58, 0.1, 0.31]])
  theta = jnp.array([0.5, 0.55, 0.3])
  d_theta = jax.grad(lambda t: sae.jumprelu(z, t, eps).sum())(theta)
  near = (jnp.abs(z - theta[None]) < eps / 2).sum(0)  # [2, 1, 1]
  np.testing.assert_allclose(d_theta, -theta / eps * near, rtol=1e-6)
  d_z = jax.grad(lambda a: sae.jumprelu(a, theta, eps).sum())(z)
  np.testing.assert_array_equal(d_z, (z > theta[None]).astype(jnp.float32))
  np.testing.assert_array_equal(sae.jumprelu(z, theta, eps), jnp.where(z > theta[None], z, 0.0))
  d_l0 = jax.grad(lambda t: sae.jumprelu_l0(z, t, eps))(theta)
  np.testing.assert_allclose(d_l0, -near / eps / 2, rtol=1e-6)  # mean over 2 rows


def test_gated_and_jumprelu_losses_train_the_threshold_and_gate():
  x = _data()
  for arch in ("jumprelu", "gated"):
    model, v = _init(sae.SAEConfig(d_in=16, num_latents=64, arch=arch), x)
    grads = jax.grad(lambda p, model=model: sae.loss(model, {"params": p}, x)[0])(v["params"])
    name = "log_threshold" if arch == "jumprelu" else "r_mag"
    assert jnp.abs(grads[name]).sum() > 0 and all(
      jnp.isfinite(g).all() for g in jax.tree.leaves(grads)
    )


def test_auxk_uses_only_dead_latents():
  x = _data()
  model, v = _init(sae.SAEConfig(d_in=16, num_latents=64, arch="topk", k=4, aux_k=8), x)
  none_dead = sae.loss(model, v, x, dead_F=jnp.zeros(64, bool))[1]["auxk"]
  assert none_dead == 0.0
  dead = jnp.arange(64) < 16
  grads = jax.grad(lambda p: sae.loss(model, {"params": p}, x, dead_F=dead)[1]["auxk"])(v["params"])
  assert jnp.abs(grads["w_dec"][16:]).max() == 0 and jnp.abs(grads["w_dec"][:16]).max() > 0


def test_geometric_median():
  pts = jnp.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [10.0, 10.0], [0.2, 0.3]])
  m = sae.geometric_median(pts)
  objective = lambda y: jnp.linalg.norm(pts - y[None], axis=-1).sum()
  grid = jnp.stack(jnp.meshgrid(jnp.linspace(-1, 2, 301), jnp.linspace(-1, 2, 301)), -1)
  best = jax.vmap(jax.vmap(objective))(grid).min()
  assert objective(m) <= best + 1e-4 and objective(m) < objective(pts.mean(0))


def test_reconstruction_metrics():
  x = _data()
  f = jnp.ones((64, 3))
  perfect = sae.reconstruction_metrics(x, x, f)
  assert perfect["fvu"] == 0 and perfect["cossim"] == pytest.approx(1.0) and perfect["l0"] == 3
  mean = sae.reconstruction_metrics(x, jnp.broadcast_to(x.mean(0), x.shape), f)
  assert mean["fvu"] == pytest.approx(1.0) and mean["explained_variance"] == pytest.approx(0.0)


def test_zoo_and_config_errors():
  for arch in sae.ARCHS:
    assert models.get(f"sae-{arch.replace('_', '-')}-tiny").config.arch == arch
  with pytest.raises(ValueError, match="arch='dense'"):
    sae.SAEConfig(d_in=8, num_latents=16, arch="dense")
  with pytest.raises(ValueError, match="k=32 must be <= num_latents=16"):
    sae.SAEConfig(d_in=8, num_latents=16, arch="topk", k=32)
  with pytest.raises(ValueError, match="l1_coefficient"):
    sae.SAEConfig(d_in=8, num_latents=64, l1_coefficient=-1.0)


@pytest.mark.parametrize(
  "field", ["aux_coefficient", "l1_coefficient", "l0_coefficient", "jumprelu_bandwidth"]
)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_and_inf_coefficients_are_refused(field, value):
  with pytest.raises(ValueError, match=f"{field} must be .* and finite, got {value}"):
    sae.SAEConfig(d_in=8, num_latents=64, **{field: value})  # NaN passed `< 0` and `<= 0`


@pytest.mark.parametrize("arch", sae.ARCHS)
def test_wrong_width_names_d_in_and_the_shape(arch):
  # It failed inside jax (a broadcasting TypeError) instead.
  cfg = sae.SAEConfig(d_in=16, num_latents=64, arch=arch, k=4)
  model = sae.SAE(cfg)
  with pytest.raises(ValueError, match=r"d_in=16.*got shape \(4, 8\)"):
    model.init(jax.random.key(0), jnp.zeros((4, 8)))
  model, v = _init(cfg, _data(n=4, d=16))
  with pytest.raises(ValueError, match=r"d_in=16.*got shape \(4, 32\)"):
    model.apply(v, jnp.zeros((4, 32)), method=model.encode)
  with pytest.raises(ValueError, match=r"d_in=16.*got shape \(4, 32\)"):
    sae.loss(model, v, jnp.zeros((4, 32)))
  with pytest.raises(ValueError, match=r"num_latents=64.*got shape \(4, 16\)"):
    model.apply(v, jnp.zeros((4, 16)), method=model.decode)


# ---------------------------------------------------------------------------------------------
# Activation sites


@pytest.fixture(scope="module")
def lm():
  model = models.get("transformer-tiny", d_model=32, num_layers=2, num_heads=2, mlp_dim=64)
  tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 256)
  return model, model.init(jax.random.key(1), tokens), tokens


def test_splicing_the_identity_leaves_the_model_unchanged(lm):
  model, variables, tokens = lm
  clean = model.apply(variables, tokens)
  for site in ("layers_0/resid_post", "layers_1/mlp_out", "layers_1/attn_out", "embed"):
    np.testing.assert_array_equal(sites.splice(model, variables, tokens, site, lambda x: x), clean)
  zeroed = sites.splice(model, variables, tokens, "layers_1/mlp_out", jnp.zeros_like)
  assert not np.allclose(zeroed, clean)


def test_captured_sites_follow_the_residual_stream(lm):
  """resid_post(1) = resid_post(0) + attn_out(1) + mlp_out(1): the sites are what they say."""
  model, variables, tokens = lm
  get = lambda site: sites.capture(model, variables, tokens, site)
  np.testing.assert_allclose(
    get("layers_1/resid_post"),
    get("layers_0/resid_post") + get("layers_1/attn_out") + get("layers_1/mlp_out"),
    atol=1e-5,
  )
  assert get("layers_1/resid_post").shape == (2, 12, 32)


def test_site_errors(lm):
  model, variables, tokens = lm
  with pytest.raises(ValueError, match=r"'layers_7/resid_post'.*layers_1/mlp"):
    sites.capture(model, variables, tokens, "layers_7/resid_post")
  scanned = models.get("transformer-tiny", num_layers=2, scan_layers=True)
  with pytest.raises(ValueError, match="scan_layers"):
    sites.capture(scanned, {}, tokens, "layers_0/resid_post")


class _Identity(nn.Module):
  """An 'SAE' that reconstructs exactly (for the evals' fixed points)."""

  def __call__(self, x, inference=False):
    return x, jnp.ones_like(x)


def test_evaluate_recovers_all_of_the_loss_with_an_exact_reconstruction(lm):
  model, variables, tokens = lm
  exact = sae.evaluate(model, variables, tokens, "layers_0/resid_post", _Identity(), {})
  assert exact["ce_loss_recovered"] == pytest.approx(1.0) and exact["kl"] == pytest.approx(0.0)
  assert exact["fvu"] == 0 and exact["dead_frac"] == 0
  x = sites.capture(model, variables, tokens, "layers_0/resid_post").reshape(-1, 32)
  sae_model, v = _init(sae.SAEConfig(d_in=32, num_latents=128, arch="topk", k=4), x)
  rough = sae.evaluate(model, variables, tokens, "layers_0/resid_post", sae_model, v)
  assert rough["ce_loss_recovered"] < 1.0 and rough["kl"] > 0 and rough["l0"] == 4
