"""Quantized matmul benchmark: decode-shaped ``x [M, K] @ W [K, N]`` against bfloat16.

    python experiments/benchmarks/quantized_matmul.py [--json=out.json]

M in {1, 4, 16, 64}, K = N in {4096, 8192}. For every format (int8, int4 g128, NF4 g64,
ternary): the bytes of the weight as stored against bf16, and the maximum relative error of the
kernel against ``x @ dequantize(W)``. On an accelerator also the median time of the backend's
Pallas kernel and of the bf16 ``jnp.dot`` measured in the same process, and their ratio (the
goal on an H100 at M = 1: int8 >= 1.7x, int4 >= 3x; the memory-bound limits are 2x and 4x). On
CPU only bytes and correctness are reported (Pallas in interpret mode at a smaller size): XLA on
CPU does not make quantized matmuls faster.
"""

import json

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from flaxseed import kernels
from flaxseed.training import metrics

_JSON = flags.DEFINE_string("json", None, "Write the results here.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed calls per measurement.")
_MS = flags.DEFINE_list("m", ["1", "4", "16", "64"], "Rows of x.")
_SIZES = flags.DEFINE_list("sizes", ["4096", "8192"], "K = N.")

FORMATS = {"int8": ("int8", None), "int4_g128": ("int4", 128), "nf4_g64": ("nf4", 64),
           "ternary": ("ternary", None)}


def _median_ms(fn, *args):
  jax.block_until_ready(fn(*args))
  return 1e3 * metrics.median_seconds(lambda: jax.block_until_ready(fn(*args)), _REPEATS.value)


def main(argv):
  del argv
  backend = jax.default_backend()
  device = jax.devices()[0].device_kind
  impl = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(backend)
  print(f"device: {device} ({backend}), jax {jax.__version__}; kernel: {impl or 'interpret'}")
  rows = []
  sizes = [int(s) for s in _SIZES.value] if impl else [1024]  # interpret mode is slow
  for size in sizes:
    w = jax.random.normal(jax.random.key(0), (size, size), jnp.float32) * size**-0.5
    w_bf16 = w.astype(jnp.bfloat16)
    bf16_bytes = w_bf16.size * 2
    for name, (fmt, group) in FORMATS.items():
      qw = kernels.quantize_weight(w, fmt, group)
      for m in map(int, _MS.value):
        x = jax.random.normal(jax.random.key(m), (m, size), jnp.bfloat16)
        want = jnp.dot(x.astype(jnp.float32), kernels.dequantize_weight(qw))
        got = kernels.quantized_matmul(x, qw, implementation=impl or "pallas_tpu",
                                       interpret=impl is None)
        err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want)) / jnp.max(jnp.abs(want)))
        row = {"size": size, "format": name, "m": m, "weight_bytes": qw.nbytes,
               "bf16_bytes": bf16_bytes, "bytes_ratio": bf16_bytes / qw.nbytes,
               "max_rel_error": err}
        if impl:
          quantized = jax.jit(lambda x, qw: kernels.quantized_matmul(x, qw, implementation=impl))
          dense = jax.jit(jnp.dot)
          row["ms"] = _median_ms(quantized, x, qw)
          row["bf16_ms"] = _median_ms(dense, x, w_bf16)
          row["speedup_vs_bf16"] = row["bf16_ms"] / row["ms"]
        rows.append(row)
        timing = (f"  {row['ms']:.3f} ms vs bf16 {row['bf16_ms']:.3f} ms: "
                  f"{row['speedup_vs_bf16']:.2f}x" if impl else "")
        print(f"K=N={size} {name:10s} M={m:3d}  bytes 1/{row['bytes_ratio']:.2f} of bf16  "
              f"max rel err {err:.1e}" + timing)
  if _JSON.value:
    with open(_JSON.value, "w", encoding="utf-8") as f:
      json.dump({"device": device, "backend": backend, "jax": jax.__version__, "rows": rows}, f,
                indent=2)


if __name__ == "__main__":
  app.run(main)
