"""Kernels: one package per op (``api.py``, a reference, one file per backend).

  attention/  ``flash_attention``, ``block_sparse_attention`` and ``masks``
  quant/      ``quantize_weight``, ``dequantize_weight``, ``quantized_matmul``
  sparse/     ``pack_24``, ``unpack_24``, ``sparse24_matmul`` (packed 2:4 weights)

Every op has one entry point with ``implementation=None | "xla" | ...``; ``None`` picks the best
for the backend and falls back to the XLA reference, so models never name a backend.
"""

from flaxseed.kernels.attention import SegmentIds
from flaxseed.kernels.attention import block_sparse_attention
from flaxseed.kernels.attention import flash_attention
from flaxseed.kernels.attention import masks
from flaxseed.kernels.attention import reference as attention_reference
from flaxseed.kernels.quant import QuantizedWeight
from flaxseed.kernels.quant import dequantize_weight
from flaxseed.kernels.quant import quantize_weight
from flaxseed.kernels.quant import quantized_matmul
from flaxseed.kernels.sparse import Sparse24Weight
from flaxseed.kernels.sparse import pack_24
from flaxseed.kernels.sparse import sparse24_matmul
from flaxseed.kernels.sparse import unpack_24
