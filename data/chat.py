"""Chat SFT rows: JSONL conversations -> packed rows with a loss mask on the assistant's tokens.

Each JSONL line is ``{"messages": [{"role": ..., "content": ...}, ...]}`` (roles ``system``,
``user``, ``assistant``; at least one ``assistant`` message) or ``{"prompt": ..., "response":
...}`` (a user and an assistant message).

A conversation is rendered with a **chat template** (``load_template``):

- ``BUILTIN``, a plain template that any tokenizer (bytes included) can learn::

      <|system|>\n{content}\n<|user|>\n{content}\n<|assistant|>\n{content}<|end|>\n

  ``loss_mask`` is 1 on the assistant's content and its ``<|end|>\n`` (so the model learns to
  stop), 0 on everything else.
- ``JinjaTemplate``: a Hugging Face chat template (the Jinja source in a tokenizer folder's
  ``chat_template.jinja`` or ``tokenizer_config.json``), rendered as ``transformers`` renders
  it (a sandboxed environment, ``trim_blocks``/``lstrip_blocks``, the folder's special tokens).
  The assistant's span of turn ``i`` is what rendering the first ``i + 1`` messages adds to
  rendering the first ``i`` with the generation prompt: its content and the template's end of
  turn (``<|im_end|>``, ``<|eot_id|>``...), the part the model must produce. A template whose
  renders of a conversation's beginnings are not prefixes of the whole (one that rewrites earlier
  turns) is an error naming it, since no mask would be right.

The text is cut where the mask changes and each piece is encoded on its own, so a mask boundary
never falls inside a token (a merge across a boundary is the only difference from encoding the
text whole; templates put special tokens or newlines there).

Conversations are **packed**: several per row of ``seq_len + 1`` tokens, in file order, each with
its own ``segment_ids`` (1, 2, ... within the row; 0 is padding) and ``positions`` restarting at
0, so attention never crosses conversations. A conversation longer than a row is skipped and
counted (never cut: a truncated answer teaches another text); a file where none fits is an error.
Every tenth conversation is held out for evaluation (before packing).
"""

import datetime
import json
import os

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


class BuiltinTemplate:
  """The built-in template (module docstring)."""

  name = "built-in"

  def pieces(self, messages) -> list[tuple[str, bool]]:
    """The conversation as ``(text, learn)`` pieces, in order."""
    out = []
    for m in messages:
      learn = m["role"] == "assistant"
      out += [(TEMPLATE[m["role"]], False), (m["content"], learn), (END[m["role"]], learn)]
    return out


BUILTIN = BuiltinTemplate()


class JinjaTemplate:
  """A Hugging Face chat template (module docstring): ``source`` is its Jinja text, ``tokens``
  the special tokens it may read (``bos_token``, ``eos_token``, ...), ``name`` where it came from
  (errors name it)."""

  def __init__(self, source: str, tokens: dict[str, str], name: str):
    try:
      import jinja2  # pylint: disable=g-import-not-at-top
      from jinja2 import sandbox  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ValueError(
        f"{name}: a Hugging Face chat template needs the optional package 'jinja2': "
        "pip install 'flaxseed[tokenizers]'"
      ) from e

    def raise_exception(message):
      raise jinja2.exceptions.TemplateError(message)

    env = sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
      self._template = env.from_string(source)
    except jinja2.exceptions.TemplateError as e:
      raise ValueError(f"{name}: not a valid Jinja chat template: {e}") from e
    self._error = jinja2.exceptions.TemplateError
    self.tokens = tokens
    self.name = name

  def render(self, messages, *, add_generation_prompt: bool) -> str:
    try:
      return self._template.render(
        messages=messages, add_generation_prompt=add_generation_prompt, **self.tokens
      )
    except self._error as e:
      raise ValueError(f"chat template {self.name}: {e}") from e

  def pieces(self, messages) -> list[tuple[str, bool]]:
    full = self.render(messages, add_generation_prompt=False)
    out, done = [], 0
    for i, m in enumerate(messages):
      if m["role"] != "assistant":
        continue
      start = self.render(messages[:i], add_generation_prompt=True)
      end = self.render(messages[: i + 1], add_generation_prompt=False)
      if not (full.startswith(end) and end.startswith(start) and len(start) >= done):
        raise ValueError(
          f"chat template {self.name}: rendering the conversation's first {i} messages (with "
          f"the generation prompt) and first {i + 1} does not give prefixes of the whole "
          "conversation's text, so the assistant's tokens cannot be told apart; use "
          "config.sft.chat_template='builtin' or a template that renders turns in order"
        )
      out += [(full[done : len(start)], False), (end[len(start) :], True)]
      done = len(end)
    return out + [(full[done:], False)]


def load_template(spec: str, tokenizer_spec: str, key: str = "config.sft.chat_template"):
  """The chat template ``spec`` names: ``"builtin"``; ``""``, the tokenizer folder's template
  where it has one (``chat_template.jinja``, else ``tokenizer_config.json``'s
  ``chat_template``), else the built-in; or a path to a ``.jinja`` file or a
  ``tokenizer_config.json``. Special tokens come from the ``tokenizer_config.json`` beside the
  template (or the tokenizer). Errors name ``key``."""
  if spec == "builtin":
    return BUILTIN
  folder = None if tokenizer_spec == "byte" else os.path.dirname(os.path.abspath(tokenizer_spec))
  if not spec:
    if folder is None:
      return BUILTIN
    for name in ("chat_template.jinja", "tokenizer_config.json"):
      path = os.path.join(folder, name)
      if os.path.isfile(path) and (name.endswith(".jinja") or "chat_template" in _json(path, key)):
        return load_template(path, tokenizer_spec, key)
    return BUILTIN
  if not os.path.isfile(spec):
    raise ValueError(
      f"{key}={spec!r}: no such file ('builtin', '' for the tokenizer's own, a .jinja file or "
      "a tokenizer_config.json)"
    )
  folder = os.path.dirname(os.path.abspath(spec))
  config_path = os.path.join(folder, "tokenizer_config.json")
  config = _json(config_path, key) if os.path.isfile(config_path) else {}
  if spec.endswith(".json"):
    config = _json(spec, key)
    source = config.get("chat_template")
    if isinstance(source, list):  # named templates: [{"name": "default", "template": ...}, ...]
      source = {t.get("name"): t.get("template") for t in source}.get("default")
    if not isinstance(source, str):
      raise ValueError(f"{key}={spec!r}: no chat_template (a string, or a 'default' one) in it")
  else:
    with open(spec, encoding="utf-8") as f:
      source = f.read()
  tokens = {}
  for name, value in config.items():
    if name.endswith("_token"):
      value = value.get("content") if isinstance(value, dict) else value
      if isinstance(value, str):
        tokens[name] = value
  return JinjaTemplate(source, tokens, spec)


def _json(path: str, key: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{key}: cannot read {path}: {e}") from e
  if not isinstance(value, dict):
    raise ValueError(f"{key}: {path} is not a JSON object")
  return value


def render(messages, tokenizer, template=BUILTIN) -> tuple[np.ndarray, np.ndarray]:
  """``(tokens, loss_mask)`` of one conversation: ``template``'s pieces, each encoded alone."""
  tokens, mask = [np.zeros(0, np.int32)], [np.zeros(0, np.int32)]
  for text, learn in template.pieces(messages):
    if text:
      ids = np.asarray(tokenizer.encode(text), np.int32)
      tokens.append(ids)
      mask.append(np.full(len(ids), int(learn), np.int32))
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
  template=BUILTIN,
  key: str = "config.sft.data",
) -> tuple[pipeline.Rows, pipeline.Rows, jsonl.Skipped]:
  """(train, eval, skipped) packed rows of the JSONL files matching ``pattern``, rendered with
  ``template``; errors name ``key``, the file and the line."""
  length = seq_len + 1
  conversations, too_long = [], []
  need = "'messages' or 'prompt' and 'response'"
  for where, example in jsonl.examples(pattern, key, need=need):
    messages = messages_of(example, where)
    try:
      tokens, mask = render(messages, tokenizer, template)
    except ValueError as e:  # the template refused this conversation
      raise ValueError(f"{where}: {e}") from e
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
