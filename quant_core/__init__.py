"""FidelityQuant engine: integer formats, kernels and quantized layers (framework-free)."""
from .formats import Int4Weight, pack_int4, quantize_int4_grouped, quantize_int8_per_channel, unpack_int4
from .modules import ActivationGroups, QuantConv2d, QuantLinear

__all__ = [
    "ActivationGroups", "Int4Weight", "QuantConv2d", "QuantLinear", "pack_int4",
    "quantize_int4_grouped", "quantize_int8_per_channel", "unpack_int4",
]
__version__ = "0.1.0"
