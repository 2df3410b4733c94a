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
from .calibrate import pipeline as _pipeline
from .calibration import Calibration, IncompatibleModelError
from .config import PRESETS, QuantConfig, preset
from .models.runners import Runner
from .runtime.context import StepContext
from .runtime.layers import QuantConv2d, QuantLinear
from .validate import InputError, check_config, check_finite_weights, check_uniform_dtype


def quantize(unet, runner, config: QuantConfig | str | None = None, progress=None) -> Calibration:
    """Calibrate and quantize ``unet`` (never modified); see ``calibrate.pipeline.quantize``. Checks the
    config's ranges and the float weights first, so a broken model is named before any sampling."""
    cfg = preset(config) if isinstance(config, str) else (config or preset("W8A8"))
    check_config(cfg)
    check_uniform_dtype(unet)
    check_finite_weights(unet)
    return _pipeline.quantize(unet, runner, cfg, progress)


__all__ = ["Calibration", "IncompatibleModelError", "InputError", "PRESETS", "QuantConfig", "QuantConv2d", "QuantLinear",
           "Runner", "StepContext", "load", "preset", "quantize", "save"]
__version__ = "0.1.0"
