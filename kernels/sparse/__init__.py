"""Packed 2:4 sparse weights (half the values, 4 bits of positions a group) and their matmul."""

from flaxseed.kernels.sparse.api import sparse24_matmul
from flaxseed.kernels.sparse.formats import Sparse24Weight
from flaxseed.kernels.sparse.formats import pack_24
from flaxseed.kernels.sparse.formats import unpack_24
