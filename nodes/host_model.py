"""What ComfyUI detected for a MODEL (named in the reports), and the ComfyUI weight formats refused.

ComfyUI picks a model-config class from the state dict (comfy/supported_models.py: ``SD15``, ``SD20``,
``SDXL`` and its reduced-depth subclasses ``SSD1B`` / ``Segmind_Vega`` / ``KOALA_*``, ``SDXLRefiner``, ...)
and a prediction type (eps, v_prediction, ...); the report names both beside quant_core's own
sd1/sd2/sdxl adapter.

Weights ComfyUI keeps quantized: fp8 storage without a scale (UNETLoader weight_dtype fp8_*) is the
model's own float weight, read as is. ComfyUI 0.8.0 loads scaled-fp8 / mixed-precision checkpoints as
``QuantizedTensor`` weights (comfy/quant_ops.py), which dequantize when read as float: calibrated from
those values. ComfyUI 0.3.64 loads the same checkpoints as fp8 codes plus a separate ``scale_weight``
(comfy/ops.py ``scaled_fp8_ops``): a plain read ignores that scale, so such a layer is refused.
"""
from __future__ import annotations

import torch

# (ComfyUI model-config class somewhere in the detected class's MRO, family shown in the report)
_FAMILIES = (("SDXLRefiner", "SDXL refiner"), ("SDXL", "SDXL family"), ("SD20", "SD2.x"), ("SD15", "SD1.x"))


class UnsupportedWeightFormatError(ValueError):
    """A layer holds weights in a ComfyUI storage format FidelityQuant cannot read as float."""


def host_model_line(model) -> str:
    """'ComfyUI model: Segmind_Vega (SDXL family), eps prediction' for a MODEL; '' for anything else."""
    base = getattr(model, "model", None)
    config = getattr(base, "model_config", None) if base is not None else None
    if config is None:
        return ""
    names = [cls.__name__ for cls in type(config).__mro__]
    family = next((label for name, label in _FAMILIES if name in names), "family not known to FidelityQuant")
    prediction = getattr(getattr(base, "model_type", None), "name", "unknown").lower()
    return f"\nComfyUI model: {type(config).__name__} ({family}), {prediction} prediction"


def check_weight_formats(unet, layer_names) -> None:
    """Refuse layers whose weight is stored as codes with a separate scale (0.3.64's scaled fp8 ops)."""
    for name in layer_names:
        scale = getattr(unet.get_submodule(name), "scale_weight", None)
        if isinstance(scale, torch.Tensor):
            raise UnsupportedWeightFormatError(
                f"FidelityQuant: layer {name} holds scaled fp8 weights (this ComfyUI's scaled_fp8 format: fp8 codes "
                "times a separate scale_weight), which FidelityQuant cannot read as the model's float weights. "
                "Load a fp16/bf16/fp32 version of this checkpoint (plain fp8 storage, e.g. Load Diffusion Model's "
                "weight_dtype fp8_e4m3fn, works), or use ComfyUI 0.8.0 or later, which loads scaled fp8 as "
                "dequantizable tensors.")
