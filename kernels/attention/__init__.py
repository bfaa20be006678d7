"""Attention: one API (``api``), masks and their block layouts, an XLA reference, a chunked XLA
path and block-sparse Pallas kernels for TPU and GPU."""

from flaxseed.kernels.attention import masks
from flaxseed.kernels.attention.api import block_sparse_attention
from flaxseed.kernels.attention.api import default_implementation
from flaxseed.kernels.attention.api import flash_attention
from flaxseed.kernels.attention.api import implementations
from flaxseed.kernels.attention.api import register
from flaxseed.kernels.attention.block_common import BlockSizes
from flaxseed.kernels.attention.reference import SegmentIds
