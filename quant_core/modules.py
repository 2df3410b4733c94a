"""Quantized layers: QuantLinear and QuantConv2d (W8A8 and W4A8).

Storage (registered tensors, so ``state_dict()`` shows the real bytes). ``weight`` and ``bias`` are
frozen ``nn.Parameter``s because ComfyUI only loads, moves and weight-patches (LoRA) a module's
parameters (a LoRA's bias diff on a buffer would be silently dropped); everything else is a buffer:

    weight              int8 codes (W8: the float weight's shape) or packed int4 (W4: uint8 (N, K/2))
    weight_group_scale  W4 only: uint8 (N, K/group_size), integer group scales in [1, 16]
    weight_scale        float32 (N,): per-output-channel scale
    act_scale           float32 (G,): static activation scale per timestep group; empty = dynamic
    bias                float32 (N,) or absent

The current timestep group comes from a :class:`StepContext` that all layers of one model share;
the model-level wrapper sets it once per UNet call.

Weight patches (LoRA). ComfyUI merges a patch by weight key: ``convert_weight`` turns stored codes
into the float weight, ComfyUI adds the patch, ``set_weight`` requantizes onto the layer's calibrated
scales; only rows whose merged weight would saturate get a larger channel scale, owned by the merged
codes tensor, so restoring the backed-up codes restores the calibrated scale (unpatch is exact).
W4 layers hold a merged patch as int8 codes with per-row scales (their GEMM is int8 anyway), so
the delta is not re-rounded on the coarse int4 grid; a weight still on the int4 grid keeps its codes. In low-VRAM mode ComfyUI instead leaves the layer offloaded and puts
patch functions in ``weight_function`` / ``bias_function`` (only for modules that have a
``comfy_cast_weights`` attribute); ``forward`` applies them. Plain attribute names, no ComfyUI import.

Activation-range check. Merged weights keep the calibrated activation scales. After the weights may
have changed (``StepContext.weights_epoch`` bumped with ``check_ranges`` set), each static layer
measures, once per timestep group, how much of its input falls outside its calibrated range (one
extra reduction on that call only); :meth:`QuantResult.finish_call` turns that into a warning.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import formats, kernels



def _version(tensor: torch.Tensor) -> int:
    """The tensor's in-place version counter, or -1 for an inference tensor (made under
    ``torch.inference_mode()``, as ComfyUI's server patches LoRA weights), which has none; the
    identity and checksum checks next to every use still catch a replaced or rewritten tensor."""
    return -1 if tensor.is_inference() else tensor._version

class StepContext:
    """Per-model state for the current UNet call, set once per call by the model-level wrapper.

    ``group``: which timestep group's activation scales are live.
    ``timesteps``: the call's timesteps (model-time t, shape (B,)).
    ``time_rows``: row of each timestep in the precalculated time tables, or None when any
    timestep of the call was not seen in calibration (then the time path is computed in float).
    """

    def __init__(self) -> None:
        self.group = 0
        self.timesteps = None
        self.time_rows = None
        # Bumped whenever the weights may have changed (e.g. a ComfyUI load with LoRA patches): time
        # lookups re-verify their tables and, with ``check_ranges``, layers re-measure their input
        # range once per group. Comparing this int is the only per-call cost.
        self.weights_epoch = 0
        self.check_ranges = False
        self.range_pending = False  # a layer measured during the current call


class RangeStats:
    """How a layer's input compares to its calibrated static range in one timestep group.

    ``clipped_energy``: ||x - clamp(x)||^2 / ||x||^2, the share of the input's energy cut off by the
    range limit; ``outside``: fraction of elements beyond it; ``ratio``: max |x| / range limit.
    """

    __slots__ = ("group", "clipped_energy", "outside", "ratio")

    def __init__(self, group: int, clipped_energy: float, outside: float, ratio: float) -> None:
        self.group, self.clipped_energy, self.outside, self.ratio = group, clipped_energy, outside, ratio

    def as_dict(self) -> dict:
        return {"group": self.group, "clipped_energy": self.clipped_energy, "outside": self.outside,
                "ratio": self.ratio}


def measure_range(x: torch.Tensor, scale: torch.Tensor, group: int) -> RangeStats:
    limit = float(scale) * kernels.ACT_QMAX
    a = x.detach().float().abs()
    total = float(a.pow(2).sum()) or 1.0
    over = (a - limit).clamp_min_(0)
    return RangeStats(group, float(over.pow(2).sum()) / total, float((over > 0).float().mean()),
                      float(a.amax()) / limit if limit > 0 else float("inf"))


class _QuantLayer(nn.Module):
    """Weight storage, scales and backend bookkeeping shared by linear and conv layers."""

    def __init__(self, out_features: int, reduce_dim: int, weight_shape: tuple, weight_bits: int,
                 group_size: int, act_groups: int, has_bias: bool, device=None) -> None:
        super().__init__()
        if weight_bits not in (4, 8):
            raise ValueError(f"weight_bits must be 4 or 8, got {weight_bits}")
        if weight_bits == 4 and group_size not in formats.SUPPORTED_GROUP_SIZES:
            raise ValueError(f"group_size must be one of {formats.SUPPORTED_GROUP_SIZES}, got {group_size}")
        self.weight_bits = weight_bits
        self.group_size = group_size if weight_bits == 4 else 0
        self.reduce_dim = reduce_dim  # K of the GEMM (in_features, or C*kh*kw for convs)
        self.weight_shape = tuple(weight_shape)
        if weight_bits == 8:
            codes = torch.empty(weight_shape, dtype=torch.int8, device=device)
        else:
            k_pad = formats.padded_width(reduce_dim, group_size)
            codes = torch.empty(out_features, k_pad // 2, dtype=torch.uint8, device=device)
        self.weight = nn.Parameter(codes, requires_grad=False)
        if weight_bits == 4:
            self.register_buffer("weight_group_scale",
                                 torch.empty(out_features, k_pad // group_size, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32, device=device))
        self.register_buffer("act_scale", torch.empty(act_groups, dtype=torch.float32, device=device))
        if has_bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=torch.float32, device=device), requires_grad=False)
        else:
            self.bias = None
        self.context = StepContext()
        # ComfyUI low-VRAM protocol (see module docstring): patch functions applied in forward.
        self.comfy_cast_weights = False
        self.weight_function: list = []
        self.bias_function: list = []
        self.range_stats: dict = {}  # group -> RangeStats of the current weights epoch
        self._range_epoch = -1
        self._calibrated_scale = None   # set while a merged patch grew some channel scales
        self._scale_owner = None        # (codes Parameter, its version, checksum) the grown scale belongs to
        self._returned_scale = None     # (codes, scale) of the last set_weight(return_weight=True)
        self._merged = None             # (codes Parameter, version) written by the last set_weight
        self.patch_info: dict = {}
        self.keep_unpacked = False  # W4: keep the exact int8 copy after first use (speed over memory)
        self._derived: dict = {}
        self._backend: dict = {}
        self._backend_override: str | None = None

    BACKENDS: tuple = ()

    def use_backend(self, name: str | None) -> None:
        """Pin this layer to one backend (None restores automatic choice), e.g. to compare paths."""
        if name is not None and name not in self.BACKENDS:
            raise ValueError(f"{type(self).__name__} backends are {self.BACKENDS}, got {name!r}")
        self._backend_override = name

    # ---------------------------------------------------------------- weights

    def set_float_weight(self, weight: torch.Tensor, clip=None, per_tensor: bool = False) -> None:
        """Quantize a float weight (the layer's natural shape) into this layer's buffers."""
        w2d = weight.detach().reshape(weight.shape[0], -1)
        if self.weight_bits == 8:
            codes, scale = formats.quantize_int8_per_channel(w2d, clip, per_tensor)
            self.weight.copy_(codes.view(self.weight.shape))
        else:
            packed = formats.quantize_int4_grouped(w2d, self.group_size, clip, per_tensor)
            self.weight.copy_(packed.packed)
            self.weight_group_scale.copy_(packed.group_scale)
            scale = packed.channel_scale
        self.weight_scale.copy_(scale)

    # ---------------------------------------------------------------- ComfyUI weight patches (LoRA)
    # ComfyUI merges a LoRA by weight key: convert_weight gives it our float weight, it adds the
    # patch, set_weight stores the result. The calibrated scales are kept; only rows whose merged
    # weight would saturate get a larger channel scale, and that scale belongs to the patched codes
    # tensor: once ComfyUI restores the backed-up codes (a different tensor, or an in-place copy
    # noticed at the next weights epoch), the calibrated scale is back, so unpatching is exact.

    GROW_TOLERANCE = 1e-4  # a row grows only if its merged max exceeds the range by more than this (relative)

    def convert_weight(self, weight: torch.Tensor, inplace: bool = False, **kwargs) -> torch.Tensor:
        """Float weight (layer shape, float32) for stored codes ``weight`` (ComfyUI passes a float copy of them).

        Dequantizes the codes it is given, on the calibrated scales, not ``self.weight``: ComfyUI
        hands over the unpatched codes (also backed-up ones, e.g. ``get_key_patches`` for merging).
        """
        return self.dequantize_codes(weight, self.calibrated_weight_scale())

    def set_weight(self, weight: torch.Tensor, inplace_update: bool = False, seed=None, return_weight: bool = False,
                   **kwargs):
        """Requantize a merged float weight.

        W8: on the calibrated scales, grown only for rows that would saturate. W4: a weight still on
        the layer's int4 grid (e.g. strength 0) keeps its int4 codes, bit for bit; any other merged
        weight is stored as int8 codes with per-row scales while patched (the int4 path unpacks to
        int8 before its GEMM anyway): re-rounding the delta on the int4 grid would add a second int4
        rounding error to every patched layer.
        """
        self._sync_scale()
        base = self.calibrated_weight_scale()
        if self.weight_bits == 4:
            codes, scale = self._merge_w4(weight, base)
        else:
            scale = self.merge_scale(weight, base)
            codes = self.requantize_codes(weight, scale)
        grown = scale is not base
        self.patch_info = {"grown_rows": int((scale > base).sum()) if grown else 0,
                           "max_growth": float((scale / base.clamp_min(1e-30)).max()) if grown else 1.0,
                           "stored_as": "int8" if codes.dtype == torch.int8 else "int4"}
        if return_weight:  # low-VRAM path: codes for one call; forward picks up the matching scale
            self._returned_scale = (codes, scale) if grown else None
            return codes
        if inplace_update and codes.shape == self.weight.shape and codes.dtype == self.weight.dtype:
            with torch.no_grad():
                self.weight.copy_(codes)  # (not .data: the version bump invalidates derived caches)
        else:
            self.weight = nn.Parameter(codes, requires_grad=False)
        self._merged = (self.weight, _version(self.weight), self._checksum(self.weight))
        if grown:
            if self._calibrated_scale is None:
                self._calibrated_scale = self.weight_scale
            self._buffers["weight_scale"] = scale
            self._scale_owner = self._merged
        else:
            self._restore_calibrated_scale()
        return None

    def _merge_w4(self, weight: torch.Tensor, base: torch.Tensor):
        """(codes, channel scale) for a merged weight of a W4 layer (see set_weight)."""
        on_grid = self.requantize_codes(weight, base)
        w = weight.detach().to(torch.float32)
        if torch.equal(self.dequantize_codes(on_grid, base).to(w.device), w.reshape(self.weight_shape)):
            return on_grid, base
        w2d = w.reshape(base.shape[0], -1)
        scale = (w2d.abs().amax(1) / formats.INT8_QMAX).clamp_min_(1e-12)
        codes = torch.round(w2d / scale.unsqueeze(1)).clamp_(-formats.INT8_QMAX, formats.INT8_QMAX).to(torch.int8)
        return codes, scale.to(base.dtype).to(base.device)

    def _holds_int8(self, codes: torch.Tensor) -> bool:
        """Whether ``codes`` are plain int8 codes (W8, or a W4 layer's merged patch), not packed int4."""
        return self.weight_bits == 8 or codes.shape[-1] == self.reduce_dim

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._sync_scale(deep=True)  # never save restored codes with a grown scale
        super()._save_to_state_dict(destination, prefix, keep_vars)

    @property
    def has_merged_patch(self) -> bool:
        """Whether the stored codes are a merged weight patch (set_weight) that has not been restored yet.

        An in-place restore (ComfyUI ``copy_to_param``) leaves no version trace; it is noticed by the
        checksum check at the first call of the next weights epoch.
        """
        merged = self._merged
        return merged is not None and merged[0] is self.weight and _version(merged[0]) == merged[1]

    def calibrated_weight_scale(self) -> torch.Tensor:
        return self._calibrated_scale if self._calibrated_scale is not None else self.weight_scale

    def merge_scale(self, weight: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """W8: ``base``, or a copy with larger entries for the rows of ``weight`` that exceed its range."""
        w2d = weight.detach().to(torch.float32).reshape(base.shape[0], -1)
        base_f = base.to(w2d.device, torch.float32)
        need = w2d.abs().amax(1) / formats.INT8_QMAX
        grow = need > base_f * (1 + self.GROW_TOLERANCE)
        if not bool(grow.any()):
            return base
        return torch.where(grow, need, base_f).to(base.dtype).to(base.device)

    @staticmethod
    def _checksum(codes: torch.Tensor) -> int:
        return int(codes.detach().reshape(-1).to(torch.int64).sum()) ^ int(codes.detach().reshape(-1)[::97].to(torch.int64).sum()) << 20

    def _restore_calibrated_scale(self) -> None:
        if self._calibrated_scale is not None:
            self._buffers["weight_scale"] = self._calibrated_scale
        self._calibrated_scale = None
        self._scale_owner = None

    def _sync_scale(self, deep: bool = False) -> None:
        """Drop a grown scale once its codes are gone (ComfyUI restored the backup). ``deep`` also
        catches an in-place restore (``.data.copy_`` leaves no version trace) by checksum."""
        owner = self._scale_owner
        if owner is None:
            return
        if owner[0] is not self.weight or _version(owner[0]) != owner[1] or (
                deep and self._checksum(self.weight) != owner[2]):
            self._restore_calibrated_scale()

    def dequantize_codes(self, codes: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 weight (layer shape) for codes in this layer's storage format (given in any dtype)."""
        codes = codes.detach()
        int8 = self._holds_int8(codes)
        dtype = torch.int8 if int8 else torch.uint8
        if codes.dtype != dtype:
            codes = codes.round().to(dtype) if codes.is_floating_point() else codes.to(dtype)
        scale = (self.weight_scale if scale is None else scale).to(codes.device, torch.float32).unsqueeze(1)
        if int8:
            w8 = codes.reshape(codes.shape[0], -1)
        else:
            w8 = formats.int4_to_int8(codes, self.weight_group_scale.to(codes.device), self.reduce_dim)
        return (w8.to(torch.float32) * scale).view(self.weight_shape)

    def requantize_codes(self, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """Codes for a float weight of this layer's shape with the given (default: current) channel
        scales and the fixed group scales; out-of-range values saturate."""
        w2d = weight.detach().to(torch.float32).reshape(self.weight_scale.shape[0], -1)
        scale = (self.weight_scale if scale is None else scale).to(w2d.device, torch.float32).unsqueeze(1)
        if self.weight_bits == 8:
            codes = torch.round(w2d / scale).clamp_(-formats.INT8_QMAX, formats.INT8_QMAX).to(torch.int8)
            return codes.view(self.weight.shape)
        rows, n_groups = self.weight_group_scale.shape
        k_pad = n_groups * self.group_size
        if k_pad != w2d.shape[1]:
            w2d = F.pad(w2d, (0, k_pad - w2d.shape[1]))
        step = scale.unsqueeze(2) * self.weight_group_scale.to(w2d.device, torch.float32).unsqueeze(2)
        q4 = torch.round(w2d.view(rows, n_groups, self.group_size) / step)
        q4 = q4.clamp_(formats.INT4_QMIN, formats.INT4_QMAX).to(torch.int8).view(rows, k_pad)
        return formats.pack_int4(q4, self.group_size)

    def _cached(self, name: str, key: tuple, build):
        """Runtime data derived from buffers (unpacked int8, prepacked oneDNN weight).

        Keyed on the identity and version of the codes and scale tensors, so that replacing them
        (a LoRA merge or its unpatch) or a later ``copy_`` / ``load_state_dict`` invalidates it.
        """
        key = key + (_version(self.weight), _version(self.weight_scale))
        hit = self._derived.get(name)
        # Identity, not data_ptr: a freed patched tensor's address can be reused by the next patch.
        if hit is not None and hit[0] == key and hit[1] is self.weight and hit[2] is self.weight_scale:
            return hit[3]
        value = build()
        self._derived[name] = (key, self.weight, self.weight_scale, value)
        return value

    def int8_weight_2d(self) -> torch.Tensor:
        """Exact int8 weight (N, K) that the GEMM uses."""
        if self.weight_bits == 8 or self.weight.dtype == torch.int8:  # W8, or a W4 layer's merged patch
            return self.weight.view(self.weight.shape[0], -1)

        def unpack():
            return formats.int4_to_int8(self.weight, self.weight_group_scale, self.reduce_dim)
        if self.keep_unpacked:
            return self._cached("int8", (_version(self.weight_group_scale),), unpack)
        return unpack()

    def dequantize_weight(self) -> torch.Tensor:
        """The float32 weight this layer represents, in the original layer's shape."""
        w8 = self.int8_weight_2d().to(torch.float32)
        return (w8 * self.weight_scale.float().unsqueeze(1)).view(self.weight_shape)

    # ---------------------------------------------------------------- activations

    @property
    def is_dynamic(self) -> bool:
        return self.act_scale.numel() == 0

    def current_act_scale(self) -> torch.Tensor:
        return self.act_scale[self.context.group].to(torch.float32)

    def set_act_scales(self, scales) -> None:
        scales = torch.as_tensor(scales, dtype=torch.float32).reshape(-1)
        if scales.numel() != self.act_scale.numel():
            raise ValueError(f"expected {self.act_scale.numel()} activation scales, got {scales.numel()}")
        if not bool(torch.isfinite(scales).all()) or bool((scales <= 0).any()):
            raise ValueError("activation scales must be finite and positive")
        self.act_scale.copy_(scales)

    def _float_tensors(self, device):
        """Scales and bias as float32 (a no-op unless someone cast the module to half)."""
        bias = None if self.bias is None else self.bias.to(device, torch.float32)
        return self.weight_scale.to(device, torch.float32), bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = self.context
        if self._range_epoch != ctx.weights_epoch:  # once per weights epoch (per load in ComfyUI)
            self._range_epoch = ctx.weights_epoch
            self.range_stats = {}
            self._derived = {}  # an in-place restore leaves no version trace: rebuild caches once
            self._sync_scale(deep=True)
            merged = self._merged
            if merged is not None and (merged[0] is not self.weight or self._checksum(self.weight) != merged[2]):
                self._merged = None
        elif self._scale_owner is not None:
            self._sync_scale()
        if ctx.check_ranges and ctx.group not in self.range_stats and not self.is_dynamic:
            self.range_stats[ctx.group] = measure_range(x, self.current_act_scale(), ctx.group)
            ctx.range_pending = True
        if self.weight_function or self.bias_function or self.weight.device != x.device:
            return self._forward_swapped(x)
        return self._run(x)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _patched_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Apply ComfyUI's run-time weight functions (low-VRAM LoRA patches, weight wrappers) to ``codes``."""
        for fn in self.weight_function:
            if hasattr(fn, "patches") and hasattr(fn, "convert_func"):
                codes = fn(codes)  # LowVramPatch: takes stored codes, calls our convert/set itself
            else:  # a plain weight wrapper expects and returns a float weight
                codes = self.requantize_codes(fn(self.dequantize_codes(codes)))
        return codes

    def _forward_swapped(self, x: torch.Tensor) -> torch.Tensor:
        """Run on temporary tensors: ComfyUI's low-VRAM mode can leave this layer in system RAM while
        activations are on the GPU, and can attach LoRA patches as run-time weight functions.

        The originals are put back afterwards, so offloading still saves memory, the stored codes
        stay the unpatched ones and no derived cache keeps a temporary copy alive.
        """
        saved_buffers, saved_params, saved_derived = dict(self._buffers), dict(self._parameters), self._derived
        try:
            for name, tensor in saved_buffers.items():
                if tensor is not None and tensor.device != x.device:
                    self._buffers[name] = tensor.to(x.device, non_blocking=True)
            self._returned_scale = None
            codes = self._patched_codes(self.weight.to(x.device, non_blocking=True))
            returned = self._returned_scale
            if returned is not None and returned[0] is codes:  # a low-VRAM patch grew some rows
                self._buffers["weight_scale"] = returned[1].to(x.device)
            self._returned_scale = None
            self._parameters["weight"] = nn.Parameter(codes, requires_grad=False)
            if self.bias is not None:
                bias = self.bias.to(x.device, non_blocking=True)
                for fn in self.bias_function:
                    bias = fn(bias)
                self._parameters["bias"] = nn.Parameter(bias.to(torch.float32), requires_grad=False)
            self._derived = {}
            return self._run(x)
        finally:
            self._buffers.update(saved_buffers)
            self._parameters.update(saved_params)
            self._derived = saved_derived

    def storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())


class QuantLinear(_QuantLayer):
    """Linear layer with int8 or grouped-int4 weights and int8 activations."""

    BACKENDS = ("int_mm", "float")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, weight_bits: int = 8,
                 group_size: int = 64, act_groups: int = 1, device=None) -> None:
        super().__init__(out_features, in_features, (out_features, in_features), weight_bits,
                         group_size, act_groups, bias, device)
        self.in_features = in_features
        self.out_features = out_features

    @classmethod
    def from_float(cls, linear: nn.Linear, weight_bits: int = 8, group_size: int = 64, act_scales=None,
                   weight_clip=None, per_tensor: bool = False) -> "QuantLinear":
        """Build from an ``nn.Linear`` (or subclass). ``act_scales=None`` means dynamic per-token."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"QuantLinear.from_float needs an nn.Linear, got {type(linear).__name__}")
        n_groups = 0 if act_scales is None else torch.as_tensor(act_scales).numel()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, weight_bits,
                    group_size, n_groups, device=linear.weight.device)
        layer.set_float_weight(linear.weight, weight_clip, per_tensor)
        if act_scales is not None:
            layer.set_act_scales(act_scales)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach().float())
        return layer

    def backend_for(self, device: torch.device) -> str:
        if self._backend_override:
            return self._backend_override
        backend = self._backend.get(device.type)
        if backend is None:
            backend = kernels.linear_backend(device, self.in_features, self.out_features)
            self._backend[device.type] = backend
            kernels.log_backend_once("linear", device, backend)
        return backend

    @property
    def backend(self) -> str:
        return self.backend_for(self.weight.device)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        backend = self.backend_for(x.device)
        x2d = x.reshape(-1, self.in_features)
        w8 = self.int8_weight_2d()
        w_scale, bias = self._float_tensors(x.device)
        if self.is_dynamic:
            qx, row_scale = kernels.quantize_dynamic_rows(x2d)
            out = kernels.rescale(kernels.int8_matmul(qx, w8, backend), w_scale, bias, row_scale)
        else:
            scale = self.current_act_scale()
            qx = kernels.quantize_static(x2d, scale)
            out = kernels.rescale(kernels.int8_matmul(qx, w8, backend), w_scale * scale, bias)
        return out.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def spec(self) -> dict:
        """Everything needed to rebuild an empty layer that ``load_state_dict`` can fill."""
        return {"kind": "linear", "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "weight_bits": self.weight_bits,
                "group_size": self.group_size or 64, "act_groups": self.act_scale.numel()}

    def extra_repr(self) -> str:
        mode = "dynamic" if self.is_dynamic else f"static x{self.act_scale.numel()} groups"
        fmt = "W8" if self.weight_bits == 8 else f"W4 g{self.group_size}"
        return f"in={self.in_features}, out={self.out_features}, {fmt}A8, act={mode}"


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


class QuantConv2d(_QuantLayer):
    """Conv2d (groups=1, zero padding) with int8 or grouped-int4 weights and int8 activations."""

    BACKENDS = ("onednn", "im2col", "float")

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 bias: bool = True, weight_bits: int = 8, group_size: int = 64, act_groups: int = 1,
                 device=None) -> None:
        kernel_size = _pair(kernel_size)
        shape = (out_channels, in_channels, *kernel_size)
        super().__init__(out_channels, in_channels * math.prod(kernel_size), shape, weight_bits,
                         group_size, act_groups, bias, device)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = kernel_size, _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        self._last_backend: str | None = None

    @classmethod
    def from_float(cls, conv: nn.Conv2d, weight_bits: int = 8, group_size: int = 64, act_scales=None,
                   weight_clip=None, per_tensor: bool = False) -> "QuantConv2d":
        """Build from an ``nn.Conv2d`` (or subclass). ``act_scales=None`` means dynamic per-tensor."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"QuantConv2d.from_float needs an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"grouped convolution (groups={conv.groups}) is not supported; keep it in float")
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"conv padding {conv.padding!r} / mode {conv.padding_mode!r} is not supported; "
                             "only explicit zero padding")
        n_groups = 0 if act_scales is None else torch.as_tensor(act_scales).numel()
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.bias is not None, weight_bits, group_size, n_groups,
                    device=conv.weight.device)
        layer.set_float_weight(conv.weight, weight_clip, per_tensor)
        if act_scales is not None:
            layer.set_act_scales(act_scales)
        if conv.bias is not None:
            layer.bias.copy_(conv.bias.detach().float())
        return layer

    def out_hw(self, height: int, width: int) -> tuple[int, int]:
        return (kernels.conv_out_size(height, self.kernel_size[0], self.stride[0], self.padding[0], self.dilation[0]),
                kernels.conv_out_size(width, self.kernel_size[1], self.stride[1], self.padding[1], self.dilation[1]))

    def backend_for(self, device: torch.device, out_pixels: int = 0) -> str:
        if self._backend_override:
            return self._backend_override
        key = (device.type, out_pixels if device.type == "cuda" else 0)
        backend = self._backend.get(key)
        if backend is None:
            backend = kernels.conv_backend(device, self.reduce_dim, self.out_channels, out_pixels)
            self._backend[key] = backend
            kernels.log_backend_once("conv", device, backend)
        return backend

    @property
    def backend(self) -> str:
        """The path of the last call (on CUDA it depends on the resolution), else the default choice."""
        return self._last_backend or self.backend_for(self.weight.device)

    def _int8_weight_4d(self) -> torch.Tensor:
        return self.int8_weight_2d().view(self.weight_shape)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        out_h, out_w = self.out_hw(height, width)
        backend = self._last_backend = self.backend_for(x.device, out_h * out_w)
        w_scale, bias = self._float_tensors(x.device)
        if self.is_dynamic:
            scale = x.detach().abs().amax().to(torch.float32).clamp_min(1e-8) / kernels.ACT_QMAX
        else:
            scale = self.current_act_scale()

        if backend == "onednn":
            packed = self._cached("onednn", (x.device.type,), lambda: kernels.onednn_prepack(
                self._int8_weight_4d(), w_scale, self.stride, self.padding, self.dilation))
            zeros = self._cached("zero_points", (x.device.type,),
                                 lambda: torch.zeros(self.out_channels, dtype=torch.int64))
            out = kernels.conv_onednn(x, float(scale), packed, w_scale, zeros, bias,
                                      self.stride, self.padding, self.dilation)
        elif backend == "im2col":
            qx = kernels.quantize_static(x, scale)
            acc = kernels.conv_im2col(qx, self.int8_weight_2d(), self.kernel_size, self.stride,
                                      self.padding, self.dilation, backend="int_mm")
            out = kernels.rescale(acc, w_scale * scale, bias)
            out = out.view(batch, out_h, out_w, self.out_channels).permute(0, 3, 1, 2)
        else:
            qx = kernels.quantize_static(x, scale).to(torch.float32)
            acc = F.conv2d(qx, self._int8_weight_4d().to(torch.float32), None,
                           self.stride, self.padding, self.dilation)
            out = acc.mul_((w_scale * scale).view(1, -1, 1, 1))
            if bias is not None:
                out = out.add_(bias.view(1, -1, 1, 1))
        return out.to(x.dtype)

    def spec(self) -> dict:
        return {"kind": "conv", "in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": list(self.padding), "dilation": list(self.dilation),
                "bias": self.bias is not None, "weight_bits": self.weight_bits,
                "group_size": self.group_size or 64, "act_groups": self.act_scale.numel()}

    def extra_repr(self) -> str:
        mode = "dynamic" if self.is_dynamic else f"static x{self.act_scale.numel()} groups"
        fmt = "W8" if self.weight_bits == 8 else f"W4 g{self.group_size}"
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, {fmt}A8, act={mode}")


def layer_from_spec(spec: dict, device=None) -> _QuantLayer:
    """Empty layer of the right shape for ``load_state_dict`` (artifact loading)."""
    spec = dict(spec)
    kind = spec.pop("kind")
    if kind == "linear":
        return QuantLinear(device=device, **spec)
    if kind == "conv":
        return QuantConv2d(device=device, **spec)
    raise ValueError(f"unknown layer kind {kind!r}")
