"""Forge's LoRA on quantized layers, built on the engine seam (quant_core/runtime/weight_patch.py).

Forge keeps a model's LoRAs as ``UnetPatcher.lora_patches`` ({(file, strength, strength_model, online):
{parameter path: [patch, ...]}}) and merges them into the float weights when it loads the model for
sampling (``LoraLoader.refresh``). The quantized layers take the same patches: once per change of the
LoRA set, each layer's calibrated codes are dequantized, Forge's own ``merge_lora_to_weight`` adds the
patches for ``diffusion_model.<layer>.weight`` / ``.bias``, and the result is requantized (``merge`` /
``store_merged``). An empty set puts the calibrated codes, scale and bias back exactly. Forge's
"online" LoRA mode (patches applied per forward by Forge's own layers) is refused with a quantized file.
Forge modules are imported inside functions only.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from quant_core.runtime.layers import QuantConv2d, QuantLinear
from quant_core.runtime.weight_patch import PatchableWeight

PREFIX = "diffusion_model."  # Forge's patch keys are parameter paths of the patcher's model (KModel)


class ForgePatchable(PatchableWeight):
    """A quantized layer that holds the merge of one LoRA set (``lora_key``) or the calibrated weights."""

    lora_key = ()

    def calibrated_params(self) -> tuple:
        return self.__dict__.setdefault("_calibrated_params", (self.weight, self.bias))

    def restore_calibrated(self) -> None:
        self._parameters["weight"], self._parameters["bias"] = self.calibrated_params()
        self.sync_restored(deep=True)

    def merge_float(self, merge_weight, merge_bias, weight_patches, bias_patches) -> None:
        """Restore, then merge: ``merge_weight(patches, float tensor) -> patched float tensor`` (same for bias)."""
        self.restore_calibrated()
        if weight_patches:
            weight = merge_weight(weight_patches, self.float_weight(self.weight))
            codes, scale = self.merge(weight.to(torch.float32))
            self.store_merged(codes, scale)
        if bias_patches and self.bias is not None:
            bias = merge_bias(bias_patches, self.bias.detach().float())
            self._parameters["bias"] = nn.Parameter(bias.to(self.bias.dtype), requires_grad=False)


class ForgeQuantLinear(ForgePatchable, QuantLinear):
    pass


class ForgeQuantConv2d(ForgePatchable, QuantConv2d):
    pass


FORGE_LAYER_KINDS = {"linear": ForgeQuantLinear, "conv": ForgeQuantConv2d}


def offline_patches(lora_patches: dict) -> tuple[dict, bool]:
    """(all merged patches by parameter path, as Forge's refresh gathers them; whether any LoRA is online)."""
    merged: dict = {}
    online = False
    for (_file, _strength, _strength_model, online_mode), patches in lora_patches.items():
        if online_mode:
            online = True
            continue
        for key, current in patches.items():
            merged[key] = merged.get(key, []) + list(current)
    return merged, online


def lora_set_key(lora_patches: dict) -> tuple:
    """What identifies a LoRA set (Forge compares the same: its identifiers, with strengths)."""
    return tuple(lora_patches.keys())


def apply_lora_set(runtime, lora_patches: dict, merge_weight) -> bool:
    """Bring every quantized layer of ``runtime`` to the LoRA set ``lora_patches`` (no-op when it already holds
    it); -> whether anything changed. ``merge_weight(patches, float weight, key) -> patched float weight``."""
    key = lora_set_key(lora_patches)
    layers = [layer for layer in runtime.layers.values() if isinstance(layer, ForgePatchable)]
    if all(layer.lora_key == key for layer in layers):
        return False
    patches, online = offline_patches(lora_patches)
    if online:
        raise ValueError("FidelityQuant: Forge's online LoRA mode is not supported with a quantized UNet; turn "
                         "it off in Settings, or choose 'None' for FidelityQuant")
    with torch.inference_mode(False), torch.no_grad():
        for name, layer in runtime.layers.items():
            if not isinstance(layer, ForgePatchable):
                continue
            wkey, bkey = f"{PREFIX}{name}.weight", f"{PREFIX}{name}.bias"
            layer.merge_float(lambda p, w, k=wkey: merge_weight(p, w, k), lambda p, b, k=bkey: merge_weight(p, b, k),
                              patches.get(wkey), patches.get(bkey))
            layer.lora_key = key
    runtime.weights_changed(patched=bool(patches))
    return True
