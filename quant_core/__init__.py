"""FidelityQuant engine: integer formats, kernels and quantized layers (framework-free)."""
from .formats import Int4Weight, pack_int4, quantize_int4_grouped, quantize_int8_per_channel, unpack_int4
from .modules import QuantConv2d, QuantLinear, StepContext

__all__ = [
    "Int4Weight", "QuantConv2d", "QuantLinear", "pack_int4",
    "quantize_int4_grouped", "quantize_int8_per_channel", "StepContext", "unpack_int4",
]
__version__ = "0.1.0"
