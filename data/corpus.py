"""Corpora: documents -> one token stream per split -> rows (``data/pipeline.py`` batches them).

1. **Documents.** The default corpus is text every Python install ships: the prose of
   ``pydoc_data.topics`` and the standard library's ``.py`` sources (test suites,
   ``site-packages`` and ``pydoc_data/topics.py``, which holds the same prose, left out), in sorted
   order. A user corpus is a glob of text files.
2. **Split.** All documents are tokenized and concatenated; the stream is cut into blocks
   (64Ki tokens, or 1/100 of the corpus if smaller) and every 20th block (index 10, 30, ...) is
   validation, so even a corpus of one file gets a held-out 5%. A block boundary starts a new
   segment, so no target is predicted across the cut.
3. **Rows.** Row ``k`` of a split is ``tokens[k * stride : k * stride + row_len]`` (concatenate then
   split; the LM uses ``row_len = seq_len + 1`` and ``stride = seq_len``, so every token is a target
   once). Each row carries ``segment_ids`` (1, 2, ... per document piece in the row) and
   ``positions`` (offset within the document).

A split is a ``TokenStream``; anything with its ``num_rows`` / ``row`` interface (fixed rows,
activation caches) feeds the same grain pipeline.
"""

import dataclasses
import glob as globlib
import os
import sysconfig

import numpy as np

from flaxseed.data import tokenizers

VAL_EVERY = 20  # one block in VAL_EVERY is validation
# config.data.corpus names for the embedded corpus and its two halves (e.g. pre-train on the prose,
# fine-tune on the code).
DEFAULT_PARTS = {
  "default": lambda name: True,
  "default:prose": lambda name: name.startswith("pydoc_topics/"),
  "default:code": lambda name: not name.startswith("pydoc_topics/"),
}
VAL_OFFSET = 10
MAX_BLOCK = 1 << 16


def default_documents() -> list[tuple[str, bytes]]:
  """(name, text) of the embedded corpus: pydoc topics, then stdlib sources, sorted by name."""
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top

  docs = [
    (f"pydoc_topics/{name}", text.encode("utf-8")) for name, text in sorted(topics.topics.items())
  ]
  stdlib = sysconfig.get_paths()["stdlib"]
  paths = []
  for root, dirs, files in os.walk(stdlib):
    dirs[:] = sorted(
      d
      for d in dirs
      if d not in ("site-packages", "dist-packages", "test", "tests", "__pycache__", "idle_test")
    )
    paths.extend(os.path.join(root, f) for f in sorted(files) if f.endswith(".py"))
  for path in sorted(paths):
    name = os.path.relpath(path, stdlib)
    if name == os.path.join("pydoc_data", "topics.py"):
      continue  # the same prose again, as string literals
    with open(path, "rb") as f:
      docs.append((name, f.read()))
  return docs


def glob_documents(pattern: str, *, key: str = "config.data.corpus") -> list[tuple[str, bytes]]:
  paths = sorted(
    p for p in globlib.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p)
  )
  if not paths:
    raise ValueError(f"{key}={pattern!r}: no files match this glob")
  docs = []
  for path in paths:
    with open(path, "rb") as f:
      docs.append((path, f.read()))
  return docs


@dataclasses.dataclass(frozen=True)
class TokenStream:
  """One split: a flat token array and the start index of every document piece."""

  tokens: np.ndarray  # [N]
  piece_starts: np.ndarray  # sorted, piece_starts[0] == 0

  def num_rows(self, row_len: int, stride: int) -> int:
    return max(0, (len(self.tokens) - row_len) // stride + 1)

  def row(self, k: int, row_len: int, stride: int) -> dict[str, np.ndarray]:
    start = k * stride
    idx = np.arange(start, start + row_len)
    piece = np.searchsorted(self.piece_starts, idx, side="right") - 1
    return {
      "tokens": self.tokens[start : start + row_len].astype(np.int32),
      "segment_ids": (piece - piece[0] + 1).astype(np.int32),
      "positions": (idx - self.piece_starts[piece]).astype(np.int32),
    }


@dataclasses.dataclass(frozen=True)
class Corpus:
  train: TokenStream
  validation: TokenStream
  tokenizer: object
  bytes_per_token: float  # of the validation split; turns nats/token into bits/byte


def build_corpus(data_config, vocab_size: int) -> Corpus:
  """Reads, tokenizes and splits the corpus of ``config.data``; checks ids against the model."""
  tokenizer = tokenizers.load(data_config.tokenizer)
  if tokenizer.vocab_size > vocab_size:
    raise ValueError(
      f"config.model.vocab_size={vocab_size} is smaller than the vocabulary of "
      f"tokenizer {tokenizer.name!r} ({tokenizer.vocab_size})"
    )
  if data_config.corpus in DEFAULT_PARTS:
    docs = [
      (name, text) for name, text in default_documents() if DEFAULT_PARTS[data_config.corpus](name)
    ]
  else:
    docs = glob_documents(data_config.corpus)
  pieces = [tokenizer.encode(text) for _, text in docs]
  num_bytes = np.array([len(text) for _, text in docs], dtype=np.float64)
  lengths = np.array([len(p) for p in pieces], dtype=np.int64)
  tokens = np.concatenate(pieces) if pieces else np.zeros((0,), np.int32)
  if len(tokens) and int(tokens.max()) >= vocab_size:
    raise ValueError(
      f"token id {int(tokens.max())} from tokenizer {tokenizer.name!r} is outside "
      f"config.model.vocab_size={vocab_size}"
    )
  tokens = tokens.astype(np.min_scalar_type(max(vocab_size - 1, 0)))
  doc_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
  train, validation, val_bytes = split(tokens, doc_starts, num_bytes)
  return Corpus(train, validation, tokenizer, val_bytes)


def split(tokens: np.ndarray, doc_starts: np.ndarray, doc_bytes: np.ndarray):
  """Train and validation streams (see module docstring) and validation bytes per token."""
  total = len(tokens)
  block = min(MAX_BLOCK, max(1, total // 100))
  is_val = (np.arange(total) // block) % VAL_EVERY == VAL_OFFSET
  starts_piece = np.zeros(total, dtype=bool)
  starts_piece[doc_starts[doc_starts < total]] = True
  starts_piece[::block] = True
  streams = []
  for mask in (~is_val, is_val):
    flags = starts_piece[mask]
    if len(flags):
      flags[0] = True
    streams.append(TokenStream(tokens[mask], np.flatnonzero(flags)))
  # Bytes per token of the validation split, from each document's bytes-per-token ratio.
  doc_of_token = np.searchsorted(doc_starts, np.flatnonzero(is_val), side="right") - 1
  lengths = np.diff(np.concatenate([doc_starts, [total]]))
  ratio = doc_bytes / np.maximum(lengths, 1)
  val_bytes_per_token = float(ratio[doc_of_token].mean()) if len(doc_of_token) else 1.0
  return streams[0], streams[1], val_bytes_per_token
