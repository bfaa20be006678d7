"""Data: corpus split, packed rows, per-process slices, iterator state, and input errors."""

import ml_collections
import numpy as np
import pytest

from flaxseed import training
from flaxseed.configs import lm
from flaxseed.data import corpus as data
from flaxseed.data import needle
from flaxseed.data import pipeline
from flaxseed.data import tokenizers


def _stream(doc_lengths, vocab=50, seed=0):
  rng = np.random.default_rng(seed)
  pieces = [rng.integers(0, vocab, n) for n in doc_lengths]
  starts = np.concatenate([[0], np.cumsum(doc_lengths)[:-1]])
  return data.TokenStream(np.concatenate(pieces), starts), pieces


def test_rows_carry_segments_and_positions_of_documents():
  stream, pieces = _stream([5, 3, 12])
  row = stream.row(1, row_len=7, stride=4)  # tokens 4..10: end of doc 0, doc 1, start of doc 2
  np.testing.assert_array_equal(row["tokens"], np.concatenate(pieces)[4:11])
  np.testing.assert_array_equal(row["segment_ids"], [1, 2, 2, 2, 3, 3, 3])
  np.testing.assert_array_equal(row["positions"], [4, 0, 1, 2, 0, 1, 2])


def test_split_is_deterministic_disjoint_and_covers_everything():
  lengths = [997, 5000, 13, 40000, 2500]
  stream, _ = _stream(lengths)
  train, val, bpt = data.split(stream.tokens, stream.piece_starts, np.array(lengths, float))
  assert len(train.tokens) + len(val.tokens) == len(stream.tokens)
  assert 0.03 < len(val.tokens) / len(stream.tokens) < 0.07  # one block in 20
  assert bpt == 1.0
  again = data.split(stream.tokens, stream.piece_starts, np.array(lengths, float))
  np.testing.assert_array_equal(again[0].tokens, train.tokens)
  np.testing.assert_array_equal(again[1].piece_starts, val.piece_starts)


def test_one_file_corpus_still_gets_a_validation_split(tmp_path):
  (tmp_path / "only.txt").write_text("hello world. " * 3000)
  cfg = ml_collections.ConfigDict(dict(corpus=str(tmp_path / "*.txt"), tokenizer="byte"))
  corpus = data.build_corpus(cfg, vocab_size=256)
  assert len(corpus.validation.tokens) > 1000 and len(corpus.train.tokens) > 20000


def test_default_corpus_has_prose_and_sources():
  docs = data.default_documents()
  names = [n for n, _ in docs]
  assert any(n.startswith("pydoc_topics/") for n in names)
  assert any(n.endswith("collections/__init__.py") for n in names)
  assert not any("/test/" in n or n.startswith("test/") for n in names)
  assert "pydoc_data/topics.py" not in names
  prose = [n for n in names if n.startswith("pydoc_topics/")]
  assert names[: len(prose)] == sorted(prose)  # prose first, then sources, each sorted
  assert names[len(prose) :] == sorted(names[len(prose) :])


def _batches(stream, rows, seed=3, num=6):
  return pipeline.batches(
    stream, num_batches=num, global_batch=8, rows=rows, row_len=9, stride=8, seed=seed, name="train"
  )


def test_process_slices_assemble_the_global_batch():
  stream, _ = _stream([300, 200, 700])
  whole = _batches(stream, (0, 8))
  halves = [_batches(stream, (0, 4)), _batches(stream, (4, 8))]
  for t in range(6):
    for key in ("tokens", "segment_ids", "positions"):
      np.testing.assert_array_equal(
        np.concatenate([halves[0][t][key], halves[1][t][key]]), whole[t][key]
      )


def test_epochs_are_reshuffled_and_seeds_differ():
  stream, _ = _stream([100, 100])  # 24 rows of 8: 3 batches an epoch
  ds = _batches(stream, (0, 8))
  first = np.concatenate([ds[t]["tokens"] for t in range(3)])
  second = np.concatenate([ds[t]["tokens"] for t in range(3, 6)])
  as_set = lambda a: sorted(map(tuple, a))  # noqa: E731
  assert as_set(first) == as_set(second)  # same rows every epoch ...
  assert not np.array_equal(first, second)  # ... in a new order
  other = _batches(stream, (0, 8), seed=4)
  assert not np.array_equal(other[0]["tokens"], ds[0]["tokens"])


def test_iterator_state_restores_the_exact_next_batch():
  stream, _ = _stream([300, 200, 700])
  it = pipeline.train_iterator(_batches(stream, (0, 8)))
  next(it), next(it)
  state = it.get_state()
  expected = next(it)
  fresh = pipeline.train_iterator(_batches(stream, (0, 8)))
  fresh.set_state(state)
  np.testing.assert_array_equal(next(fresh)["tokens"], expected["tokens"])


def test_eval_batches_beyond_the_split_are_an_error():
  stream, _ = _stream([100])
  with pytest.raises(ValueError, match="eval_batches=5"):
    pipeline.batches(
      stream,
      num_batches=5,
      global_batch=8,
      rows=(0, 8),
      row_len=9,
      stride=8,
      seed=None,
      name="validation",
    )


def test_empty_glob_names_the_key():
  cfg = ml_collections.ConfigDict(dict(corpus="/nonexistent/**/*.txt", tokenizer="byte"))
  with pytest.raises(ValueError, match=r"config\.data\.corpus='/nonexistent/\*\*/\*\.txt'"):
    data.build_corpus(cfg, vocab_size=256)


def test_token_ids_outside_the_vocabulary_are_rejected(tmp_path):
  (tmp_path / "a.txt").write_text("abc" * 100)
  cfg = ml_collections.ConfigDict(dict(corpus=str(tmp_path / "a.txt"), tokenizer="byte"))
  with pytest.raises(ValueError, match="vocab_size=100"):
    data.build_corpus(cfg, vocab_size=100)


def test_unreadable_tokenizer_files_name_the_path(tmp_path):
  with pytest.raises(ValueError, match="no such file"):
    tokenizers.load(str(tmp_path / "missing.json"))
  bad = tmp_path / "tokenizer.json"
  bad.write_text("{ not json")
  with pytest.raises(ValueError, match=str(bad)):
    tokenizers.load(str(bad))
  bad_sp = tmp_path / "sp.model"
  bad_sp.write_bytes(b"\x00garbage")
  with pytest.raises(ValueError, match=str(bad_sp)):
    tokenizers.load(str(bad_sp))


def test_byte_tokenizer_round_trips_text():
  tok = tokenizers.ByteTokenizer()
  text = "naïve café → ok"
  ids = tok.encode(text)
  assert ids.max() < 256 and tok.decode(ids) == text


def test_huggingface_tokenizer_json_loads(tmp_path):
  pytest.importorskip("tokenizers")
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
  from tokenizers import models  # pylint: disable=g-import-not-at-top
  from tokenizers import pre_tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import trainers  # pylint: disable=g-import-not-at-top

  tok = Tokenizer(models.BPE(unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.train_from_iterator(
    ["hello world", "hello there world"] * 50,
    trainers.BpeTrainer(vocab_size=60, special_tokens=["[UNK]"]),
  )
  path = tmp_path / "tokenizer.json"
  tok.save(str(path))
  loaded = tokenizers.load(str(path))
  ids = loaded.encode("hello world")
  assert loaded.decode(ids).replace(" ", "") == "helloworld"
  assert loaded.vocab_size <= 60


def test_needle_rows_ask_for_a_pair_written_in_their_first_region():
  rng = np.random.default_rng(0)
  spec = dict(num_pairs=3, num_keys=8, num_values=8, region=0.5)
  rows = needle.rows(rng, 64, 101, **spec)
  assert rows.shape == (64, 101) and rows.dtype == np.int32
  for row in rows:
    queries = row[-9:].reshape(3, 3)  # QUERY k v, one per pair
    assert np.all(queries[:, 0] == needle.QUERY)
    starts = np.flatnonzero(row[:-9] == needle.PAIR)
    assert len(starts) == 3 and starts.max() + 2 < (101 - 9) // 2  # pairs in the first half
    pairs = {row[s + 1]: row[s + 2] for s in starts}
    assert len(pairs) == 3  # distinct keys
    assert {k: v for _, k, v in queries} == pairs  # every key asked for once, with its value
    assert np.all(row[(101 - 9) // 2 : -9] >= needle.FILLER)  # filler up to the queries
  with pytest.raises(ValueError, match="hold 1 pairs in their first 10%, fewer than num_pairs=3"):
    needle.rows(rng, 1, 49, **{**spec, "region": 0.1})
  with pytest.raises(ValueError, match="num_pairs=9 <= num_keys=8"):
    needle.rows(rng, 1, 101, **{**spec, "num_pairs": 9})


def test_needle_task_trains_through_the_loop(tmp_path):
  config = lm.get_config("test")
  config.task = "needle"
  config.needle = dict(num_pairs=2, num_keys=4, num_values=4, region=0.5)
  config.steps, config.sample_tokens = 3, 0
  summary = training.train(config, str(tmp_path))
  assert np.isfinite(summary["loss"]) and 0 <= summary["eval/accuracy"] <= 1
  config.needle.num_pairs = 5
  with pytest.raises(ValueError, match="num_pairs=5 <= num_keys=4"):
    training.train(config, str(tmp_path / "bad"))
