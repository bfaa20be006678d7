"""Metrics: a progress line on the console, ``metrics.jsonl`` and TensorBoard event files.

Only process 0 writes. ``metrics.jsonl`` holds one JSON object per logged step with ``step`` and
every metric (eval metrics prefixed ``eval/``); a resumed run first drops the rows of the steps
after its checkpoint (it redoes them), then appends, so every step appears once. TensorBoard
files go to ``workdir/tensorboard`` and are written by tensorboardX (no TensorFlow).
"""

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

# Dense bf16 matmul peaks per chip, from the vendors' data sheets.
PEAK_FLOPS = {
  "TPU v4": 275e12,
  "TPU v5 lite": 197e12,  # v5e
  "TPU v5": 459e12,  # v5p
  "TPU v6 lite": 918e12,  # v6e (Trillium)
  "NVIDIA H100": 989e12,
  "NVIDIA H200": 989e12,
  "NVIDIA A100": 312e12,
}


def median_seconds(fn, repeats: int) -> float:
  """Median wall time of ``repeats`` calls of ``fn`` (which must block until its work is done)."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def measure_matmul_flops(devices, dtype=jnp.float32, n: int = 1024, repeats: int = 5) -> float:
  """FLOP/s of ``n x n x n`` matmuls on all ``devices`` at once (median of ``repeats``).

  Running one matmul per device concurrently measures what the devices achieve together, which
  is what matters when they share a host's cores (CPU devices).
  """
  devices = list(devices)
  mesh = jax.sharding.Mesh(np.asarray(devices), ("d",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
  x = jax.device_put(jnp.ones((len(devices), n, n), dtype), sharding)
  f = jax.jit(lambda a: a @ a)
  f(x).block_until_ready()
  return 2 * n**3 * len(devices) / median_seconds(lambda: f(x).block_until_ready(), repeats)


def peak_flops(devices, dtype) -> tuple[float, str]:
  """(peak FLOP/s of all ``devices`` together, where the number comes from)."""
  kind = devices[0].device_kind
  for prefix, flops in PEAK_FLOPS.items():
    if kind.startswith(prefix):
      return flops * len(devices), f"{kind} bf16 data sheet"
  # CPU (and unknown devices): measure, since CPU devices share the host's cores.
  return (
    measure_matmul_flops(devices, dtype),
    f"measured {jnp.dtype(dtype).name} matmuls on {len(devices)} x {kind}",
  )


def _drop_rows_after(path: str, step: int) -> None:
  """Rewrites ``path`` without its rows of steps after ``step`` (atomically: a crash leaves
  the old file or the new one). A torn last line (a crash mid-write) is dropped too."""
  kept, dropped = [], False
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        dropped = True
        continue
      if row.get("step", 0) > step:
        dropped = True
      else:
        kept.append(line if line.endswith("\n") else line + "\n")
  if dropped:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      f.writelines(kept)
    os.replace(path + ".tmp", path)


class MetricsWriter:
  """Writes metrics of logged steps; every method is a no-op off process 0."""

  def __init__(self, workdir: str, *, enabled: bool = True, start_step: int = 0):
    """``start_step``: the step training resumes from; rows logged after it are dropped."""
    self.enabled = enabled
    if not enabled:
      return
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(path):
      _drop_rows_after(path, start_step)
    self._jsonl = open(path, "a", encoding="utf-8")
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()
    for k, v in metrics.items():
      self._tb.add_scalar(k, float(v), int(step))
    self._tb.flush()

  def text(self, tag: str, step: int, value: str) -> None:
    if self.enabled:
      self._tb.add_text(tag, value, int(step))

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def progress_line(
  step: int,
  total: int,
  metrics: dict[str, float],
  *,
  tokens_per_s: float,
  step_time: float,
  mfu: float | None,
) -> str:
  parts = [f"step {step}/{total}", f"loss {metrics['loss']:.4f}"]
  parts.append(f"{tokens_per_s / 1e3:.1f}k tok/s")
  parts.append(f"{step_time * 1e3:.0f} ms/step")
  if mfu is not None:
    parts.append(f"MFU {100 * mfu:.1f}%")
  if "grad_norm" in metrics:
    parts.append(f"|g| {metrics['grad_norm']:.3f}")
  return " | ".join(parts)
