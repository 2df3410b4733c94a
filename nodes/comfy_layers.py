"""ComfyUI's weight-patch protocol on quantized layers, built on the engine seam (quant_core/runtime/weight_patch.py).

ComfyUI merges a patch (LoRA, model merge) by weight key through ``ModelPatcher.patch_weight_to_device``:
``convert_weight`` turns a copy of the stored codes into the float weight, ComfyUI adds the patch, and
``set_weight`` stores the result (docs/COMFYUI_FACTS.md section 5). Unpatching puts the backed-up codes
tensor back (or copies it in place); the seam's scale bookkeeping makes that exact. In low-VRAM mode
ComfyUI instead leaves the layer offloaded and puts patch functions in ``weight_function`` /
``bias_function`` (only for modules that have a ``comfy_cast_weights`` attribute); ``forward`` applies
them on temporary copies. No ComfyUI import: plain attribute names and call shapes.
"""
from __future__ import annotations

import torch

from quant_core.runtime.layers import QuantConv2d, QuantLinear
from quant_core.runtime.weight_patch import PatchableWeight


class ComfyWeightProtocol(PatchableWeight):
    comfy_cast_weights = False  # present, so ComfyUI's low-VRAM mode hands us weight functions

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.weight_function: list = []
        self.bias_function: list = []
        self._epoch = -1
        self._returned_scale = None  # (codes, scale) of the last set_weight(return_weight=True)

    def convert_weight(self, weight: torch.Tensor, inplace: bool = False, **kwargs) -> torch.Tensor:
        """Float weight (layer shape, float32) for stored codes ``weight`` (ComfyUI passes a float copy of them)."""
        return self.float_weight(weight)

    def set_weight(self, weight: torch.Tensor, inplace_update: bool = False, seed=None, return_weight: bool = False,
                   **kwargs):
        """Requantize a merged float weight (see the engine seam for how). ``return_weight`` (low-VRAM
        path): return the codes for one call instead of storing them; forward picks up their scale.

        The merged codes always go into a new tensor, also for ``inplace_update``: the calibrated codes are
        shared with the calibration and must never be written. ComfyUI's in-place restore then copies the
        backup into the merged tensor, which the checksum check at the next load notices.
        """
        codes, scale = self.merge(weight)
        if return_weight:
            self._returned_scale = (codes, scale) if scale is not self.calibrated_weight_scale() else None
            return codes
        self.store_merged(codes, scale)
        return None

    def _sync_weights(self) -> None:
        if self._epoch != self.context.weights_epoch:  # once per weights epoch (per load in ComfyUI)
            self._epoch = self.context.weights_epoch
            self._derived = {}  # an in-place restore leaves no version trace: rebuild caches once
            self.sync_restored(deep=True)
        else:
            self.sync_restored()

    def prepare(self, device=None) -> str:
        """At load (ON_LOAD, after ComfyUI merged patches): sync with restored weights, then prepack."""
        self._sync_weights()
        return super().prepare(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # the bookkeeping ran at load (prepare); a graph only computes
            return super().forward(x)
        self._sync_weights()
        if self.weight_function or self.bias_function:
            return self._forward_on_copies(x)
        return super().forward(x)

    def patch_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Apply ComfyUI's run-time weight functions (low-VRAM LoRA patches, weight wrappers) to ``codes``."""
        for fn in self.weight_function:
            if hasattr(fn, "patches") and hasattr(fn, "key"):
                # ComfyUI's LowVramPatch. In 0.3.64 it converts the stored codes and calls set_weight itself;
                # in 0.8.0 it takes and returns a float weight (the caller converts). A copy built without
                # convert/set functions takes a float weight in both; the requantization is ours.
                patched = type(fn)(fn.key, fn.patches)(self.float_weight(codes))
                codes, scale = self.merge(patched)
                if scale is not self.calibrated_weight_scale():  # the patch grew some rows (restored after the call)
                    self._buffers["weight_scale"] = scale.to(codes.device)
            else:  # a plain weight wrapper expects and returns a float weight
                value = self.weight_value(codes)
                patched = fn(value.dequantize().view(self.weight_shape))
                codes = self.storage_codes(value.requantize(patched.reshape(self.weight_shape[0], -1)))
        return codes

    def patch_bias(self, bias: torch.Tensor) -> torch.Tensor:
        for fn in self.bias_function:
            bias = fn(bias)
        return bias


class ComfyQuantLinear(ComfyWeightProtocol, QuantLinear):
    pass


class ComfyQuantConv2d(ComfyWeightProtocol, QuantConv2d):
    pass


COMFY_LAYER_KINDS = {"linear": ComfyQuantLinear, "conv": ComfyQuantConv2d}
