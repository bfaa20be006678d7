"""Generates text from a trained run or a Hugging Face folder.

    python experiments/generate.py --workdir=/tmp/lm --prompt="def main(" --prompt="The "
    python experiments/generate.py --hf_dir=/path/to/llama --prompt="Hello" --top_p=0.9

``--workdir``: a flaxseed run of a language-model task (``lm``, ``lora``): its model, latest
weights (a LoRA run's adapters on their base) and tokenizer. ``--hf_dir``: ``hf.from_pretrained``
and ``hf.tokenizer`` (the folder's ``tokenizer.json`` or ``tokenizer.model``; or ``--tokenizer``).
Prompts of different lengths are left-padded into one batch (``models/sampling.py``); ``--stop``
ends a row at that text's last token. ``--speculative``: a model with multi-token heads drafts
with them (``models/speculative.py``; the same tokens as plain greedy decoding at
``--temperature=0``, the same distribution otherwise) and the tokens per forward are printed.
"""

import sys

from absl import app
from absl import flags
import jax
import numpy as np

from flaxseed import models
from flaxseed.data import tokenizers
from flaxseed.models import hf
from flaxseed.models import speculative
from flaxseed.training import checkpoint
from flaxseed.training import tasks
from flaxseed.training import trainer

_WORKDIR = flags.DEFINE_string("workdir", None, "A flaxseed run (task lm or lora).")
_HF_DIR = flags.DEFINE_string("hf_dir", None, "A local Hugging Face folder.")
_TOKENIZER = flags.DEFINE_string(
  "tokenizer",
  None,
  "'byte' or a tokenizer file; default: the "
  "run's, or the folder's tokenizer.json / tokenizer.model.",
)
_PROMPTS = flags.DEFINE_multi_string("prompt", [], "A prompt (repeat for a batch).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "0: greedy.")
_TOP_K = flags.DEFINE_integer("top_k", None, "Sample from the k most likely tokens.")
_TOP_P = flags.DEFINE_float("top_p", None, "Sample from the nucleus of this mass.")
_STOP = flags.DEFINE_multi_string("stop", [], "Stop a row at this text (its last token).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_SPECULATIVE = flags.DEFINE_bool(
  "speculative", False, "Draft with the model's multi-token heads (model.mtp_heads > 0)."
)


def load(workdir: str | None, hf_dir: str | None, tokenizer: str | None):
  """``(model, params, tokenizer)``."""
  if (workdir is None) == (hf_dir is None):
    raise ValueError("give exactly one of --workdir and --hf_dir")
  if hf_dir is not None:
    model, params = hf.from_pretrained(hf_dir)
    tok = tokenizers.load(tokenizer, key="--tokenizer") if tokenizer else hf.tokenizer(hf_dir)
    return model, params, tok
  config = checkpoint.run_config(workdir)
  restored = trainer.restore(config, workdir)
  task = restored.setup.task
  if not isinstance(task.inner if isinstance(task, tasks.LoRA) else task, tasks.LMTask):
    raise ValueError(
      f"{workdir}: task={config.task!r} is not a language model (generate reads the runs of "
      "lm, lora, sft, preference and distill)"
    )
  params = task.model_params(restored.params, restored.frozen)
  return (
    task.model,
    params,
    (tokenizers.load(tokenizer, key="--tokenizer") if tokenizer else task.tokenizer),
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _PROMPTS.value:
    raise app.UsageError("give at least one --prompt")
  try:
    model, params, tok = load(_WORKDIR.value, _HF_DIR.value, _TOKENIZER.value)
    prompts = [np.asarray(tok.encode(p), np.int32) for p in _PROMPTS.value]
    stops = [int(np.asarray(tok.encode(s))[-1]) for s in _STOP.value]
    options = dict(
      max_new_tokens=_MAX_NEW.value,
      temperature=_TEMPERATURE.value,
      top_k=_TOP_K.value,
      top_p=_TOP_P.value,
      stop_tokens=stops,
      rng=jax.random.key(_SEED.value),
    )
    if _SPECULATIVE.value:
      result = speculative.generate(model, params, prompts, draft="mtp", **options)
      out = result.tokens
      print(f"tokens per forward: {result.tokens_per_forward:.2f}", file=sys.stderr)
    else:
      out = models.generate(model, params, prompts, **options)
  except ValueError as e:
    sys.exit(f"error: {e}")
  width = max(p.size for p in prompts)
  for prompt, row in zip(prompts, np.asarray(out)):
    new = row[width:]
    if stops:
      hits = np.nonzero(np.isin(new, stops))[0]
      new = new[: hits[0] + 1] if hits.size else new
    print("=" * 20)
    print(tok.decode(prompt) + tok.decode(new))


if __name__ == "__main__":
  app.run(main)
