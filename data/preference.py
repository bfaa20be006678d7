"""Preference pairs: JSONL ``{"prompt": ..., "chosen": ..., "rejected": ...}`` -> padded rows.

Each pair becomes two rows of ``seq_len + 1`` tokens (the chosen and the rejected completion,
each after the prompt, then ``eos_id`` if given, then padding), stacked as ``tokens [2, seq_len +
1]``, and ``mask [2, seq_len + 1]``, 1 on the completion's tokens (and its EOS): the tokens whose
log-probabilities the preference losses sum. Every tenth pair is held out for evaluation.
``kto_rows`` reads unpaired KTO examples ``{"prompt", "completion", "label"}`` the same way.

A pair that does not fit ``seq_len + 1`` is never cut (a truncated completion would be judged on
another text): it is skipped and counted, and ``Skipped`` says how many and the longest; a file
where no pair fits is an error. Malformed lines are errors naming the config key, file and line
(``data/jsonl.py`` reads the files).
"""

import numpy as np

from flaxseed.data import jsonl
from flaxseed.data import pipeline

FIELDS = ("prompt", "chosen", "rejected")


def _row(prompt, completion, length, eos_id, pad_id):
  body = np.concatenate([prompt, completion] + ([[eos_id]] if eos_id is not None else []))
  tokens = np.full(length, pad_id, np.int32)
  tokens[: len(body)] = body
  mask = np.zeros(length, np.int32)
  mask[len(prompt) : len(body)] = 1
  return tokens, mask


def _add(arrays, too_long, prompt, completions, length, eos_id, pad_id) -> bool:
  """Appends the prompt followed by each completion (``tokens`` and ``mask``, one row each) to
  ``arrays``; if the longest does not fit ``length``, counts its length in ``too_long`` instead.
  Returns whether it was appended."""
  need = len(prompt) + max(len(c) for c in completions) + (eos_id is not None)
  if need > length:
    too_long.append(need)
    return False
  rows = [_row(prompt, c, length, eos_id, pad_id) for c in completions]
  arrays["tokens"].append(np.stack([t for t, _ in rows]))
  arrays["mask"].append(np.stack([m for _, m in rows]))
  return True


def _texts(where, example, fields):
  texts = [example[k] for k in fields]
  if not all(isinstance(t, str) for t in texts) or not all(texts[1:]):
    raise ValueError(f"{where}: {', '.join(fields)} must be strings, completions non-empty")
  return texts


def _split(arrays: dict, too_long: list, pattern: str, key: str, length: int, what: str):
  """(train, eval, skipped): every tenth example held out."""
  n = len(arrays["tokens"])
  skipped = jsonl.Skipped(len(too_long), n + len(too_long), max(too_long, default=0), f"{what}s")
  jsonl.check_split(n, skipped, key, pattern, what, f"seq_len + 1 = {length} tokens")
  held_out = jsonl.held_out(n)
  arrays = {k: np.stack(v) for k, v in arrays.items()}
  return (
    pipeline.Rows({k: v[~held_out] for k, v in arrays.items()}),
    pipeline.Rows({k: v[held_out] for k, v in arrays.items()}),
    skipped,
  )


def preference_rows(
  pattern: str,
  tokenizer,
  seq_len: int,
  *,
  eos_id: int | None = None,
  pad_id: int = 0,
  key: str = "config.preference.data",
) -> tuple[pipeline.Rows, pipeline.Rows, jsonl.Skipped]:
  """(train, eval, skipped) of the JSONL pairs matching ``pattern``; errors name ``key``, the
  file and the line."""
  length = seq_len + 1
  arrays, too_long = {"tokens": [], "mask": []}, []
  for where, example in jsonl.examples(pattern, key, FIELDS):
    texts = _texts(where, example, FIELDS)
    prompt, chosen, rejected = (np.asarray(tokenizer.encode(t), np.int32) for t in texts)
    _add(arrays, too_long, prompt, (chosen, rejected), length, eos_id, pad_id)
  return _split(arrays, too_long, pattern, key, length, "pair")


KTO_FIELDS = ("prompt", "completion", "label")


def kto_rows(
  pattern: str,
  tokenizer,
  seq_len: int,
  *,
  eos_id: int | None = None,
  pad_id: int = 0,
  key: str = "config.preference.data",
) -> tuple[pipeline.Rows, pipeline.Rows, jsonl.Skipped]:
  """(train, eval, skipped) of unpaired KTO examples ``{prompt, completion, label}`` (``label``:
  true for a desirable completion). Row 0 of ``tokens [2, seq_len + 1]`` is the example, row 1 its
  prompt with the next example's completion: the mismatched pairs whose policy/reference
  log-ratio estimates KL(π ‖ π_ref) (TRL's KTO shifts completions within the batch; here the
  shift is fixed when the data is read). ``label [1]`` is 1 or 0."""
  length = seq_len + 1
  examples = []
  for where, example in jsonl.examples(pattern, key, KTO_FIELDS):
    prompt, completion = _texts(where, example, KTO_FIELDS[:2])
    if not isinstance(example["label"], bool):
      raise ValueError(f"{where}: label must be true or false, got {example['label']!r}")
    ids = [np.asarray(tokenizer.encode(t), np.int32) for t in (prompt, completion)]
    examples.append((*ids, example["label"]))
  arrays, too_long = {"tokens": [], "mask": [], "label": []}, []
  for i, (prompt, completion, label) in enumerate(examples):
    partner = examples[(i + 1) % len(examples)][1]
    if _add(arrays, too_long, prompt, (completion, partner), length, eos_id, pad_id):
      arrays["label"].append(np.asarray([label], np.int32))
  return _split(arrays, too_long, pattern, key, length, "example")
