"""Attention masks as small host-side objects, and the block layout a block-sparse kernel walks.

A mask says which key position ``kv`` each query position ``q`` may see. Every mask is a frozen
(hashable) object, evaluated elementwise on broadcastable integer index arrays, numpy or jax::

    masks.causal()                        kv <= q
    masks.sliding_window(w)               q - w < kv <= q          (the w most recent, self too)
    masks.sliding_window(w, causal=False) |q - kv| < w
    masks.chunked_causal(c)               kv <= q and q // c == kv // c
    masks.prefix_lm(p)                    kv < p or kv <= q        (bidirectional prefix)
    masks.global_tokens(n)                q < n or kv < n          (the first n see and are seen)
    masks.full()                          everything
    masks.from_dense(bool [L, L])         an explicit table

and combine with ``&`` and ``|``: ``masks.sliding_window(512) | masks.global_tokens(4)``.

Masks built from index arithmetic are *computable*: a kernel evaluates them from iotas inside a
block, so nothing but the layout travels to it. ``from_dense`` masks are not; their partial blocks
are stored and read by the kernel.

``block_layout(mask, length, block_q, block_kv)`` cuts the ``length x length`` mask into blocks on
the host (numpy, once per shape, cached) and records, for each query block, which key blocks it
visits and whether each is *full* (no masking inside) or *partial*; empty blocks are never listed,
so they cost nothing. The transposed lists (for each key block, the query blocks that visit it)
drive the dk/dv backward kernel. Positions past ``length`` (padding up to a block multiple) are
never visible.
"""

import dataclasses
import functools
import hashlib
import re

import numpy as np


class Mask:
  """Base class: ``mask(q, kv)`` -> bool array, elementwise over broadcastable int arrays."""

  computable = True  # evaluable from index arithmetic inside a kernel
  sees_self = True  # every query sees its own position (so no query row is ever empty)

  def __call__(self, q, kv):
    raise NotImplementedError

  def __and__(self, other: "Mask") -> "Mask":
    return _And(_check_mask(self), _check_mask(other))

  def __or__(self, other: "Mask") -> "Mask":
    return _Or(_check_mask(self), _check_mask(other))

  def dense(self, length: int) -> np.ndarray:
    """The ``[length, length]`` boolean table (tests and references; O(L^2) memory)."""
    idx = np.arange(length)
    return np.asarray(self(idx[:, None], idx[None, :]), bool)

  def check_length(self, length: int) -> None:
    """Raises if this mask cannot describe a sequence of ``length`` tokens."""


def _check_mask(m) -> Mask:
  if not isinstance(m, Mask):
    raise TypeError(f"masks combine only with masks, got {type(m).__name__}")
  return m


def _positive(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise ValueError(f"{name} must be a positive int, got {value!r}")
  return int(value)


@dataclasses.dataclass(frozen=True)
class _Full(Mask):
  def __call__(self, q, kv):
    return (q >= 0) | (kv >= 0)  # all true, broadcast to the index shape


@dataclasses.dataclass(frozen=True)
class _Causal(Mask):
  def __call__(self, q, kv):
    return kv <= q


@dataclasses.dataclass(frozen=True)
class _SlidingWindow(Mask):
  window: int
  causal: bool

  def __call__(self, q, kv):
    if self.causal:
      return (kv <= q) & (kv > q - self.window)
    return (kv > q - self.window) & (kv < q + self.window)


@dataclasses.dataclass(frozen=True)
class _ChunkedCausal(Mask):
  chunk: int

  def __call__(self, q, kv):
    return (kv <= q) & (q // self.chunk == kv // self.chunk)


@dataclasses.dataclass(frozen=True)
class _PrefixLM(Mask):
  prefix_len: int

  def __call__(self, q, kv):
    return (kv < self.prefix_len) | (kv <= q)


@dataclasses.dataclass(frozen=True)
class _GlobalTokens(Mask):
  num_tokens: int

  sees_self = False

  def __call__(self, q, kv):
    return (q < self.num_tokens) | (kv < self.num_tokens)


@dataclasses.dataclass(frozen=True)
class _And(Mask):
  a: Mask
  b: Mask

  @property
  def computable(self):
    return self.a.computable and self.b.computable

  @property
  def sees_self(self):
    return self.a.sees_self and self.b.sees_self

  def __call__(self, q, kv):
    return self.a(q, kv) & self.b(q, kv)

  def check_length(self, length):
    self.a.check_length(length)
    self.b.check_length(length)


@dataclasses.dataclass(frozen=True)
class _Or(_And):
  @property
  def sees_self(self):
    return self.a.sees_self or self.b.sees_self

  def __call__(self, q, kv):
    return self.a(q, kv) | self.b(q, kv)


@dataclasses.dataclass(frozen=True, eq=False)
class _Dense(Mask):
  table: np.ndarray = dataclasses.field(repr=False)  # [L, L] bool, read-only
  digest: str  # content hash: equal tables make equal (and cache-sharing) masks

  computable = False

  @property
  def sees_self(self):
    return bool(np.all(np.diagonal(self.table)))

  def __eq__(self, other):
    return isinstance(other, _Dense) and self.digest == other.digest

  def __hash__(self):
    return hash(self.digest)

  def __call__(self, q, kv):
    q, kv = np.broadcast_arrays(np.asarray(q), np.asarray(kv))
    n = self.table.shape[0]
    inside = (q >= 0) & (q < n) & (kv >= 0) & (kv < n)
    return inside & self.table[np.clip(q, 0, n - 1), np.clip(kv, 0, n - 1)]

  def check_length(self, length):
    if self.table.shape[0] != length:
      raise ValueError(
        f"mask from_dense is {self.table.shape[0]} x {self.table.shape[0]} but the "
        f"sequence length is {length}"
      )


def full() -> Mask:
  return _Full()


def causal() -> Mask:
  return _Causal()


def sliding_window(window: int, causal: bool = True) -> Mask:
  return _SlidingWindow(_positive("window", window), bool(causal))


def chunked_causal(chunk: int) -> Mask:
  return _ChunkedCausal(_positive("chunk", chunk))


def prefix_lm(prefix_len: int) -> Mask:
  if (
    isinstance(prefix_len, bool) or not isinstance(prefix_len, (int, np.integer)) or prefix_len < 0
  ):
    raise ValueError(f"prefix_len must be a non-negative int, got {prefix_len!r}")
  return _PrefixLM(int(prefix_len))


def global_tokens(num_tokens: int) -> Mask:
  return _GlobalTokens(_positive("num_tokens", num_tokens))


def from_dense(table) -> Mask:
  """A mask from an explicit boolean ``[L, L]`` table (``table[q, kv]``: q sees kv)."""
  table = np.array(table)
  if table.ndim != 2 or table.shape[0] != table.shape[1]:
    raise ValueError(f"from_dense needs a square [L, L] table, got shape {table.shape}")
  if table.dtype != bool:
    raise ValueError(f"from_dense needs a boolean table, got dtype {table.dtype}")
  table.setflags(write=False)
  return _Dense(
    table, hashlib.sha1(np.packbits(table).tobytes() + str(table.shape).encode()).hexdigest()
  )


def random_blocks(length: int, block: int, density: float, seed: int = 0) -> Mask:
  """A random block mask (benchmarks, tests): each ``block x block`` tile is visible with
  probability ``density``; the diagonal tiles always are, so no row is empty."""
  n = -(-length // block)
  tiles = np.random.default_rng(seed).random((n, n)) < density
  tiles |= np.eye(n, dtype=bool)
  return from_dense(np.kron(tiles, np.ones((block, block), bool))[:length, :length])


_BY_NAME = {
  "full": full,
  "causal": causal,
  "sliding_window": sliding_window,
  "bidirectional_window": lambda w: sliding_window(w, causal=False),
  "chunked_causal": chunked_causal,
  "prefix_lm": prefix_lm,
  "global_tokens": global_tokens,
}


def parse(spec: str) -> Mask:
  """A mask from a config string: terms ``name`` or ``name:int`` joined by ``|`` or ``&``
  (evaluated left to right), e.g. ``"sliding_window:4096"`` or
  ``"sliding_window:512|global_tokens:4"``. Names: ``{names}``."""
  tokens = re.split(r"\s*([|&])\s*", spec.strip())
  result = None
  for pos in range(0, len(tokens), 2):
    term = tokens[pos]
    name, _, arg = term.partition(":")
    if name not in _BY_NAME:
      raise ValueError(f"mask spec {spec!r}: unknown mask {name!r}; known: {sorted(_BY_NAME)}")
    try:
      mask = _BY_NAME[name](int(arg)) if arg else _BY_NAME[name]()
    except (TypeError, ValueError) as e:
      raise ValueError(f"mask spec {spec!r}: bad term {term!r} ({e})") from None
    if result is None:
      result = mask
    else:
      result = result | mask if tokens[pos - 1] == "|" else result & mask
  return result


parse.__doc__ = parse.__doc__.format(names=", ".join(sorted(_BY_NAME)))


# --------------------------------------------------------------------------- block layout

EMPTY, PARTIAL, FULL = 0, 1, 2


@dataclasses.dataclass(frozen=True, eq=False)
class BlockLayout:
  """Which blocks of a ``length x length`` mask a kernel visits, padded to rectangular tables.

  Forward and dq kernels walk ``kv_blocks[i, :kv_counts[i]]`` for query block ``i``; the dk/dv
  kernel walks ``q_blocks[j, :q_counts[j]]`` for key block ``j``. Entries past a count repeat the
  last valid one (so a pipelining kernel issues no new copy) and are skipped. ``*_codes`` say how
  to mask inside each visited block: 0 for a full block (no masking), ``1 + id`` for a partial one,
  where ``id`` indexes ``partial_blocks`` (the distinct ``[block_q, block_kv]`` tables of partial
  blocks; only used for non-computable masks, whose ids are otherwise 0). Two int32 tables per
  walk, small enough for TPU SMEM (2 x 256 KiB at L = 32k with 128-blocks, dense).
  """

  length: int
  block_q: int
  block_kv: int
  kv_blocks: np.ndarray  # [num_q_blocks, max_kv] int32
  kv_counts: np.ndarray  # [num_q_blocks] int32
  kv_codes: np.ndarray  # [num_q_blocks, max_kv] int32
  q_blocks: np.ndarray  # [num_kv_blocks, max_q] int32
  q_counts: np.ndarray  # [num_kv_blocks] int32
  q_codes: np.ndarray  # [num_kv_blocks, max_q] int32
  partial_blocks: np.ndarray  # [num_distinct, block_q, block_kv] bool (>= 1 entry)
  kinds: np.ndarray  # [num_q_blocks, num_kv_blocks] EMPTY / PARTIAL / FULL

  @property
  def padded_length(self) -> int:
    return padded_length(self.length, self.block_q, self.block_kv)

  @property
  def density(self) -> float:
    """Fraction of blocks visited (work relative to the dense square)."""
    return float(np.mean(self.kinds != EMPTY))


def _walk(kinds: np.ndarray, ids: np.ndarray):
  """Rectangular visit lists over the last axis of ``kinds`` (rows: the blocks that walk)."""
  counts = np.sum(kinds != EMPTY, axis=1).astype(np.int32)
  width = max(1, int(counts.max()))
  order = np.zeros((kinds.shape[0], width), np.int32)
  codes = np.zeros_like(order)
  for r in range(kinds.shape[0]):
    cols = np.nonzero(kinds[r] != EMPTY)[0]
    if cols.size == 0:
      continue  # an all-empty row: count 0, the kernel writes zeros
    cols = np.concatenate([cols, np.full(width - cols.size, cols[-1])])
    order[r] = cols
    codes[r] = np.where(kinds[r, cols] == PARTIAL, 1 + ids[r, cols], 0)
  return order, counts, codes


def padded_length(length: int, block_q: int, block_kv: int) -> int:
  """``length`` rounded up to a multiple of both block sizes."""
  step = np.lcm(block_q, block_kv)
  return int(-(-length // step) * step)


@functools.lru_cache(maxsize=64)
def block_layout(mask: Mask, length: int, block_q: int, block_kv: int) -> BlockLayout:
  """The block layout of ``mask`` over ``length`` tokens, for ``block_q x block_kv`` blocks."""
  mask.check_length(length)
  padded = padded_length(length, block_q, block_kv)
  nq, nk = padded // block_q, padded // block_kv
  kinds = np.zeros((nq, nk), np.int8)
  ids = np.zeros((nq, nk), np.int32)
  distinct: dict[bytes, int] = {}
  stored = []
  kv_idx = np.arange(padded)
  for i in range(nq):
    q_idx = np.arange(i * block_q, (i + 1) * block_q)
    rows = np.asarray(mask(q_idx[:, None], kv_idx[None, :]), bool)
    rows &= (q_idx[:, None] < length) & (kv_idx[None, :] < length)
    tiles = rows.reshape(block_q, nk, block_kv).transpose(1, 0, 2)  # [nk, bq, bk]
    any_, all_ = tiles.any(axis=(1, 2)), tiles.all(axis=(1, 2))
    kinds[i] = np.where(all_, FULL, np.where(any_, PARTIAL, EMPTY))
    if not mask.computable:
      for j in np.nonzero(kinds[i] == PARTIAL)[0]:
        key = np.packbits(tiles[j]).tobytes()
        if key not in distinct:
          distinct[key] = len(stored)
          stored.append(tiles[j])
        ids[i, j] = distinct[key]
  partial_blocks = np.stack(stored) if stored else np.ones((1, block_q, block_kv), bool)
  kv = _walk(kinds, ids)
  q = _walk(kinds.T, ids.T)
  return BlockLayout(length, block_q, block_kv, *kv, *q, partial_blocks, kinds)
