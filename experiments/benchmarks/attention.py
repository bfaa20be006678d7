"""Attention benchmark: speed on accelerators, memory and kernel correctness on CPU.

    python experiments/benchmarks/attention.py [--mode=auto|cpu|accelerator] [--json=out.json]

``--mode=auto`` picks by backend. Every comparison is between things measured in this process,
as a ratio; times are medians of ``--repeats`` calls.

CPU sections
  time        causal fwd+bwd ms of ``xla``, ``xla_chunked`` (and torch SDPA if installed), float32:
              the basis of ``default_implementation``.
  memory      compiled temporary memory of fwd+bwd for ``xla`` against ``xla_chunked`` at long L,
              and one real ``xla_chunked`` fwd+bwd at the longest L (wall time, process peak RSS).
  interpret   the Pallas kernels in interpret mode against ``xla``: max abs error of the output and
              of dq, dk, dv (causal, sliding window, random blocks with segment ids).

Accelerator sections
  check       the compiled kernels (the backend's Pallas kernel, ``cudnn`` on GPU) against ``xla``
              in float32 on the same inputs, with float32 and bf16 inputs: max abs error of the
              output and of dq, dk, dv relative to the reference's max abs value, with GQA
              (no mask, causal, sliding window, random blocks, with and without segment ids; E = 64
              and 96).
  dense       bf16 TFLOP/s forward and forward+backward for L in 1k..32k, E in {64, 128}, causal and
              not: the backend's Pallas kernel, ``cudnn`` (GPU) and ``xla``; ratio to cudnn.
              FLOPs: forward ``4 B H L^2 E`` (half when causal), forward+backward 3.5x that (the
              backward's five matmuls to the forward's two), the FlashAttention convention.
  sparse      bf16 fwd+bwd time of block-sparse masks (sliding windows, random blocks) against the
              same kernel with no mask: ``ratio = time / (density x dense time)``; the goal is
              at most 1.2 plus a small mask overhead.
"""

import json
import resource
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from flaxseed import kernels
from flaxseed.kernels import masks
from flaxseed.training import metrics

_MODE = flags.DEFINE_enum("mode", "auto", ["auto", "cpu", "accelerator"], "Which sections.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed calls per measurement.")
_JSON = flags.DEFINE_string("json", None, "Write the results here.")
_TIME_LENGTHS = flags.DEFINE_list(
  "time_lengths", ["128", "256", "512", "1024"], "CPU time section: sequence lengths."
)
_MEMORY_LENGTHS = flags.DEFINE_list(
  "memory_lengths", ["4096", "8192", "16384", "32768"], "CPU memory section: sequence lengths."
)
_DENSE_LENGTHS = flags.DEFINE_list(
  "dense_lengths", ["1024", "2048", "4096", "8192", "16384", "32768"], "Accelerator dense section."
)
_SPARSE_LENGTHS = flags.DEFINE_list(
  "sparse_lengths", ["4096", "8192", "16384"], "Accelerator sparse section."
)
_IMPLEMENTATIONS = flags.DEFINE_list(
  "implementations", None, "Accelerator sections: override the implementations."
)
_SECTIONS = flags.DEFINE_list(
  "sections", None, "Run only these sections (default: all of the mode's)."
)
_CHECK_HEAD_DIMS = flags.DEFINE_list("check_head_dims", ["64", "96"], "Check section: E.")
_TOKENS = flags.DEFINE_integer("tokens", 16384, "Accelerator sections: B = tokens / L.")


def _grad_fn(impl, mask, **kw):
  def loss(q, k, v):
    out = kernels.block_sparse_attention(q, k, v, mask, implementation=impl, **kw)
    return jnp.sum(out.astype(jnp.float32) ** 2)

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _fwd_fn(impl, mask, **kw):
  return jax.jit(
    lambda q, k, v: kernels.block_sparse_attention(q, k, v, mask, implementation=impl, **kw)
  )


def _median_ms(fn, args, repeats):
  jax.block_until_ready(fn(*args))  # compile and warm up
  return 1e3 * metrics.median_seconds(lambda: jax.block_until_ready(fn(*args)), repeats)


def _qkv(shape, dtype=jnp.float32, kv_heads=None):
  b, length, h, e = shape
  keys = jax.random.split(jax.random.key(0), 3)
  kv_shape = (b, length, kv_heads or h, e)
  return (
    jax.random.normal(keys[0], shape, dtype),
    jax.random.normal(keys[1], kv_shape, dtype),
    jax.random.normal(keys[2], kv_shape, dtype),
  )


# ------------------------------------------------------------------------------------- CPU


def _torch_ms(q, k, v, repeats):
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  qt, kt, vt = (
    torch.from_numpy(np.array(x)).transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v)
  )

  def step():
    out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
    (out**2).sum().backward()

  step()
  return 1e3 * metrics.median_seconds(step, repeats)


def cpu_time(repeats):
  rows = []
  print("\n[time] causal fwd+bwd, B=16 H=4 E=64 float32; ms (ratio to xla)")
  for length in map(int, _TIME_LENGTHS.value):
    q, k, v = _qkv((16, length, 4, 64))
    row = {"length": length, "default": kernels.attention.default_implementation(length, True)}
    for impl in ("xla", "xla_chunked"):
      row[impl] = _median_ms(_grad_fn(impl, masks.causal()), (q, k, v), repeats)
    torch_ms = _torch_ms(q, k, v, repeats)
    if torch_ms is not None:
      row["torch_sdpa"] = torch_ms
    rows.append(row)
    cells = [
      f"{n} {row[n]:.1f} ({row[n] / row['xla']:.2f})"
      for n in ("xla", "xla_chunked", "torch_sdpa")
      if n in row
    ]
    print(f"L={length:5d}  " + "  ".join(cells) + f"  default: {row['default']}")
  return rows


def cpu_memory():
  rows = []
  print("\n[memory] causal fwd+bwd, B=1 H=4 E=64 float32; compiled temporary GiB")
  for length in map(int, _MEMORY_LENGTHS.value):
    x = jax.ShapeDtypeStruct((1, length, 4, 64), jnp.float32)
    row = {"length": length}
    for impl in ("xla", "xla_chunked"):
      compiled = _grad_fn(impl, masks.causal()).lower(x, x, x).compile()
      row[impl] = compiled.memory_analysis().temp_size_in_bytes / 2**30
    row["ratio"] = row["xla_chunked"] / row["xla"]
    rows.append(row)
    print(
      f"L={length:6d}  xla {row['xla']:8.3f}  xla_chunked {row['xla_chunked']:7.3f}  "
      f"ratio {row['ratio']:.4f}"
    )
  length = rows[-1]["length"]
  q, k, v = _qkv((1, length, 4, 64))
  fn = _grad_fn("xla_chunked", masks.causal())
  jax.block_until_ready(fn(q, k, v))
  start = time.perf_counter()
  jax.block_until_ready(fn(q, k, v))
  run = {
    "length": length,
    "seconds": time.perf_counter() - start,
    "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
  }
  print(
    f"xla_chunked fwd+bwd at L={length}: {run['seconds']:.1f} s, process peak RSS "
    f"{run['peak_rss_gib']:.2f} GiB"
  )
  return {"compiled": rows, "run": run}


def cpu_interpret():
  rows = []
  print(
    "\n[interpret] Pallas kernels (interpret mode) against xla, B=1 L=256 H=4 K=2 E=64 "
    "float32; max abs error"
  )
  q, k, v = _qkv((1, 256, 4, 64), kv_heads=2)
  seg = jnp.asarray(np.repeat([1, 2, 3, 0], 64)[None], jnp.int32)
  cases = {
    "causal": (masks.causal(), None),
    "sliding_window_64": (masks.sliding_window(64), None),
    "random_blocks_0.3+segments": (masks.random_blocks(256, 64, 0.3), seg),
  }
  blocks = kernels.attention.BlockSizes(64, 64)
  for name, (mask, segments) in cases.items():
    want = kernels.block_sparse_attention(q, k, v, mask, segment_ids=segments, implementation="xla")
    want_grads = _grad_fn("xla", mask, segment_ids=segments)(q, k, v)
    for impl in ("pallas_tpu", "pallas_gpu"):
      got = kernels.block_sparse_attention(
        q, k, v, mask, segment_ids=segments, implementation=impl, block_sizes=blocks, interpret=True
      )
      grads = _grad_fn(impl, mask, segment_ids=segments, block_sizes=blocks, interpret=True)(
        q, k, v
      )
      row = {"case": name, "implementation": impl, "out": float(jnp.max(jnp.abs(got - want)))}
      for g_name, a, b in zip(("dq", "dk", "dv"), grads, want_grads):
        row[g_name] = float(jnp.max(jnp.abs(a - b)))
      rows.append(row)
      print(
        f"{name:28s} {impl:11s} out {row['out']:.1e}  dq {row['dq']:.1e}  "
        f"dk {row['dk']:.1e}  dv {row['dv']:.1e}"
      )
  return rows


# ----------------------------------------------------------------------------- accelerator


def _errors(impl, mask, segments, args, want, want_grads, **kw):
  """Max abs error of ``impl``'s output and dq, dk, dv against ``xla``'s (float32), each divided
  by the reference's max abs value."""
  got = kernels.block_sparse_attention(*args, mask, segment_ids=segments, implementation=impl, **kw)
  grads = _grad_fn(impl, mask, segment_ids=segments, **kw)(*args)
  rel = lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)) / jnp.max(jnp.abs(b)))
  return {
    "out": rel(got, want),
    **{name: rel(a, b) for name, a, b in zip(("dq", "dk", "dv"), grads, want_grads)},
  }


def _check_cases(length):
  seg = jnp.asarray(np.repeat(np.arange(1, 5), length // 4)[None].repeat(2, 0), jnp.int32)
  random = masks.random_blocks(length, 64, 0.5, seed=1)  # full, partial and empty 128-blocks
  return {
    "none": (None, None),
    "causal": (masks.causal(), None),
    "sliding_window_256": (masks.sliding_window(256), None),
    "causal+segments": (masks.causal(), seg),
    "random_blocks_0.5": (random, None),
    "random_blocks_0.5+segments": (random, seg),
  }


def accelerator_check(impls):
  """Compiled kernels against ``xla`` (float32 on the same inputs), fwd and all gradients."""
  rows = []
  length = 1024
  print(
    f"\n[check] compiled kernels against xla, B=2 L={length} H=8 K=2; max abs error "
    "relative to the reference's max abs"
  )
  for e in map(int, _CHECK_HEAD_DIMS.value):
    for dtype in (jnp.float32, jnp.bfloat16):
      args = _qkv((2, length, 8, e), dtype, kv_heads=2)
      ref_args = [a.astype(jnp.float32) for a in args]
      for case, (mask, segments) in _check_cases(length).items():
        want = kernels.block_sparse_attention(
          *ref_args, mask, segment_ids=segments, implementation="xla"
        )
        want_grads = _grad_fn("xla", mask, segment_ids=segments)(*ref_args)
        for impl in impls:
          if impl == "xla" or (impl == "cudnn" and case not in ("none", "causal")):
            continue  # cudnn takes only no mask or causal
          row = {"e": e, "dtype": jnp.dtype(dtype).name, "case": case, "implementation": impl}
          try:
            row.update(_errors(impl, mask, segments, args, want, want_grads))
          except Exception as err:  # pylint: disable=broad-except
            row["error"] = str(err).splitlines()[0][:300]
            print(f"E={e} {row['dtype']:8s} {case:28s} {impl:11s} ERROR {row['error']}")
            rows.append(row)
            continue
          rows.append(row)
          print(
            f"E={e} {row['dtype']:8s} {case:28s} {impl:11s} out {row['out']:.1e}  "
            f"dq {row['dq']:.1e}  dk {row['dk']:.1e}  dv {row['dv']:.1e}"
          )
  return rows


def _attention_flops(b, h, length, e, density):
  return 4 * b * h * length * length * e * density


def accelerator_dense(impls, repeats):
  rows = []
  print("\n[dense] bf16, B = tokens / L, H * E = 2048; TFLOP/s fwd | fwd+bwd")
  for e in (64, 128):
    for causal in (False, True):
      for length in map(int, _DENSE_LENGTHS.value):
        b, h = max(1, _TOKENS.value // length), 2048 // e
        q, k, v = _qkv((b, length, h, e), jnp.bfloat16)
        mask = masks.causal() if causal else None
        flops = _attention_flops(b, h, length, e, 0.5 if causal else 1.0)
        row = {"e": e, "causal": causal, "length": length, "batch": b, "heads": h}
        for impl in impls:
          try:
            fwd = _median_ms(_fwd_fn(impl, mask), (q, k, v), repeats)
            both = _median_ms(_grad_fn(impl, mask), (q, k, v), repeats)
          except Exception as err:  # pylint: disable=broad-except  (OOM, unsupported shape)
            row[impl] = {"error": str(err).splitlines()[0][:200]}
            continue
          row[impl] = {
            "fwd_ms": fwd,
            "fwd_bwd_ms": both,
            "fwd_tflops": flops / fwd / 1e9,
            "fwd_bwd_tflops": 3.5 * flops / both / 1e9,
          }
        if "cudnn" in row and "fwd_bwd_ms" in row["cudnn"]:
          for impl in impls:
            if impl != "cudnn" and "fwd_bwd_ms" in row[impl]:
              row[impl]["fwd_bwd_vs_cudnn"] = row["cudnn"]["fwd_bwd_ms"] / row[impl]["fwd_bwd_ms"]
        rows.append(row)
        cells = [
          f"{i} {row[i]['fwd_tflops']:.0f}|{row[i]['fwd_bwd_tflops']:.0f}"
          if "fwd_tflops" in row[i]
          else f"{i} -"
          for i in impls
        ]
        print(f"E={e:3d} causal={causal!s:5s} L={length:6d}  " + "  ".join(cells))
  return rows


def accelerator_sparse(impl, repeats):
  rows = []
  print(f"\n[sparse] {impl}, bf16, E=128, H=16; fwd+bwd ms; ratio = t / (density x dense t)")
  for length in map(int, _SPARSE_LENGTHS.value):
    b = max(1, _TOKENS.value // length)
    q, k, v = _qkv((b, length, 16, 128), jnp.bfloat16)
    dense_ms = _median_ms(_grad_fn(impl, None), (q, k, v), repeats)
    cases = {
      f"sliding_window_{w}": masks.sliding_window(w, causal=False)
      for w in (length // 16, length // 8, length // 4)
    }
    cases.update(
      {f"random_blocks_{d}": masks.random_blocks(length, 128, d, seed=0) for d in (0.1, 0.25, 0.5)}
    )
    for name, mask in cases.items():
      density = masks.block_layout(mask, length, 128, 128).density
      ms = _median_ms(_grad_fn(impl, mask), (q, k, v), repeats)
      row = {
        "length": length,
        "mask": name,
        "density": density,
        "ms": ms,
        "dense_ms": dense_ms,
        "ratio": ms / (density * dense_ms),
      }
      rows.append(row)
      print(
        f"L={length:6d} {name:24s} density {density:.3f}  {ms:8.2f} ms  "
        f"dense {dense_ms:8.2f} ms  ratio {row['ratio']:.2f}"
      )
  return rows


def main(argv):
  del argv
  backend = jax.default_backend()
  mode = _MODE.value if _MODE.value != "auto" else ("cpu" if backend == "cpu" else "accelerator")
  device = jax.devices()[0].device_kind
  print(f"device: {device} ({backend}), jax {jax.__version__}")
  results = {"device": device, "backend": backend, "jax": jax.__version__, "mode": mode}
  impls = _IMPLEMENTATIONS.value or {
    "gpu": ["pallas_gpu", "cudnn", "xla"],
    "tpu": ["pallas_tpu", "xla"],
  }.get(backend, ["xla"])
  sections = {
    "cpu": {
      "time": lambda: cpu_time(_REPEATS.value),
      "memory": cpu_memory,
      "interpret": cpu_interpret,
    },
    "accelerator": {
      "check": lambda: accelerator_check(impls),
      "dense": lambda: accelerator_dense(impls, _REPEATS.value),
      "sparse": lambda: accelerator_sparse(impls[0], _REPEATS.value),
    },
  }[mode]
  for name in _SECTIONS.value or sections:
    if name not in sections:
      raise app.UsageError(f"--sections: {name!r} is not one of {list(sections)} (mode {mode})")
    results[name] = sections[name]()
  if _JSON.value:
    with open(_JSON.value, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  app.run(main)
