"""A1111's built-in Lora extension on quantized layers, built on the engine seam (quant_core/runtime/weight_patch.py).

That extension (``extensions-builtin/Lora``, module ``networks``) patches ``torch.nn.Linear/Conv2d.forward``:
before each forward, a layer whose ``network_current_names`` differs from the wanted set of loaded networks
restores its float backup and adds each network's ``calc_updown(weight)`` for its ``network_layer_name``.
Quantized layers are not ``nn.Linear``, so they take part deliberately: the same check per forward, the
deltas added to the dequantized calibrated weight, the result requantized (``merge`` / ``store_merged``),
once per change of the LoRA set. Removing the LoRAs puts the calibrated codes, scale and bias back
exactly. ``network_layer_name`` is copied from the float layer each replaces. No A1111 import: the
``networks`` module is looked up in ``sys.modules`` (absent when the extension is disabled).
"""
from __future__ import annotations

import sys

import torch
import torch.nn as nn

from quant_core.runtime.layers import QuantConv2d, QuantLinear
from quant_core.runtime.weight_patch import PatchableWeight


def wanted_networks(networks) -> tuple:
    """The key A1111 compares per layer: (name, te multiplier, unet multiplier, dyn_dim) of each loaded network."""
    return tuple((n.name, n.te_multiplier, n.unet_multiplier, n.dyn_dim) for n in networks.loaded_networks)


def copy_network_name(_name, original, replacement) -> None:
    """LayerSwap hook: the replacement answers to the same Lora module name as the float layer."""
    layer_name = getattr(original, "network_layer_name", None)
    if layer_name is not None and isinstance(replacement, A1111WeightProtocol):
        replacement.network_layer_name = layer_name


class A1111WeightProtocol(PatchableWeight):
    network_layer_name = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        networks = sys.modules.get("networks")
        if networks is not None and self.network_layer_name is not None:
            self.apply_networks(networks)
        return super().forward(x)

    def apply_networks(self, networks) -> None:
        wanted = wanted_networks(networks)
        if wanted == self.__dict__.get("network_current_names", ()):
            return
        calibrated = self.__dict__.setdefault("_calibrated_params", (self.weight, self.bias))
        self._parameters["weight"], self._parameters["bias"] = calibrated  # exact restore
        self.sync_restored(deep=True)
        modules = [m for m in (n.modules.get(self.network_layer_name) for n in networks.loaded_networks)
                   if m is not None]
        if modules:
            with torch.no_grad():
                weight = self.float_weight(self.weight)
                bias = None if self.bias is None else self.bias.detach().float()
                for module in modules:
                    updown, ex_bias = module.calc_updown(weight)
                    weight = weight + updown.to(weight.device, torch.float32).reshape(weight.shape)
                    if ex_bias is not None:
                        base = bias if bias is not None else torch.zeros(weight.shape[0], device=weight.device)
                        bias = base + ex_bias.to(base.device, torch.float32).reshape(-1)
                codes, scale = self.merge(weight)
                self.store_merged(codes, scale)
                if bias is not None and (self.bias is None or not torch.equal(bias, self.bias)):
                    self._parameters["bias"] = nn.Parameter(bias, requires_grad=False)
        self.network_current_names = wanted


class A1111QuantLinear(A1111WeightProtocol, QuantLinear):
    pass


class A1111QuantConv2d(A1111WeightProtocol, QuantConv2d):
    pass


A1111_LAYER_KINDS = {"linear": A1111QuantLinear, "conv": A1111QuantConv2d}
