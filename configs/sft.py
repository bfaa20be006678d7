"""Chat supervised fine-tuning of a trained LM (``task="sft"``, ``training/tasks/sft.py``).

    python experiments/main.py --config=configs/lm.py:tiny --workdir=/tmp/lm
    python experiments/main.py --config=configs/sft.py:tiny --workdir=/tmp/sft \\
        --config.init_from=/tmp/lm --config.sft.data='/tmp/chats/*.jsonl'

JSONL lines are ``{"messages": [{"role", "content"}, ...]}`` or ``{"prompt", "response"}``,
rendered with a chat template (``config.sft.chat_template``: by default the tokenizer folder's
Hugging Face template where it has one, else the built-in one of ``data/chat.py``; the
``sample_prompt`` is the built-in's) and packed several to a row; the loss is
on the assistant's tokens only. The model section must be the ``init_from`` run's (checked before
compiling). Variants: ``tiny`` (``configs/lm.py:tiny``'s model) and ``test``.

``configs/sft.py:tiny,lora`` trains LoRA adapters over the frozen ``init_from``.
"""

import ml_collections

from flaxseed.configs import common
from flaxseed.configs import lm
from flaxseed.configs import lora


def get_config(arg: str = "tiny"):
  arg, options = common.variant(arg, ("tiny", "test"), "configs/sft.py", ("lora",))
  c = lm.get_config(arg)
  c.task = "sft"
  if arg == "tiny":
    c.steps, c.eval_every, c.checkpoint_every = 500, 100, 100
  else:
    c.seq_len = 128  # the template alone takes 32 bytes per exchange
  c.optim.update(lr=1e-3 if arg == "tiny" else 3e-3, warmup_steps=20 if arg == "tiny" else 2)
  c.sample_prompt = "<|user|>\nHello\n<|assistant|>\n"
  c.sft = ml_collections.ConfigDict(dict(data="", chat_template="", pad_id=0))
  if "lora" in options:  # adapters over the frozen init_from (training/tasks/lora.py)
    c.lora = lora.section()
  return c
