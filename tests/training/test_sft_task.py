"""Chat SFT: the loss on the assistant's tokens only, packing isolation, the loop, bad input."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxseed import training
from flaxseed.configs import common
from flaxseed.configs import lm
from flaxseed.configs import sft as sft_configs
from flaxseed.data import chat
from flaxseed.data import tokenizers
from flaxseed.training import tasks

BYTES = tokenizers.ByteTokenizer()


def _write(path, conversations):
  path.write_text("".join(json.dumps(c) + "\n" for c in conversations))
  return str(path)


def _conversations(n=600):
  rng = np.random.default_rng(0)
  out = []
  for i in range(n):
    a, b = (int(x) for x in rng.integers(0, 50, 2))
    if i % 2:
      out.append({"prompt": f"add {a} {b}", "response": str(a + b)})
    else:
      out.append(
        {
          "messages": [
            {"role": "system", "content": "math"},
            {"role": "user", "content": f"add {a} {b}"},
            {"role": "assistant", "content": str(a + b)},
          ]
        }
      )
  return out


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
  return _write(tmp_path_factory.mktemp("chats") / "c.jsonl", _conversations())


def _config(data, **overrides):
  c = sft_configs.get_config("test")
  c.sft.data = data
  return common.override(c, **{"mesh.data": 1, "sample_tokens": 0, **overrides})


def test_the_loss_is_on_the_assistants_tokens_only(chats):
  tokens, mask = chat.render(
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], BYTES
  )
  text = "<|user|>\nhi\n<|assistant|>\nyo<|end|>\n"
  np.testing.assert_array_equal(tokens, list(text.encode()))
  learned = len("<|user|>\nhi\n<|assistant|>\n")
  np.testing.assert_array_equal(mask, [0] * learned + [1] * len("yo<|end|>\n"))
  # The task's loss: the mean NLL of exactly those tokens, computed here from the logits.
  task = tasks.build(_config(chats))
  row = np.zeros((1, 129), np.int32)
  row[0, : len(tokens)] = tokens
  batch = {
    "tokens": row,
    "loss_mask": np.pad(mask, (0, 129 - len(mask)))[None],
    "segment_ids": (np.arange(129) < len(tokens)).astype(np.int32)[None],
    "positions": np.where(np.arange(129) < len(tokens), np.arange(129), 0)[None].astype(np.int32),
  }
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  params, _ = task.init(jax.random.key(0), batch)
  loss, _ = task.loss(params, {}, batch, None)
  logits = task.model.apply({"params": params}, jnp.asarray(tokens[None, :-1]))
  logp = jax.nn.log_softmax(logits[0], axis=-1)
  want = -np.mean([float(logp[t - 1, tokens[t]]) for t in range(learned, len(tokens))])
  assert float(loss) == pytest.approx(want, rel=1e-5)


def test_packed_conversations_do_not_see_each_other(tmp_path, chats):
  convs = _conversations(20)
  train, _, _ = chat.chat_rows(_write(tmp_path / "c.jsonl", convs), BYTES, 128)
  rows = train.arrays
  assert rows["segment_ids"][0].max() >= 2  # several conversations share the first row
  task = tasks.build(_config(chats))
  batch = {k: jnp.asarray(v[:1]) for k, v in rows.items()}
  params, _ = task.init(jax.random.key(0), batch)
  nll, _, _, weights = task._heads(params, {}, batch)[0]  # pylint: disable=protected-access
  # The second conversation of the row, alone in a row of its own.
  seg = rows["segment_ids"][0]
  where = np.flatnonzero(seg == 2)
  alone = {k: np.zeros_like(v[:1]) for k, v in rows.items()}
  for k in alone:
    alone[k][0, : len(where)] = rows[k][0, where]
  alone["segment_ids"][0, : len(where)] = 1
  alone = {k: jnp.asarray(v) for k, v in alone.items()}
  nll_alone, _, _, weights_alone = task._heads(params, {}, alone)[0]  # pylint: disable=protected-access
  span = where[:-1]  # targets inside the conversation
  np.testing.assert_allclose(nll[0, span], nll_alone[0, : len(span)], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(weights[0, span], weights_alone[0, : len(span)])
  assert float(weights[0, where[0] - 1]) == 0.0  # nothing predicts across the boundary


def test_sft_from_a_run_or_hf_folder_resumes_and_shards_exactly(
  tmp_path, chats, losses, resume_and_mesh
):
  base = tmp_path / "base"
  training.train(
    common.override(lm.get_config("test"), **{"mesh.data": 1, "sample_tokens": 0, "seq_len": 128}),
    str(base),
  )
  run = {"steps": 4, "checkpoint_every": 2, "optim.decay_steps": 4, "init_from": str(base)}
  summary, one = resume_and_mesh(_config(chats, **run), tmp_path, half=2)
  assert "eval/loss" in summary and "eval/bpb" not in summary
  # The same parameters as a Hugging Face folder: init_from it gives the same run.
  pytest.importorskip("safetensors")
  from flaxseed.models import hf  # pylint: disable=g-import-not-at-top

  restored = training.restore(_config(chats, **run), str(tmp_path / "base"))
  hf.to_pretrained(restored.setup.task.model, restored.params, str(tmp_path / "hf"))
  training.train(_config(chats, **{**run, "init_from": str(tmp_path / "hf")}), str(tmp_path / "h"))
  assert losses(tmp_path / "h") == one
  with pytest.raises(ValueError, match=r"config.init_from=.*describes another model.*d_model"):
    training.train(
      _config(chats, **{**run, "init_from": str(tmp_path / "hf"), "model.d_model": 48}),
      str(tmp_path / "wrong"),
    )


CHATML = (
  "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
  "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _hf_tokenizer(folder, template=CHATML):
  """A byte-level BPE ``tokenizer.json`` with ChatML's special tokens, and a
  ``tokenizer_config.json`` holding ``template``."""
  pytest.importorskip("tokenizers")
  pytest.importorskip("jinja2")
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
  from tokenizers import models  # pylint: disable=g-import-not-at-top
  from tokenizers import pre_tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import trainers  # pylint: disable=g-import-not-at-top

  folder.mkdir()
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  specials = ["<s>", "<|im_start|>", "<|im_end|>"]
  tok.train_from_iterator(
    ["system user assistant math add more hi"] * 20,
    trainers.BpeTrainer(vocab_size=300, special_tokens=specials),
  )
  tok.save(str(folder / "tokenizer.json"))
  config = {"bos_token": "<s>", "eos_token": {"content": "<|im_end|>"}, "chat_template": template}
  (folder / "tokenizer_config.json").write_text(json.dumps(config))
  return str(folder / "tokenizer.json"), tok


def test_a_hugging_face_chat_template_masks_the_assistant_turns(tmp_path):
  """The folder's ChatML template: the text is the template's, each assistant turn's content and
  end of turn are learned, the rest (including the generation prompt) is not; hand-split."""
  path, raw = _hf_tokenizer(tmp_path / "tok")
  template = chat.load_template("", path)  # "": the tokenizer folder's own
  assert isinstance(template, chat.JinjaTemplate)
  messages = [
    {"role": "system", "content": "math"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "add"},
    {"role": "user", "content": "more"},
    {"role": "assistant", "content": "more math"},
  ]
  pieces = [
    ("<s><|im_start|>system\nmath<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n", 0),
    ("<|im_start|>assistant\n", 0),
    ("add<|im_end|>\n", 1),
    ("<|im_start|>user\nmore<|im_end|>\n<|im_start|>assistant\n", 0),
    ("more math<|im_end|>\n", 1),
  ]
  assert template.render(messages, add_generation_prompt=False) == "".join(t for t, _ in pieces)
  want_tokens = [raw.encode(t, add_special_tokens=False).ids for t, _ in pieces]
  tokens, mask = chat.render(messages, tokenizers.load(path), template)
  np.testing.assert_array_equal(tokens, np.concatenate(want_tokens))
  np.testing.assert_array_equal(
    mask, np.concatenate([[m] * len(t) for t, (_, m) in zip(want_tokens, pieces)])
  )
  assert raw.token_to_id("<|im_end|>") in tokens[mask == 1]  # a special token, one id
  # The loop: config.sft.chat_template="" picks the folder's template for config.data.tokenizer.
  c = _config("unused", **{"data.tokenizer": path, "model.vocab_size": 300})
  assert tasks.build(c).template.name.endswith("tokenizer_config.json")
  assert (
    tasks.build(common.override(c, **{"sft.chat_template": "builtin"})).template is chat.BUILTIN
  )


def test_bad_chat_templates_are_named(tmp_path):
  path, _ = _hf_tokenizer(tmp_path / "tok")
  # A template that rewrites earlier turns (here: only the last message keeps its content).
  rewriting = "{% for m in messages %}{% if loop.last %}{{ m['content'] }}{% endif %}{% endfor %}"
  (tmp_path / "rewrite.jinja").write_text(rewriting)
  template = chat.load_template(str(tmp_path / "rewrite.jinja"), path)
  conv = [{"prompt": "hi", "response": "add"}]
  with pytest.raises(ValueError, match=r"c.jsonl:1: chat template .*rewrite.jinja.*prefixes"):
    chat.chat_rows(_write(tmp_path / "c.jsonl", conv), tokenizers.load(path), 64, template=template)
  strict = "{{ raise_exception('roles must alternate') }}"
  (tmp_path / "strict.jinja").write_text(strict)
  template = chat.load_template(str(tmp_path / "strict.jinja"), path)
  with pytest.raises(ValueError, match=r"c.jsonl:1: chat template .*strict.jinja: roles must"):
    chat.chat_rows(str(tmp_path / "c.jsonl"), tokenizers.load(path), 64, template=template)
  with pytest.raises(ValueError, match=r"config.sft.chat_template='/nope.jinja': no such file"):
    chat.load_template("/nope.jinja", path)
  (tmp_path / "broken.jinja").write_text("{% for %}")
  with pytest.raises(ValueError, match=r"broken.jinja: not a valid Jinja chat template"):
    chat.load_template(str(tmp_path / "broken.jinja"), path)
  assert chat.load_template("", "byte") is chat.BUILTIN


def test_bad_conversations_are_named_and_long_ones_counted(tmp_path):
  bad = _write(tmp_path / "bad.jsonl", [{"prompt": "a", "response": "b"}, {"messages": []}])
  with pytest.raises(ValueError, match=rf"config.sft.data: {bad}:2: 'messages' must be"):
    chat.chat_rows(bad, BYTES, 128)
  no_answer = _write(tmp_path / "q.jsonl", [{"messages": [{"role": "user", "content": "a"}]}])
  with pytest.raises(ValueError, match=r":1: no assistant message"):
    chat.chat_rows(no_answer, BYTES, 128)
  role = _write(tmp_path / "r.jsonl", [{"messages": [{"role": "bot", "content": "a"}]}])
  with pytest.raises(ValueError, match=r":1: message 0 must be"):
    chat.chat_rows(role, BYTES, 128)
  long = _conversations(20) + [{"prompt": "x" * 200, "response": "y"}]
  _, _, skipped = chat.chat_rows(_write(tmp_path / "l.jsonl", long), BYTES, 128)
  assert (skipped.count, skipped.total) == (1, 21) and skipped.longest > 200
