"""Generation hooks (``models/sampling.py``): logits processors and interventions at sites."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxseed.models import sampling
from flaxseed.models import sites
from flaxseed.models import transformer

CONFIG = dict(d_model=32, num_layers=2, num_heads=4, mlp_dim=64, scan_layers=False)


@pytest.fixture(scope="module")
def model_and_params():
  model = transformer.Transformer(transformer.TransformerConfig(**CONFIG))
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  return model, params


PROMPTS = [[5, 9, 33, 2], [7, 7]]  # left-padded into one batch


def _generate(model, params, **kw):
  kw = {"max_new_tokens": 8, "temperature": 1.0, "top_k": 50, "rng": jax.random.key(3), **kw}
  return np.asarray(sampling.generate(model, params, PROMPTS, **kw))


def _identity(logits, tokens, length):
  del tokens, length
  return logits


def _add(x, args):
  return x + (args["c"] * args["v"]).astype(x.dtype)[None, None, :]


def test_no_op_hooks_leave_generation_bit_identical(model_and_params):
  model, params = model_and_params
  plain = _generate(model, params)
  zero = {"c": jnp.float32(0.0), "v": jnp.ones((CONFIG["d_model"],))}
  hooked = _generate(
    model,
    params,
    logits_processors=[_identity],
    interventions=[("layers_0/resid_post", _add, zero), ("layers_1/mlp_out", lambda x: x + 0.0)],
  )
  np.testing.assert_array_equal(hooked, plain)


def test_an_intervention_in_decoding_equals_splice_on_the_full_forward(model_and_params):
  """Greedy decoding with ``x + c v`` at a site: every token is the argmax of the full forward
  with the same change spliced in (the prompt's forward and each cached step are steered)."""
  model, params = model_and_params
  v = jax.random.normal(jax.random.key(1), (CONFIG["d_model"],))
  args = {"c": jnp.float32(4.0), "v": v}
  prompt = jnp.asarray([[5, 9, 33, 2], [7, 1, 7, 7]], jnp.int32)
  out = sampling.generate(
    model,
    params,
    prompt,
    max_new_tokens=6,
    temperature=0.0,
    interventions=[("layers_1/resid_post", _add, args)],
  )
  steered = sites.splice(
    model, {"params": params}, out, "layers_1/resid_post", lambda x: _add(x, args)
  )
  np.testing.assert_array_equal(out[:, 4:], jnp.argmax(steered[:, 3:-1], -1))
  plain = sampling.generate(model, params, prompt, max_new_tokens=6, temperature=0.0)
  assert (np.asarray(plain) != np.asarray(out)).any()  # the steering changed something


def test_processors_see_each_rows_context_and_the_index_being_chosen(model_and_params):
  """A processor that allows only (the previous token + 1) mod V: every row counts up from its
  own last prompt token, left padding included."""
  model, params = model_and_params
  vocab = model.config.vocab_size

  def count_up(logits, tokens, length):
    previous = jax.lax.dynamic_slice_in_dim(tokens, length - 1, 1, axis=1)  # [B, 1]
    allowed = jnp.arange(vocab)[None, :] == (previous + 1) % vocab
    return jnp.where(allowed, logits, -jnp.inf)

  out = _generate(model, params, logits_processors=[count_up])
  np.testing.assert_array_equal(out[0, 4:], np.arange(3, 11))
  np.testing.assert_array_equal(out[1, 4:], np.arange(8, 16))


def test_new_intervention_args_reuse_the_compiled_loop(model_and_params):
  model, params = model_and_params
  v = jnp.ones((CONFIG["d_model"],))
  run = lambda c: _generate(  # noqa: E731
    model, params, interventions=[("layers_0/attn_out", _add, {"c": jnp.float32(c), "v": v})]
  )
  run(1.0)
  size = sampling._generate._cache_size()  # pylint: disable=protected-access
  run(2.0)
  assert sampling._generate._cache_size() == size  # pylint: disable=protected-access


def test_bad_hooks_are_named(model_and_params):
  model, params = model_and_params
  with pytest.raises(ValueError, match=r"site 'layers_7/resid_post'.*sites: \[.*layers_1"):
    _generate(model, params, interventions=[("layers_7/resid_post", lambda x: x)])
  with pytest.raises(ValueError, match=r"interventions\[0\] must be \(site, fn\)"):
    _generate(model, params, interventions=[lambda x: x])
  with pytest.raises(ValueError, match=r"logits_processors\[1\] is not callable"):
    _generate(model, params, logits_processors=[_identity, "greedy"])
  with pytest.raises(ValueError, match=r"two at one site"):
    _generate(
      model, params, interventions=[("layers_0/mlp_out", _identity), ("layers_0/mlp", _identity)]
    )
  scanned = transformer.Transformer(
    transformer.TransformerConfig(**{**CONFIG, "scan_layers": True})
  )
  with pytest.raises(ValueError, match=r"scan_layers=True"):
    sampling.generate(
      scanned, params, PROMPTS, max_new_tokens=2, interventions=[("layers_0/mlp_out", _identity)]
    )
