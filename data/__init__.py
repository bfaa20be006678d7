"""Input data, below ``models`` and ``training`` (it imports neither).

* ``tokenizers``: bytes, or a local ``tokenizer.json`` / SentencePiece model;
* ``corpus``: documents -> a train and a validation token stream (``TokenStream``, ``Corpus``);
* ``pipeline``: rows of a split -> this process's part of global batch ``t`` (grain);
* ``sft``: prompt/response JSONL -> padded rows with a prompt mask;
* ``needle``: associative-recall rows for long-context probes;
* ``activations``: reading a model's cached activations (an SAE's input).
"""
