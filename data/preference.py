"""Preference pairs: JSONL ``{"prompt": ..., "chosen": ..., "rejected": ...}`` -> padded rows.

Each pair becomes two rows of ``seq_len + 1`` tokens (the chosen and the rejected completion,
each after the prompt, then ``eos_id`` if given, then padding), stacked as ``tokens [2, seq_len +
1]``, and ``mask [2, seq_len + 1]``, 1 on the completion's tokens (and its EOS): the tokens whose
log-probabilities the preference losses sum. Every tenth pair is held out for evaluation.

A pair that does not fit ``seq_len + 1`` is never cut (a truncated completion would be judged on
another text): it is skipped and counted, and ``Skipped`` says how many and the longest; a file
where no pair fits is an error. Malformed lines are errors naming the config key, file and line.
"""

import dataclasses
import glob
import json

import numpy as np

from flaxseed.data import pipeline

FIELDS = ("prompt", "chosen", "rejected")


@dataclasses.dataclass
class Skipped:
  """Pairs that did not fit: how many of how many, and the longest one's tokens."""

  count: int
  total: int
  longest: int

  def __str__(self):
    return f"{self.count} of {self.total} pairs (the longest {self.longest} tokens)"


def _row(prompt, completion, length, eos_id, pad_id):
  body = np.concatenate([prompt, completion] + ([[eos_id]] if eos_id is not None else []))
  tokens = np.full(length, pad_id, np.int32)
  tokens[: len(body)] = body
  mask = np.zeros(length, np.int32)
  mask[len(prompt) : len(body)] = 1
  return tokens, mask


def preference_rows(
  pattern: str,
  tokenizer,
  seq_len: int,
  *,
  eos_id: int | None = None,
  pad_id: int = 0,
  key: str = "config.preference.data",
) -> tuple[pipeline.Rows, pipeline.Rows, Skipped]:
  """(train, eval, skipped) of the JSONL files matching ``pattern``; errors name ``key``, the
  file and the line."""
  paths = sorted(glob.glob(pattern))
  if not paths:
    raise ValueError(f"{key}={pattern!r}: no files match this glob")
  length = seq_len + 1
  tokens, masks, too_long = [], [], []
  for path in paths:
    with open(path, encoding="utf-8") as f:
      for line_no, line in enumerate(f, 1):
        if not line.strip():
          continue
        where = f"{key}: {path}:{line_no}"
        try:
          example = json.loads(line)
          texts = [example[k] for k in FIELDS]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
          raise ValueError(f"{where}: need a JSON object with {', '.join(FIELDS)} ({e})") from e
        if not all(isinstance(t, str) for t in texts) or not texts[1] or not texts[2]:
          raise ValueError(
            f"{where}: prompt, chosen and rejected must be strings, completions non-empty"
          )
        prompt, chosen, rejected = (np.asarray(tokenizer.encode(t), np.int32) for t in texts)
        need = len(prompt) + max(len(chosen), len(rejected)) + (eos_id is not None)
        if need > length:
          too_long.append(need)
          continue
        pair = [_row(prompt, c, length, eos_id, pad_id) for c in (chosen, rejected)]
        tokens.append(np.stack([t for t, _ in pair]))
        masks.append(np.stack([m for _, m in pair]))
  skipped = Skipped(len(too_long), len(tokens) + len(too_long), max(too_long, default=0))
  if not tokens:
    raise ValueError(f"{key}={pattern!r}: no pair fits seq_len + 1 = {length} tokens: {skipped}")
  held_out = np.arange(len(tokens)) % 10 == 9
  if not held_out.any():
    raise ValueError(
      f"{key}={pattern!r}: {len(tokens)} pairs; need at least 10 (every tenth is held out)"
    )
  tokens, masks = np.stack(tokens), np.stack(masks)
  return (
    pipeline.Rows({"tokens": tokens[~held_out], "mask": masks[~held_out]}),
    pipeline.Rows({"tokens": tokens[held_out], "mask": masks[held_out]}),
    skipped,
  )
