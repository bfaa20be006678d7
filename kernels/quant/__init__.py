"""Quantized weights (int8, int4, NF4, ternary) and the matmul kernels that read them."""

from flaxseed.kernels.quant.api import quantized_matmul
from flaxseed.kernels.quant.formats import FORMATS
from flaxseed.kernels.quant.formats import QuantizedWeight
from flaxseed.kernels.quant.formats import dequantize_weight
from flaxseed.kernels.quant.formats import quantize_weight
