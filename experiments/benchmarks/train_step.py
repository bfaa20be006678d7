"""Train-step throughput: flaxseed's compiled step against the same model in PyTorch eager.

    python experiments/benchmarks/train_step.py [--presets=tiny,small] [--json=out.json]

For each preset of ``configs/lm.py``, the real train step (``trainer.setup``: AdamW, clipping,
the model as configured) runs on random packed batches; we report the median step time over
``--steps`` steps after warmup, tokens/s, and MFU = model FLOPs per second over the matmul FLOP/s
measured in the same process (``metrics.measure_matmul_flops``). When PyTorch is installed, the
same network (RMSNorm, RoPE, causal SDPA, SwiGLU, tied embeddings, AdamW + clipping) is timed in
eager mode in the same process, and the ratio flaxseed/torch is printed. Both run in float32 on
one device with the process's default threads. Nothing here is a test: numbers go to the README.
"""

import json
import math

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from flaxseed.configs import lm
from flaxseed.training import metrics as metrics_lib
from flaxseed.training import trainer

_PRESETS = flags.DEFINE_list("presets", ["tiny", "small"], "configs/lm.py variants to time.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per implementation (after warmup).")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Sequences per step.")
_SEQ = flags.DEFINE_integer("seq_len", 256, "Tokens per sequence.")
_ATTENTION = flags.DEFINE_string("attention_impl", None, "Override model.attention_impl.")
_TORCH = flags.DEFINE_bool("torch", True, "Also time PyTorch eager when it is installed.")
_JSON = flags.DEFINE_string("json", None, "Write the results here.")


def _config(preset: str):
  config = lm.get_config(preset)
  config.batch_size, config.seq_len = _BATCH.value, _SEQ.value
  config.mesh.data = 1
  if _ATTENTION.value:
    config.model.attention_impl = _ATTENTION.value
  return config


def _random_batch(config, rng):
  tokens = rng.integers(0, config.model.vocab_size, (config.batch_size, config.seq_len + 1))
  length = config.seq_len + 1
  return {
    "tokens": tokens.astype(np.int32),
    "segment_ids": np.ones((config.batch_size, length), np.int32),
    "positions": np.broadcast_to(
      np.arange(length, dtype=np.int32), (config.batch_size, length)
    ).copy(),
  }


def time_flaxseed(config) -> dict:
  s = trainer.setup(config, devices=jax.devices()[:1])
  compiled = trainer.compile_train_step(s)
  with s.context():
    state, frozen = s.init(), s.frozen()
  batch = jax.device_put(
    _random_batch(config, np.random.default_rng(0)), s.batch_spec["tokens"].sharding
  )
  holder = {"state": state}

  def step():
    holder["state"], metrics = compiled(holder["state"], frozen, batch)
    jax.block_until_ready(metrics)

  for _ in range(3):
    step()
  seconds = metrics_lib.median_seconds(step, _STEPS.value)
  tokens_per_s = config.batch_size * config.seq_len / seconds
  flops = s.task.flops_per_token() * tokens_per_s
  return {"step_time_s": seconds, "tokens_per_s": tokens_per_s, "model_flops_per_s": flops}


def time_torch(config) -> dict | None:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  torch.manual_seed(0)
  m = config.model
  heads, kv_heads = m.num_heads, m.num_kv_heads or m.num_heads
  head_dim = m.head_dim or m.d_model // heads

  class Block(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.attn_norm = torch.nn.RMSNorm(m.d_model, eps=m.norm_eps)
      self.q = torch.nn.Linear(m.d_model, heads * head_dim, bias=False)
      self.k = torch.nn.Linear(m.d_model, kv_heads * head_dim, bias=False)
      self.v = torch.nn.Linear(m.d_model, kv_heads * head_dim, bias=False)
      self.o = torch.nn.Linear(heads * head_dim, m.d_model, bias=False)
      self.mlp_norm = torch.nn.RMSNorm(m.d_model, eps=m.norm_eps)
      self.gate = torch.nn.Linear(m.d_model, m.mlp_dim, bias=False)
      self.up = torch.nn.Linear(m.d_model, m.mlp_dim, bias=False)
      self.down = torch.nn.Linear(m.mlp_dim, m.d_model, bias=False)

    def forward(self, x, cos, sin):
      b, length, _ = x.shape
      h = self.attn_norm(x)
      q = self.q(h).view(b, length, heads, head_dim).transpose(1, 2)
      k = self.k(h).view(b, length, kv_heads, head_dim).transpose(1, 2)
      v = self.v(h).view(b, length, kv_heads, head_dim).transpose(1, 2)
      q, k = rope(q, cos, sin), rope(k, cos, sin)
      a = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=kv_heads != heads
      )
      x = x + self.o(a.transpose(1, 2).reshape(b, length, heads * head_dim))
      h = self.mlp_norm(x)
      return x + self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))

  def rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

  class Model(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.embed = torch.nn.Embedding(m.vocab_size, m.d_model)
      self.blocks = torch.nn.ModuleList(Block() for _ in range(m.num_layers))
      self.norm = torch.nn.RMSNorm(m.d_model, eps=m.norm_eps)

    def forward(self, tokens):
      length = tokens.shape[1]
      inv = m.rope_theta ** (-torch.arange(head_dim // 2, dtype=torch.float32) / (head_dim // 2))
      angles = torch.arange(length, dtype=torch.float32)[:, None] * inv
      cos, sin = angles.cos(), angles.sin()
      x = self.embed(tokens)
      for block in self.blocks:
        x = block(x, cos, sin)
      return self.norm(x) @ self.embed.weight.T

  model = Model()
  decay = [p for p in model.parameters() if p.ndim >= 2]
  no_decay = [p for p in model.parameters() if p.ndim < 2]
  opt = torch.optim.AdamW(
    [
      {"params": decay, "weight_decay": config.optim.weight_decay},
      {"params": no_decay, "weight_decay": 0.0},
    ],
    lr=config.optim.lr,
    betas=(config.optim.b1, config.optim.b2),
    eps=config.optim.eps,
  )
  tokens = torch.from_numpy(_random_batch(config, np.random.default_rng(0))["tokens"]).long()

  def step():
    logits = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(
      logits.reshape(-1, m.vocab_size), tokens[:, 1:].reshape(-1)
    )
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
    opt.step()

  for _ in range(3):
    step()
  seconds = metrics_lib.median_seconds(step, _STEPS.value)
  return {
    "torch_step_time_s": seconds,
    "torch_version": torch.__version__,
    "torch_threads": torch.get_num_threads(),
    "torch_tokens_per_s": config.batch_size * config.seq_len / seconds,
  }


def main(argv):
  del argv
  device = jax.devices()[0]
  peak = metrics_lib.measure_matmul_flops([device], jnp.float32)
  results = {
    "device": device.device_kind,
    "jax": jax.__version__,
    "matmul_flops_per_s": peak,
    "batch_size": _BATCH.value,
    "seq_len": _SEQ.value,
    "presets": {},
  }
  print(f"device {device.device_kind}; measured float32 matmul peak {peak / 1e9:.0f} GFLOP/s")
  print(f"{'preset':8} {'flaxseed tok/s':>15} {'MFU':>6} {'torch tok/s':>12} {'ratio':>6}")
  for preset in _PRESETS.value:
    config = _config(preset)
    row = time_flaxseed(config)
    row["mfu"] = row["model_flops_per_s"] / peak
    if _TORCH.value and (torch_row := time_torch(config)):
      row.update(torch_row)
      row["ratio_vs_torch"] = row["tokens_per_s"] / row["torch_tokens_per_s"]
    results["presets"][preset] = row
    print(
      f"{preset:8} {row['tokens_per_s']:15,.0f} {100 * row['mfu']:5.1f}% "
      f"{row.get('torch_tokens_per_s', math.nan):12,.0f} "
      f"{row.get('ratio_vs_torch', math.nan):6.2f}"
    )
  # Top-level keys of the first preset, for scripts that read one number.
  first = results["presets"][_PRESETS.value[0]]
  for key in ("tokens_per_s", "mfu", "torch_tokens_per_s", "ratio_vs_torch"):
    if key in first:
      results[key] = first[key]
  if _JSON.value:
    with open(_JSON.value, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  app.run(main)
