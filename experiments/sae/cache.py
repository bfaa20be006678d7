"""Writes the activation cache of an SAE config (``training/activations.py``).

    python experiments/sae/cache.py --config=configs/sae.py:tiny \\
        --config.sae.lm_workdir=/tmp/lm --out=/tmp/acts --max_rows=8192
    python experiments/main.py --config=configs/sae.py:tiny --workdir=/tmp/sae \\
        --config.sae.lm_workdir=/tmp/lm --config.sae.activations=/tmp/acts

The cache holds the model, site and ``seq_len`` of ``--config``; runs that read it may change
anything about the SAE (architecture, width, sparsity, optimizer, steps).
"""

from absl import flags
from ml_collections import config_flags

from flaxseed.experiments import cli
from flaxseed.training import activations

_CONFIG = config_flags.DEFINE_config_file("config", None, "An SAE config file.", lock_config=True)
_OUT = flags.DEFINE_string("out", None, "The cache directory.")
_MAX_ROWS = flags.DEFINE_integer(
  "max_rows", None, "At most this many rows per split (evenly spaced); default: all of them."
)
flags.mark_flags_as_required(["config", "out"])


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  meta = activations.write(cli.config(_CONFIG), _OUT.value, max_rows=_MAX_ROWS.value)
  print(f"wrote {meta['rows']} rows of {meta['seq_len']} tokens at {meta['site']} to {_OUT.value}")


if __name__ == "__main__":
  cli.run(main)
