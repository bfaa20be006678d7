"""Chat SFT rows: JSONL conversations -> packed rows with a loss mask on the assistant's tokens.

Each JSONL line is ``{"messages": [{"role": ..., "content": ...}, ...]}`` (roles ``system``,
``user``, ``assistant``; at least one ``assistant`` message) or ``{"prompt": ..., "response":
...}`` (a user and an assistant message). A conversation is rendered with ``TEMPLATE``, a plain
built-in chat template that any tokenizer (bytes included) can learn::

    <|system|>\\n{content}\\n<|user|>\\n{content}\\n<|assistant|>\\n{content}<|end|>\\n

Each piece is encoded on its own (so a mask boundary never falls inside a token), and
``loss_mask`` is 1 on the assistant's content and its ``<|end|>\\n`` (so the model learns to
stop), 0 on everything else.

Conversations are **packed**: several per row of ``seq_len + 1`` tokens, in file order, each with
its own ``segment_ids`` (1, 2, ... within the row; 0 is padding) and ``positions`` restarting at
0, so attention never crosses conversations. A conversation longer than a row is skipped and
counted (never cut: a truncated answer teaches another text); a file where none fits is an error.
Every tenth conversation is held out for evaluation (before packing).
"""

import numpy as np

from flaxseed.data import jsonl
from flaxseed.data import pipeline

ROLES = ("system", "user", "assistant")
TEMPLATE = {role: f"<|{role}|>\n" for role in ROLES}
END = {"system": "\n", "user": "\n", "assistant": "<|end|>\n"}


def messages_of(example, where: str) -> list[dict]:
  """The messages of a JSONL example (``messages``, or ``prompt``/``response``), checked."""
  if not isinstance(example, dict):
    raise ValueError(f"{where}: need a JSON object with 'messages' or 'prompt' and 'response'")
  if "messages" in example:
    messages = example["messages"]
  elif "prompt" in example and "response" in example:
    messages = [
      {"role": "user", "content": example["prompt"]},
      {"role": "assistant", "content": example["response"]},
    ]
  else:
    raise ValueError(f"{where}: need a JSON object with 'messages' or 'prompt' and 'response'")
  if not isinstance(messages, list) or not messages:
    raise ValueError(f"{where}: 'messages' must be a non-empty list")
  for i, m in enumerate(messages):
    if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
      raise ValueError(
        f"{where}: message {i} must be {{'role': one of {ROLES}, 'content': a string}}, got {m!r}"
      )
  if not any(m["role"] == "assistant" for m in messages):
    raise ValueError(f"{where}: no assistant message (nothing to train on)")
  return messages


def render(messages, tokenizer) -> tuple[np.ndarray, np.ndarray]:
  """``(tokens, loss_mask)`` of one conversation with the built-in template."""
  tokens, mask = [], []
  for m in messages:
    learn = m["role"] == "assistant"
    for text, weight in ((TEMPLATE[m["role"]], 0), (m["content"], learn), (END[m["role"]], learn)):
      ids = np.asarray(tokenizer.encode(text), np.int32)
      tokens.append(ids)
      mask.append(np.full(len(ids), int(weight), np.int32))
  return np.concatenate(tokens), np.concatenate(mask)


def _pack(conversations, length: int, pad_id: int) -> dict[str, np.ndarray]:
  """Greedy packing in order: a conversation starts a new row when it does not fit the current
  one."""
  rows, row = [], []
  used = 0
  for conv in conversations:
    if used + len(conv[0]) > length:
      rows.append(row)
      row, used = [], 0
    row.append(conv)
    used += len(conv[0])
  if row:
    rows.append(row)
  out = {
    "tokens": np.full((len(rows), length), pad_id, np.int32),
    "loss_mask": np.zeros((len(rows), length), np.int32),
    "segment_ids": np.zeros((len(rows), length), np.int32),
    "positions": np.zeros((len(rows), length), np.int32),
  }
  for r, packed in enumerate(rows):
    start = 0
    for s, (tokens, mask) in enumerate(packed, 1):
      end = start + len(tokens)
      out["tokens"][r, start:end] = tokens
      out["loss_mask"][r, start:end] = mask
      out["segment_ids"][r, start:end] = s
      out["positions"][r, start:end] = np.arange(len(tokens))
      start = end
  return out


def chat_rows(
  pattern: str,
  tokenizer,
  seq_len: int,
  *,
  pad_id: int = 0,
  key: str = "config.sft.data",
) -> tuple[pipeline.Rows, pipeline.Rows, jsonl.Skipped]:
  """(train, eval, skipped) packed rows of the JSONL files matching ``pattern``; errors name
  ``key``, the file and the line."""
  length = seq_len + 1
  conversations, too_long = [], []
  need = "'messages' or 'prompt' and 'response'"
  for where, example in jsonl.examples(pattern, key, need=need):
    tokens, mask = render(messages_of(example, where), tokenizer)
    if len(tokens) > length:
      too_long.append(len(tokens))
    else:
      conversations.append((tokens, mask))
  total = len(conversations) + len(too_long)
  skipped = jsonl.Skipped(len(too_long), total, max(too_long, default=0), "conversations")
  fits = f"seq_len + 1 = {length} tokens"
  jsonl.check_split(len(conversations), skipped, key, pattern, "conversation", fits)
  held_out = jsonl.held_out(len(conversations))
  train = [c for c, h in zip(conversations, held_out) if not h]
  evaluation = [c for c, h in zip(conversations, held_out) if h]
  return (
    pipeline.Rows(_pack(train, length, pad_id)),
    pipeline.Rows(_pack(evaluation, length, pad_id)),
    skipped,
  )
