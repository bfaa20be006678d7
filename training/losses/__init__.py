"""Loss functions the post-training tasks share: preference optimization and distillation."""

from flaxseed.training.losses import distillation
from flaxseed.training.losses import preference
