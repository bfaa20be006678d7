"""Supervised fine-tuning rows: JSONL ``{"prompt": ..., "response": ...}`` -> padded rows.

A row is the prompt's tokens, the response's tokens, then ``eos_id`` padding to ``seq_len``
(``tokens``), with ``prompt_mask`` 1 on the prompt. Every tenth example is held out for
evaluation. Rows feed ``data/pipeline.py`` as ``Rows``.
"""

import numpy as np

from flaxseed.data import jsonl
from flaxseed.data import pipeline


def sft_rows(
  pattern: str, tokenizer, seq_len: int, *, eos_id: int, key: str = "config.diffusion.sft_data"
) -> tuple[pipeline.Rows, pipeline.Rows]:
  """(train, eval) rows of the JSONL files matching ``pattern``; errors name ``key``, the file
  and the line."""
  tokens, prompt_mask = [], []
  for where, example in jsonl.examples(
    pattern, key, ("prompt", "response"), need="'prompt' and 'response'"
  ):
    prompt, response = example["prompt"], example["response"]
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
  if not tokens:
    raise ValueError(f"{key}={pattern!r}: the files hold no examples")
  held_out = jsonl.held_out(len(tokens))
  tokens, prompt_mask = np.stack(tokens), np.stack(prompt_mask)
  return (
    pipeline.Rows({"tokens": tokens[~held_out], "prompt_mask": prompt_mask[~held_out]}),
    pipeline.Rows({"tokens": tokens[held_out], "prompt_mask": prompt_mask[held_out]}),
  )
