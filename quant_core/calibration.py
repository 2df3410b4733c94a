"""Calibration: what ``quantize()`` returns, what the artifact stores, what a runtime is built from.

It is a value: the layers' quantized weights and scales (as tensors, with the spec to rebuild each
layer), the timestep groups, the time tables, the precision plan, the base model's fingerprint and the
report. Nothing mutates it after ``quantize()`` returns; weight patches (LoRA) act on the layer modules
of a runtime (:class:`~quant_core.runtime.model.QuantizedModel`), whose tensors are shared with the
calibration but never written in place, so saving always writes the calibrated weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn

from .config import QuantConfig
from .models.adapters import UNetAdapter, detect_adapter
from .models.modeltree import fingerprint, fingerprints_match
from .runtime.layer_base import QuantLayer
from .runtime.layers import layer_from_spec
from .runtime.model import QuantizedModel


class IncompatibleModelError(ValueError):
    """A calibration was applied to a model it was not made for."""


@dataclass(frozen=True)
class LayerState:
    """One quantized layer: ``spec`` (kind and shapes, see ``layer_from_spec``) and its state-dict tensors."""

    spec: dict
    tensors: dict  # weight, [weight_group_scale], weight_scale, act_scale, [bias]

    @classmethod
    def of(cls, layer: QuantLayer) -> "LayerState":
        return cls(layer.spec(), {k: t.detach() for k, t in layer.state_dict().items()})

    def build(self, kinds: dict | None = None, device=None) -> QuantLayer:
        """A layer module whose tensors are these (shared, not copied)."""
        layer = layer_from_spec(self.spec, device="meta", kinds=kinds)
        for name, tensor in self.tensors.items():
            if name in layer._parameters:
                layer._parameters[name] = nn.Parameter(tensor.to(device) if device else tensor, requires_grad=False)
            elif name in layer._buffers:
                layer._buffers[name] = tensor.to(device) if device else tensor
            else:
                raise KeyError(f"unexpected tensor {name!r} for a {self.spec.get('kind')} layer")
        missing = [n for n, t in list(layer._parameters.items()) + list(layer._buffers.items())
                   if t is not None and t.is_meta]
        if missing:
            raise KeyError(f"missing tensors {missing} for a {self.spec.get('kind')} layer")
        return layer

    def with_act_scales(self, scales: torch.Tensor) -> "LayerState":
        return replace(self, tensors={**self.tensors, "act_scale": torch.as_tensor(scales, dtype=torch.float32)})

    @property
    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for n, t in self.tensors.items() if n != "act_scale")


@dataclass(frozen=True)
class Calibration:
    layout: str            # "ldm" (ComfyUI / A1111 / Forge / sgm UNetModel) | "diffusers"
    sd_version: str        # "sd1" | "sd2" | "sdxl"
    config: QuantConfig
    base_fingerprint: dict
    layers: dict           # name -> LayerState
    step_groups: list      # timestep groups: lists of timestep keys, descending t
    time_keys: torch.Tensor | None
    time_tables: dict      # time-path module name -> float32 (T, D)
    plan: dict             # name -> weight bits (4, 8 or 16 = kept float)
    report: dict = field(default_factory=dict)

    def runtime(self, timesteps_from_call=None, kinds: dict | None = None, device=None) -> QuantizedModel:
        """A fresh runtime (its own layer modules, sharing this calibration's tensors)."""
        layers = {name: state.build(kinds, device) for name, state in self.layers.items()}
        return QuantizedModel(layers, self.step_groups, self.time_keys, self.time_tables, self.report,
                              timesteps_from_call, describe=self.summary)

    def apply(self, unet: nn.Module, check: bool = True) -> nn.Module:
        """A quantized model: a clone of ``unet`` (sharing its float weights); ``unet`` itself is untouched."""
        adapter = self.check_compatible(unet) if check else detect_adapter(unet)
        return self.runtime(adapter.timesteps_from_call).apply(unet)

    def check_compatible(self, unet: nn.Module) -> UNetAdapter:
        """The model's adapter, or IncompatibleModelError when this calibration was made for another model."""
        adapter = detect_adapter(unet)
        if (adapter.layout, adapter.sd_version) != (self.layout, self.sd_version):
            raise IncompatibleModelError(
                f"this FidelityQuant file is for a {self.sd_version} {self.layout} UNet, but the model given is a "
                f"{adapter.sd_version} {adapter.layout} UNet. Load it with the checkpoint it was calibrated on, "
                "or calibrate this model.")
        found = fingerprint(adapter.quantizable_layers(unet))
        if not fingerprints_match(found, self.base_fingerprint):
            raise IncompatibleModelError(
                "this FidelityQuant file was calibrated on a different checkpoint (weight fingerprint "
                f"{self.base_fingerprint.get('fp16')} vs {found.get('fp16')} for the model given). "
                "Load it with the checkpoint it was made from, or calibrate this model. If a LoRA or another "
                "weight patch is applied before this node, apply it after the quantized model instead (or "
                "calibrate with it: the weights checked are the patched ones).")
        return adapter

    def weight_bytes(self) -> int:
        return sum(state.weight_bytes for state in self.layers.values())

    def summary(self) -> str:
        from .report import format_report

        return format_report(self)
