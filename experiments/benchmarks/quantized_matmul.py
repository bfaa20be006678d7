"""Quantized matmul benchmark: decode-shaped ``x [M, K] @ W [K, N]`` against bfloat16.

    python experiments/benchmarks/quantized_matmul.py [--json=out.json] [--sweep]

M in {1, 4, 16, 64}, K = N in {4096, 8192}. For every format (int8, int4 g128, NF4 g64,
ternary): the bytes of the weight as stored against bf16, and the maximum relative error of the
kernel against ``x @ dequantize(W)``. On an accelerator also the median time of the backend's
Pallas kernel and of the bf16 ``jnp.dot`` measured in the same process, and their ratio (the
goal on an H100 at M = 1: int8 >= 1.7x, int4 >= 3x; the memory-bound limits are 2x and 4x). On
CPU only bytes and correctness are reported (Pallas in interpret mode at a smaller size): XLA on
CPU does not make quantized matmuls faster.

``--sweep`` (GPU) also times the Triton kernel's tile choices at M = 1 (``bn`` columns per tile
and the number of K splits, see ``kernels/quant/pallas_gpu.py``) against the default plan.
"""

import functools
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
_INNER = flags.DEFINE_integer("inner", 100, "Matmuls per timed call (one jitted loop).")
_SWEEP = flags.DEFINE_bool("sweep", False, "GPU: time tile choices at M = 1.")

FORMATS = {
  "int8": ("int8", None),
  "int4_g128": ("int4", 128),
  "nf4_g64": ("nf4", 64),
  "ternary": ("ternary", None),
}


def _median_ms(fn, x, w):
  """Median ms of one ``fn(x, w)``: each timed call runs ``--inner`` of them in one jitted loop
  (x nudged per iteration, outputs summed), so the ~50 us of per-call dispatch, which is more
  than a decode-sized matmul takes on an H100, is not what gets measured."""
  inner = _INNER.value

  @jax.jit
  def loop(x, w):
    def body(i, acc):
      return acc + fn(x * (1 + i.astype(x.dtype) * 1e-3), w).astype(jnp.float32)

    return jax.lax.fori_loop(0, inner, body, jnp.zeros((x.shape[0], w.shape[-1]), jnp.float32))

  jax.block_until_ready(loop(x, w))
  seconds = metrics.median_seconds(lambda: jax.block_until_ready(loop(x, w)), _REPEATS.value)
  return 1e3 * seconds / inner


def sweep(sizes):
  """Median ms of the GPU kernel at M = 1 for each (bn, splits), int8 and int4 g128."""
  from flaxseed.kernels.quant import pallas_gpu  # pylint: disable=g-import-not-at-top

  rows = []
  print("\n[sweep] pallas_gpu at M=1: ms by (bn, splits); default plan marked *")
  for size in sizes:
    w = jax.random.normal(jax.random.key(0), (size, size), jnp.float32) * size**-0.5
    x = jax.random.normal(jax.random.key(1), (1, size), jnp.bfloat16)
    for name in ("int8", "int4_g128"):
      qw = kernels.quantize_weight(w, *FORMATS[name])
      default = pallas_gpu.plan(qw.layout, 1)
      for bn in (32, 64, 128):
        for splits in (1, 2, 4, 8, 16):
          row = {
            "size": size,
            "format": name,
            "bn": bn,
            "splits": splits,
            "default": (bn, splits) == (default.bn, default.splits),
          }
          try:
            fn = functools.partial(pallas_gpu.matmul, bn=bn, splits=splits)
            row["ms"] = _median_ms(fn, x, qw)
          except Exception as err:  # pylint: disable=broad-except  (shared memory, splits)
            row["error"] = str(err).splitlines()[0][:200]
          rows.append(row)
      done = [r for r in rows if r["size"] == size and r["format"] == name and "ms" in r]
      best = min(done, key=lambda r: r["ms"])
      print(
        f"K=N={size} {name:10s} "
        + " ".join(
          f"{r['bn']}/{r['splits']}:{r['ms']:.3f}{'*' if r['default'] else ''}" for r in done
        )
        + f"  best bn={best['bn']} splits={best['splits']}"
      )
  return rows


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
        try:
          got = kernels.quantized_matmul(
            x, qw, implementation=impl or "pallas_tpu", interpret=impl is None
          )
        except Exception as err:  # pylint: disable=broad-except  (e.g. shared memory)
          rows.append({"size": size, "format": name, "m": m, "error": str(err).splitlines()[0]})
          print(f"K=N={size} {name:10s} M={m:3d}  ERROR {rows[-1]['error'][:150]}")
          continue
        err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want)) / jnp.max(jnp.abs(want)))
        row = {
          "size": size,
          "format": name,
          "m": m,
          "weight_bytes": qw.nbytes,
          "bf16_bytes": bf16_bytes,
          "bytes_ratio": bf16_bytes / qw.nbytes,
          "max_rel_error": err,
        }
        timing = ""
        if impl:
          quantized = lambda x, qw: kernels.quantized_matmul(x, qw, implementation=impl)  # noqa
          row["ms"] = _median_ms(quantized, x, qw)
          row["bf16_ms"] = _median_ms(jnp.dot, x, w_bf16)
          row["speedup_vs_bf16"] = row["bf16_ms"] / row["ms"]
          timing = (
            f"  {row['ms']:.3f} ms vs bf16 {row['bf16_ms']:.3f} ms: {row['speedup_vs_bf16']:.2f}x"
          )
        rows.append(row)
        print(
          f"K=N={size} {name:10s} M={m:3d}  bytes 1/{row['bytes_ratio']:.2f} of bf16  "
          f"max rel err {err:.1e}" + timing
        )
  results = {"device": device, "backend": backend, "jax": jax.__version__, "rows": rows}
  if _SWEEP.value and impl == "pallas_gpu":
    results["sweep"] = sweep(sizes)
  if _JSON.value:
    with open(_JSON.value, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  app.run(main)
