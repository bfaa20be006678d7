"""Supervised fine-tuning rows: JSONL ``{"prompt": ..., "response": ...}`` -> padded rows.

A row is the prompt's tokens, the response's tokens, then ``eos_id`` padding to ``seq_len``
(``tokens``), with ``prompt_mask`` 1 on the prompt. Every tenth example is held out for
evaluation. Rows feed ``data/pipeline.py`` as ``Rows``.
"""

import glob
import json

import numpy as np

from flaxseed.data import pipeline


def sft_rows(
  pattern: str, tokenizer, seq_len: int, *, eos_id: int, key: str = "config.diffusion.sft_data"
) -> tuple[pipeline.Rows, pipeline.Rows]:
  """(train, eval) rows of the JSONL files matching ``pattern``; errors name ``key``, the file
  and the line."""
  paths = sorted(glob.glob(pattern))
  if not paths:
    raise ValueError(f"{key}={pattern!r}: no files match this glob")
  tokens, prompt_mask = [], []
  for path in paths:
    with open(path, encoding="utf-8") as f:
      for line_no, line in enumerate(f, 1):
        if not line.strip():
          continue
        where = f"{key}: {path}:{line_no}"
        try:
          example = json.loads(line)
          prompt, response = example["prompt"], example["response"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
          raise ValueError(f"{where}: need a JSON object with 'prompt' and 'response' ({e})") from e
        p, r = tokenizer.encode(prompt), tokenizer.encode(response)
        if len(p) + len(r) + 1 > seq_len:
          raise ValueError(
            f"{where}: prompt and response take {len(p) + len(r)} tokens; "
            f"seq_len={seq_len} must leave room for at least one EOS"
          )
        row = np.full(seq_len, eos_id, np.int32)
        row[: len(p) + len(r)] = np.concatenate([p, r])
        tokens.append(row)
        prompt_mask.append((np.arange(seq_len) < len(p)).astype(np.int32))
  held_out = np.arange(len(tokens)) % 10 == 9
  tokens, prompt_mask = np.stack(tokens), np.stack(prompt_mask)
  return (
    pipeline.Rows({"tokens": tokens[~held_out], "prompt_mask": prompt_mask[~held_out]}),
    pipeline.Rows({"tokens": tokens[held_out], "prompt_mask": prompt_mask[held_out]}),
  )
