"""JSONL example files, read one way for every task that trains on examples (SFT, preference
pairs, KTO, diffusion SFT): the glob, the error that names the config key, file and line, the
count of examples that did not fit a row, and the held-out tenth.
"""

import dataclasses
import glob
import json

from absl import logging
import numpy as np

HELD_OUT_EVERY = 10  # every tenth example (0-based index 9, 19, ...) is held out for evaluation


def examples(pattern: str, key: str, fields: tuple[str, ...] = (), *, need: str = ""):
  """``(where, example)`` for every non-empty line of the JSONL files matching ``pattern`` (in
  sorted path order), each a JSON object holding ``fields``. ``where`` is ``"key: path:line"``;
  a malformed line is a ``ValueError`` there saying it needs a JSON object with ``need`` (by
  default the fields)."""
  paths = sorted(glob.glob(pattern))
  if not paths:
    raise ValueError(f"{key}={pattern!r}: no files match this glob")
  need = need or ", ".join(fields)
  for path in paths:
    with open(path, encoding="utf-8") as f:
      for line_no, line in enumerate(f, 1):
        if not line.strip():
          continue
        where = f"{key}: {path}:{line_no}"
        try:
          example = json.loads(line)
          if not isinstance(example, dict):
            raise TypeError(f"got {type(example).__name__}")
          missing = [k for k in fields if k not in example]
          if missing:
            raise KeyError(f"missing {', '.join(missing)}")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
          raise ValueError(f"{where}: need a JSON object with {need} ({e})") from e
        yield where, example


def held_out(n: int) -> np.ndarray:
  """Which of ``n`` examples are held out for evaluation (a boolean mask)."""
  return np.arange(n) % HELD_OUT_EVERY == HELD_OUT_EVERY - 1


def check_split(n: int, skipped: "Skipped", key: str, pattern: str, what: str, fits: str) -> None:
  """Errors for ``n`` usable examples (besides ``skipped``): an empty file, none that fits (``fits``
  says what), or too few to hold one out."""
  if not skipped.total:
    raise ValueError(f"{key}={pattern!r}: the files hold no {what}s")
  if not n:
    raise ValueError(f"{key}={pattern!r}: no {what} fits {fits}: {skipped}")
  if not held_out(n).any():
    raise ValueError(
      f"{key}={pattern!r}: {n} {what}s; need at least {HELD_OUT_EVERY} (every tenth is held out)"
    )


@dataclasses.dataclass
class Skipped:
  """Examples that did not fit a row (never cut: a truncated answer teaches another text): how
  many of how many, and the longest one's tokens."""

  count: int
  total: int
  longest: int
  what: str = "examples"

  def __str__(self):
    return f"{self.count} of {self.total} {self.what} (the longest {self.longest} tokens)"

  def warn(self, key: str, length: int) -> None:
    """Logs a warning naming ``key`` if any example was skipped."""
    if self.count:
      logging.warning("%s: skipped %s that do not fit %d tokens", key, self, length)
