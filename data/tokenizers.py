"""Tokenizers: bytes by default, or a local ``tokenizer.json`` / SentencePiece model.

Nothing is ever downloaded. ``load(spec)`` takes ``"byte"`` or a path; a path that does not exist or
cannot be parsed raises a ``ValueError`` naming it (and the config key) before anything compiles.
"""

import os

import numpy as np


class ByteTokenizer:
  """UTF-8 bytes as tokens: vocabulary 256, every token is exactly one byte."""

  vocab_size = 256
  name = "byte"

  def encode(self, data: str | bytes) -> np.ndarray:
    if isinstance(data, str):
      data = data.encode("utf-8")
    return np.frombuffer(data, dtype=np.uint8)

  def decode(self, ids) -> str:
    return bytes(np.asarray(ids, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")


class HuggingFaceTokenizer:
  """A ``tokenizer.json`` read by the ``tokenizers`` package (the ``tokenizers`` extra)."""

  def __init__(self, path: str):
    from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top

    self._tok = Tokenizer.from_file(path)
    self.vocab_size = self._tok.get_vocab_size()
    self.name = path

  def encode(self, data: str | bytes) -> np.ndarray:
    if isinstance(data, bytes):
      data = data.decode("utf-8", errors="replace")
    return np.asarray(self._tok.encode(data, add_special_tokens=False).ids, dtype=np.int32)

  def decode(self, ids) -> str:
    return self._tok.decode(np.asarray(ids).tolist())


class SentencePieceTokenizer:
  """A SentencePiece ``.model`` file (``pip install flaxseed[tokenizers]``)."""

  def __init__(self, path: str):
    import sentencepiece  # pylint: disable=g-import-not-at-top

    self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
    self.vocab_size = self._sp.get_piece_size()
    self.name = path

  def encode(self, data: str | bytes) -> np.ndarray:
    if isinstance(data, bytes):
      data = data.decode("utf-8", errors="replace")
    return np.asarray(self._sp.encode(data), dtype=np.int32)

  def decode(self, ids) -> str:
    return self._sp.decode(np.asarray(ids).tolist())


def load(spec: str, *, key: str = "config.data.tokenizer"):
  """``"byte"``, a ``tokenizer.json`` path, or a SentencePiece ``.model`` path."""
  if spec == "byte":
    return ByteTokenizer()
  if not os.path.isfile(spec):
    raise ValueError(
      f"{key}={spec!r}: no such file (use 'byte', a tokenizer.json or a SentencePiece .model file)"
    )
  cls = HuggingFaceTokenizer if spec.endswith(".json") else SentencePieceTokenizer
  try:
    return cls(spec)
  except ImportError as e:
    raise ValueError(
      f"{key}={spec!r} needs the optional package {e.name!r}: pip install 'flaxseed[tokenizers]'"
    ) from e
  except Exception as e:  # the libraries raise assorted exception types for a bad file
    raise ValueError(f"{key}={spec!r} could not be read as a {cls.__name__}: {e}") from e
