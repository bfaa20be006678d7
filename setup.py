"""flaxseed: the repository root is the package ``flaxseed`` (see docs/design.md)."""

import setuptools

SUBPACKAGES = setuptools.find_packages(".", exclude=("tests", "tests.*"))

setuptools.setup(
  name="flaxseed",
  version="0.1.0",
  description="A JAX/Flax research codebase: transformer LM, Titans, diffusion LM, SAEs, LoRA.",
  long_description=open("README.md", encoding="utf-8").read(),
  long_description_content_type="text/markdown",
  license="Apache-2.0",
  python_requires=">=3.11",
  package_dir={"flaxseed": "."},
  packages=["flaxseed"] + [f"flaxseed.{p}" for p in SUBPACKAGES],
  install_requires=[
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "chex>=0.1.92",
    "grain>=0.2.18",
    "absl-py>=2.1",
    "ml_collections>=1.1",
    "numpy>=1.26",
    # TensorBoard event files without TensorFlow (pure Python, needs only protobuf + numpy).
    "tensorboardX>=2.6",
  ],
  extras_require={
    # libtpu lets the suite compile the train step for a TPU topology; tokenizers and
    # sentencepiece let it load real tokenizer files.
    "test": [
      "pytest>=8",
      "pytest-xdist>=3.5",
      "jax[tpu]>=0.10.2",
      "tokenizers>=0.20",
      "sentencepiece>=0.2",
      "jinja2>=3.1",
      "matplotlib>=3.8",
      "safetensors>=0.4",
    ],
    # The formatter and linter that CI runs (`ruff format --check .`, `ruff check .`).
    "lint": ["ruff>=0.15"],
    # libtpu: compiles for any TPU topology on a machine without a TPU (experiments/aot.py).
    "tpu": ["jax[tpu]>=0.10.2"],
    # Local tokenizers: tokenizer.json (Hugging Face tokenizers) and SentencePiece models;
    # jinja2 renders a tokenizer folder's chat template (data/chat.py), as transformers does.
    "tokenizers": ["tokenizers>=0.20", "sentencepiece>=0.2", "jinja2>=3.1"],
    # Hugging Face checkpoints and peft adapters (models/hf.py, hf.to_peft): the
    # safetensors file format.
    "hf": ["safetensors>=0.4"],
    # Plots of the studies and the SAE feature browser (experiments/sae/browse.py).
    "plots": ["matplotlib>=3.8"],
    # Parity tests and benchmarks against PyTorch only; never a runtime dependency. On
    # Python 3.11 `pip install torch==2.13.0` takes a CPU wheel (see docs/design.md).
    # transformers and peft: the parity tests of models/hf.py and hf.to_peft.
    "torch": ["torch>=2.5", "transformers>=4.45", "peft>=0.13", "safetensors>=0.4"],
  },
)
