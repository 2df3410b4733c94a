"""FidelityQuant engine: calibrate a Stable Diffusion UNet and run it with integer math (framework-free).

    from quant_core import quantize, save, load
    calibration = quantize(unet, runner, "W4A8")   # unet is never modified
    qunet = calibration.apply(unet)                # a clone sharing float weights, quantized layers swapped in
    save(calibration, "unet-w4a8.safetensors"); calibration = load("unet-w4a8.safetensors", unet)

Packages: ``runtime`` (formats, kernels, layers, a model's routing), ``calibrate`` (capture, fitting, the
pipeline), ``models`` (adapters, runners); docs/ARCHITECTURE.md is the map.
"""
from .artifact import load_result as load
from .artifact import save_result as save
from .calibrate.pipeline import quantize
from .calibration import Calibration, IncompatibleModelError
from .config import PRESETS, QuantConfig, preset
from .models.runners import Runner
from .runtime.context import StepContext
from .runtime.layers import QuantConv2d, QuantLinear

__all__ = ["Calibration", "IncompatibleModelError", "PRESETS", "QuantConfig", "QuantConv2d", "QuantLinear",
           "Runner", "StepContext", "load", "preset", "quantize", "save"]
__version__ = "0.1.0"
