"""Feature browser: what do an SAE's features fire on?

    python experiments/sae/browse.py --workdir=/tmp/sae [--features=24] [--rows=256]

Reads the SAE run in ``--workdir`` (its config and latest checkpoint; the model it reads comes
from that run's ``config.sae.lm_workdir``), encodes ``--rows`` validation rows (evenly spaced over
the split) and writes ``WORKDIR/browser/index.html`` with PNGs next to it:

* the distribution of feature densities (log10 of the fraction of tokens each latent fires on;
  latents that never fire are counted apart);
* for each of the ``--features`` features with the largest activation mass (density x mean
  activation): its density, a histogram of its nonzero activations, and its top-activating
  contexts, every token shaded by the feature's activation on it (hover for the value) and the
  maximum outlined.

Needs matplotlib (``pip install -e '.[plots]'``).
"""

import html
import json
import os

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from flaxseed.training import checkpoint
from flaxseed.training import trainer

_WORKDIR = flags.DEFINE_string("workdir", None, "An SAE run (task 'sae').")
_OUT = flags.DEFINE_string("out", None, "Output directory; default WORKDIR/browser.")
_FEATURES = flags.DEFINE_integer("features", 24, "How many features to show.")
_ROWS = flags.DEFINE_integer("rows", 256, "Validation rows to encode.")
_CONTEXTS = flags.DEFINE_integer("contexts", 8, "Top-activating contexts per feature.")
flags.mark_flags_as_required(["workdir"])

BEFORE, AFTER = 24, 6  # tokens of context around an activation


def encode_rows(workdir: str, num_rows: int):
  """(tokens [R, L], codes [R, L, F] float32, tokenizer, run config) of ``num_rows`` validation
  rows of the SAE run in ``workdir``, encoded as at inference."""
  config = checkpoint.run_config(workdir)
  if config.task != "sae":
    raise ValueError(f"{workdir} is a {config.task!r} run, not an SAE run")
  restored = trainer.restore(config, workdir)
  task = restored.setup.task
  stream, seq_len = task.corpus.validation, config.seq_len
  n = stream.num_rows(seq_len, seq_len)
  index = np.arange(min(num_rows, n)) * n // min(num_rows, n)
  batch_size = config.batch_size
  index = np.concatenate([index, np.full(-len(index) % batch_size, index[-1])])

  encode = jax.jit(task.encode)
  tokens, out = [], []
  with restored.setup.context():
    for start in range(0, len(index), batch_size):
      rows = [stream.row(int(k), seq_len, seq_len) for k in index[start : start + batch_size]]
      batch = {
        k: jnp.asarray(np.stack([r[k] for r in rows]))
        for k in ("tokens", "segment_ids", "positions")
      }
      f = encode(restored.params, restored.frozen, batch, restored.task_state)
      tokens.append(np.asarray(batch["tokens"]))
      out.append(np.asarray(f).reshape(len(rows), seq_len, -1))
  num = min(num_rows, n)
  return (np.concatenate(tokens)[:num], np.concatenate(out)[:num], task.corpus.tokenizer, config)


def _png(path: str, draw) -> str:
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(3.6, 1.6), dpi=90)
  draw(ax)
  ax.spines[["top", "right"]].set_visible(False)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return os.path.basename(path)


def _token_text(tokenizer, token: int) -> str:
  text = tokenizer.decode(np.asarray([token]))
  return html.escape(text.replace("\n", "\u21b5").replace("\t", "\u2192")) or "&nbsp;"


def _context_html(tokenizer, tokens_L, acts_L, pos: int, scale: float) -> str:
  lo, hi = max(0, pos - BEFORE), min(len(tokens_L), pos + AFTER + 1)
  spans = []
  for i in range(lo, hi):
    a = float(acts_L[i])
    style = f"background: rgba(255, 110, 0, {min(a / scale, 1.0):.2f})" if a > 0 else ""
    cls = ' class="max"' if i == pos else ""
    spans.append(
      f'<span{cls} style="{style}" title="{a:.3f}" data-act="{a:.4f}">'
      f"{_token_text(tokenizer, int(tokens_L[i]))}</span>"
    )
  return "".join(spans)


def write(
  workdir: str, out_dir: str, *, num_features: int, num_rows: int, num_contexts: int
) -> dict:
  """Writes the browser; returns a summary (features shown, densities, counts)."""
  tokens, codes, tokenizer, config = encode_rows(workdir, num_rows)
  os.makedirs(out_dir, exist_ok=True)
  flat = codes.reshape(-1, codes.shape[-1])
  fires = flat > 0
  density = fires.mean(0)
  mass = flat.sum(0)
  shown = [int(i) for i in np.argsort(-mass)[:num_features] if mass[i] > 0]
  alive = density > 0

  def density_plot(ax):
    ax.hist(np.log10(density[alive]), bins=40, color="#e66a00")
    ax.set_xlabel(f"log10 density ({int((~alive).sum())} of {len(density)} never fire)", fontsize=7)
    ax.tick_params(labelsize=7)

  density_png = _png(os.path.join(out_dir, "density.png"), density_plot)
  sections = []
  for feature in shown:
    acts = codes[..., feature]
    order = np.argsort(-acts.reshape(-1))[:num_contexts]
    scale = float(acts.max())
    nonzero = flat[fires[:, feature], feature]
    png = _png(
      os.path.join(out_dir, f"feature_{feature}.png"),
      lambda ax, v=nonzero: (
        ax.hist(v, bins=30, color="#e66a00"),
        ax.set_xlabel("activation", fontsize=7),
        ax.tick_params(labelsize=7),
      ),
    )
    contexts = "\n".join(
      f'<li>{_context_html(tokenizer, tokens[r], acts[r], p, scale)}</li>'
      for r, p in (divmod(int(k), tokens.shape[1]) for k in order)
    )
    sections.append(
      f'<section id="f{feature}"><h2>Feature {feature}</h2>'
      f"<p>density {100 * density[feature]:.3f}% of tokens, max activation {scale:.3f}, "
      f"mean when active {nonzero.mean():.3f}</p>"
      f'<img src="{png}" alt="activation histogram of feature {feature}">'
      f'<ol class="contexts">{contexts}</ol></section>'
    )
  model = config.model
  title = (
    f"SAE features: {model.arch}, {model.num_latents} latents on {config.sae.site} "
    f"({html.escape(config.sae.lm_workdir or 'random model')})"
  )
  page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; max-width: 60em; margin: 2em auto; color: #222; }}
section {{ border-top: 1px solid #ddd; padding: 0.5em 0; }}
ol.contexts {{ font-family: monospace; white-space: pre; font-size: 0.85em; }}
ol.contexts li {{ margin: 0.2em 0; }}
span.max {{ outline: 1px solid #a00; }}
</style></head><body>
<h1>{title}</h1>
<p>{len(tokens) * tokens.shape[1]:,} validation tokens; {int(alive.sum())} of {len(density)} latents
fire on them. Features ordered by activation mass (density x mean activation); each context shows
{BEFORE} tokens before the activation and {AFTER} after, shaded by the feature's activation.</p>
<img src="{density_png}" alt="feature density histogram">
{"".join(sections)}
</body></html>
"""
  with open(os.path.join(out_dir, "index.html"), "w", encoding="utf-8") as f:
    f.write(page)
  summary = {
    "features": shown,
    "num_tokens": int(flat.shape[0]),
    "alive": int(alive.sum()),
    "num_latents": int(len(density)),
  }
  with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f)
  return summary


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  out = _OUT.value or os.path.join(_WORKDIR.value, "browser")
  summary = write(
    _WORKDIR.value,
    out,
    num_features=_FEATURES.value,
    num_rows=_ROWS.value,
    num_contexts=_CONTEXTS.value,
  )
  print(
    f"{len(summary['features'])} features over {summary['num_tokens']:,} tokens: "
    f"{os.path.join(out, 'index.html')}"
  )


if __name__ == "__main__":
  app.run(main)
