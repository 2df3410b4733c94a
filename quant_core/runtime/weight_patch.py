"""The engine seam for weight patches (LoRA, model merges): dequantize -> patched float -> requantize,
and restore exactly. Hosts map their own protocol onto it (ComfyUI: ``nodes/comfy_layers.py``).

Merging keeps the calibrated scales. W8: only rows whose merged weight would saturate get a larger
channel scale. W4: a weight still on the layer's int4 grid (e.g. strength 0) keeps its int4 codes bit
for bit; any other merged weight is held as int8 codes with per-row scales (the int4 path unpacks to
int8 before its GEMM anyway), because re-rounding the delta on the int4 grid would add a second
int4 rounding error to every patched layer.

Restoring. Hosts back up and restore only the ``weight`` tensor. A grown scale therefore belongs to
the merged codes tensor: once the host puts other codes back (a different tensor, or an in-place copy
noticed by checksum at the next weights epoch), the calibrated scale is back, so unpatching is exact.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import formats
from .context import tensor_version

GROW_TOLERANCE = 1e-4  # a row grows only if its merged max exceeds the range by more than this (relative)


def _checksum(codes: torch.Tensor) -> int:
    flat = codes.detach().reshape(-1)
    return int(flat.to(torch.int64).sum()) ^ int(flat[::97].to(torch.int64).sum()) << 20


def grown_scale(weight: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``base``, or a copy with larger entries for the rows of ``weight`` that exceed its int8 range."""
    w2d = weight.detach().to(torch.float32).reshape(base.shape[0], -1)
    base_f = base.to(w2d.device, torch.float32)
    need = w2d.abs().amax(1) / formats.INT8_QMAX
    grow = need > base_f * (1 + GROW_TOLERANCE)
    if not bool(grow.any()):
        return base
    return torch.where(grow, need, base_f).to(base.dtype).to(base.device)


class PatchableWeight:
    """Mixin for a :class:`~quant_core.runtime.layers.QuantLayer` whose weight a host patches.

    ``float_weight`` gives the host the float weight of any codes, ``merge`` turns a patched float weight
    into codes and a scale, ``store_merged`` keeps them, ``sync_restored`` notices a restore.
    """

    def _patch_state(self) -> dict:
        state = self.__dict__.get("_patch")
        if state is None:
            state = self.__dict__["_patch"] = {"calibrated_scale": None, "scale_owner": None, "merged": None,
                                               "info": {}}
        return state

    @property
    def patch_info(self) -> dict:
        return self._patch_state()["info"]

    def calibrated_weight_scale(self) -> torch.Tensor:
        calibrated = self._patch_state()["calibrated_scale"]
        return calibrated if calibrated is not None else self.weight_scale

    def float_weight(self, codes: torch.Tensor) -> torch.Tensor:
        """Float32 weight (layer shape) of ``codes`` (any dtype) on the calibrated scales.

        Dequantizes the codes it is given, not ``self.weight``: a host hands over the unpatched codes
        (also backed-up ones while a patch is merged).
        """
        return self.weight_value(codes, self.calibrated_weight_scale()).dequantize().view(self.weight_shape)

    def merge(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, channel scale) for a patched float weight of this layer's shape; records ``patch_info``."""
        self.sync_restored()
        base = self.calibrated_weight_scale()
        w2d = weight.detach().to(torch.float32).reshape(base.shape[0], -1)
        on_grid = self.calibrated_grid(base).requantize(w2d)
        if torch.equal(on_grid.dequantize().to(w2d.device), w2d):  # e.g. strength 0: keep the codes bit for bit
            codes, scale = self.storage_codes(on_grid), base
        elif self.format.patch_as_int8:
            merged = formats.Int8Weight.from_float(w2d)
            codes, scale = merged.codes, merged.channel_scale.to(base.dtype).to(base.device)
        else:
            scale = grown_scale(w2d, base)
            codes = self.storage_codes(formats.Int8Weight.on_scale(w2d, scale))
        grown = scale is not base
        self._patch_state()["info"] = {
            "grown_rows": int((scale > base).sum()) if grown else 0,
            "max_growth": float((scale / base.clamp_min(1e-30)).max()) if grown else 1.0,
            "stored_as": "int8" if codes.dtype == torch.int8 else "int4"}
        return codes, scale

    def store_merged(self, codes: torch.Tensor, scale: torch.Tensor) -> None:
        """Keep merged codes as the layer's weight (a new Parameter: the calibrated codes are never written,
        so a calibration that shares them stays intact) with their scale."""
        state = self._patch_state()
        self.weight = nn.Parameter(codes, requires_grad=False)
        state["merged"] = (self.weight, tensor_version(self.weight), _checksum(self.weight))
        if scale is not self.calibrated_weight_scale():
            if state["calibrated_scale"] is None:
                state["calibrated_scale"] = self.weight_scale
            self._buffers["weight_scale"] = scale
            state["scale_owner"] = state["merged"]
        else:
            self._restore_calibrated_scale()

    @property
    def has_merged_patch(self) -> bool:
        """Whether the stored codes are a merged weight patch that has not been restored yet.

        An in-place restore (ComfyUI ``copy_to_param``) leaves no version trace; ``sync_restored(deep=True)``
        catches it by checksum.
        """
        merged = self._patch_state()["merged"]
        return merged is not None and merged[0] is self.weight and tensor_version(merged[0]) == merged[1]

    def _restore_calibrated_scale(self) -> None:
        state = self._patch_state()
        if state["calibrated_scale"] is not None:
            self._buffers["weight_scale"] = state["calibrated_scale"]
        state["calibrated_scale"] = None
        state["scale_owner"] = None

    def sync_restored(self, deep: bool = False) -> None:
        """Drop a grown scale once its codes are gone (the host restored its backup). ``deep`` also catches
        an in-place restore by checksum, and forgets a merged patch that was overwritten."""
        state = self._patch_state()
        owner = state["scale_owner"]
        if owner is not None and (owner[0] is not self.weight or tensor_version(owner[0]) != owner[1]
                                  or (deep and _checksum(self.weight) != owner[2])):
            self._restore_calibrated_scale()
        merged = state["merged"]
        if deep and merged is not None and (merged[0] is not self.weight or _checksum(self.weight) != merged[2]):
            state["merged"] = None

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.sync_restored(deep=True)  # never save restored codes with a grown scale
        super()._save_to_state_dict(destination, prefix, keep_vars)
