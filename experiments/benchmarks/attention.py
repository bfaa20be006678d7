"""Attention forward+backward time per implementation, the basis of ``default_implementation``.

    python experiments/benchmarks/attention.py [--lengths=128,256,512,1024] [--json=out.json]

For each sequence length, every registered implementation of ``kernels.flash_attention`` (and
PyTorch's ``scaled_dot_product_attention`` when torch is installed) runs causal attention forward
and backward on the same inputs; the table gives median milliseconds and each one's time relative
to ``"xla"`` measured in the same run.
"""

import json

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from flaxseed import kernels
from flaxseed.training import metrics

_LENGTHS = flags.DEFINE_list("lengths", ["128", "256", "512", "1024"], "Sequence lengths.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "B.")
_HEADS = flags.DEFINE_integer("heads", 4, "H (and K: multi-head).")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "E.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed calls per measurement.")
_JSON = flags.DEFINE_string("json", None, "Write the results here.")


def _median_ms(fn, repeats):
  return 1e3 * metrics.median_seconds(fn, repeats)


def time_jax(impl, q, k, v, repeats):
  loss = lambda q, k, v: jnp.sum(  # noqa: E731
      kernels.flash_attention(q, k, v, causal=True, implementation=impl) ** 2)
  step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  jax.block_until_ready(step(q, k, v))
  return _median_ms(lambda: jax.block_until_ready(step(q, k, v)), repeats)


def time_torch(q, k, v, repeats):
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  qt, kt, vt = (torch.from_numpy(np.array(x)).transpose(1, 2).contiguous().requires_grad_()
                for x in (q, k, v))

  def step():
    out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
    (out**2).sum().backward()

  step()
  return _median_ms(step, repeats)


def main(argv):
  del argv
  rows = []
  impls = kernels.attention.implementations()
  print(f"causal attention fwd+bwd, B={_BATCH.value} H={_HEADS.value} E={_HEAD_DIM.value}, "
        f"{jax.devices()[0].device_kind}; ms (ratio to xla)")
  for length in map(int, _LENGTHS.value):
    shape = (_BATCH.value, length, _HEADS.value, _HEAD_DIM.value)
    q, k, v = (jax.random.normal(key, shape) for key in jax.random.split(jax.random.key(0), 3))
    row = {"length": length, "default": kernels.attention.default_implementation(length, True)}
    for impl in impls:
      row[impl] = time_jax(impl, q, k, v, _REPEATS.value)
    torch_ms = time_torch(q, k, v, _REPEATS.value)
    if torch_ms is not None:
      row["torch_sdpa"] = torch_ms
    rows.append(row)
    cells = [f"{name} {row[name]:.1f} ({row[name] / row['xla']:.2f})"
             for name in (*impls, "torch_sdpa") if name in row]
    print(f"L={length:5d}  " + "  ".join(cells) + f"  default: {row['default']}")
  if _JSON.value:
    with open(_JSON.value, "w", encoding="utf-8") as f:
      json.dump({"device": jax.devices()[0].device_kind, "rows": rows}, f, indent=2)


if __name__ == "__main__":
  app.run(main)
