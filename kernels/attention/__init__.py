"""Attention: one API (``api.flash_attention``), an XLA reference and a chunked XLA path."""

from flaxseed.kernels.attention.api import default_implementation
from flaxseed.kernels.attention.api import flash_attention
from flaxseed.kernels.attention.api import implementations
from flaxseed.kernels.attention.api import register
from flaxseed.kernels.attention.reference import SegmentIds
