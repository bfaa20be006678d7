"""The one training loop: ``train(config, workdir)`` serves every task (see ``trainer.py``)."""

from flaxseed.training.trainer import NonFiniteLossError
from flaxseed.training.trainer import restore
from flaxseed.training.trainer import train
