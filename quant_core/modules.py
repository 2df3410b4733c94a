"""Quantized layers: QuantLinear and QuantConv2d (W8A8 and W4A8).

Storage (registered tensors, so ``state_dict()`` shows the real bytes). ``weight`` is a frozen
``nn.Parameter`` because ComfyUI only loads, moves and weight-patches (LoRA) modules that own
parameters; everything else is a buffer:

    weight              int8 codes (W8: the float weight's shape) or packed int4 (W4: uint8 (N, K/2))
    weight_group_scale  W4 only: uint8 (N, K/group_size), integer group scales in [1, 16]
    weight_scale        float32 (N,): per-output-channel scale
    act_scale           float32 (G,): static activation scale per timestep group; empty = dynamic
    bias                float32 (N,) or absent

The current timestep group comes from a :class:`StepContext` that all layers of one model share;
the model-level wrapper sets it once per UNet call.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import formats, kernels


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
            self.register_buffer("bias", torch.empty(out_features, dtype=torch.float32, device=device))
        else:
            self.bias = None
        self.context = StepContext()
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
    # patch, set_weight stores the result. Only the codes change: every scale stays as calibrated, so
    # restoring the backed-up `weight` tensor on unpatch restores the exact quantized layer.

    def convert_weight(self, weight: torch.Tensor, inplace: bool = False, **kwargs) -> torch.Tensor:
        """The float weight this layer represents (ComfyUI hands us a float copy of our stored codes)."""
        return self.dequantize_weight().to(weight.device)

    def set_weight(self, weight: torch.Tensor, inplace_update: bool = False, seed=None, return_weight: bool = False,
                   **kwargs):
        """Requantize a merged float weight onto this layer's existing scales."""
        codes = self.requantize_codes(weight)
        if return_weight:
            return codes
        if inplace_update:
            self.weight.data.copy_(codes)
        else:
            self.weight = nn.Parameter(codes, requires_grad=False)
        return None

    def requantize_codes(self, weight: torch.Tensor) -> torch.Tensor:
        """Codes for a float weight of this layer's shape with the current (fixed) scales; out-of-range values saturate."""
        w2d = weight.detach().to(self.weight_scale.device, torch.float32).reshape(self.weight_scale.shape[0], -1)
        scale = self.weight_scale.float().unsqueeze(1)
        if self.weight_bits == 8:
            codes = torch.round(w2d / scale).clamp_(-formats.INT8_QMAX, formats.INT8_QMAX).to(torch.int8)
            return codes.view(self.weight.shape)
        rows, n_groups = self.weight_group_scale.shape
        k_pad = n_groups * self.group_size
        if k_pad != w2d.shape[1]:
            w2d = F.pad(w2d, (0, k_pad - w2d.shape[1]))
        step = scale.unsqueeze(2) * self.weight_group_scale.float().unsqueeze(2)
        q4 = torch.round(w2d.view(rows, n_groups, self.group_size) / step)
        q4 = q4.clamp_(formats.INT4_QMIN, formats.INT4_QMAX).to(torch.int8).view(rows, k_pad)
        return formats.pack_int4(q4, self.group_size)

    def _cached(self, name: str, key: tuple, build):
        """Runtime data derived from buffers (unpacked int8, prepacked oneDNN weight).

        Keyed on the buffers' storage and version so that a later ``copy_`` or ``load_state_dict``
        (e.g. a LoRA merge) invalidates it.
        """
        key = key + (self.weight.data_ptr(), self.weight._version, self.weight_scale._version)
        hit = self._derived.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        value = build()
        self._derived[name] = (key, value)
        return value

    def int8_weight_2d(self) -> torch.Tensor:
        """Exact int8 weight (N, K) that the GEMM uses."""
        if self.weight_bits == 8:
            return self.weight.view(self.weight.shape[0], -1)

        def unpack():
            return formats.int4_to_int8(self.weight, self.weight_group_scale, self.reduce_dim)
        if self.keep_unpacked:
            return self._cached("int8", (self.weight_group_scale._version,), unpack)
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

    def _forward_on_other_device(self, x: torch.Tensor) -> torch.Tensor:
        """ComfyUI's low-VRAM mode can leave this layer in system RAM while activations are on the GPU.

        Run on temporary copies of the buffers and put the originals back, so offloading still
        saves memory and no derived cache keeps a copy alive.
        """
        saved_buffers, saved_params, saved_derived = dict(self._buffers), dict(self._parameters), self._derived
        try:
            for name, tensor in saved_buffers.items():
                if tensor is not None:
                    self._buffers[name] = tensor.to(x.device, non_blocking=True)
            for name, param in saved_params.items():
                if param is not None:
                    self._parameters[name] = nn.Parameter(param.to(x.device, non_blocking=True), requires_grad=False)
            self._derived = {}
            return self.forward(x)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.device != x.device:
            return self._forward_on_other_device(x)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.device != x.device:
            return self._forward_on_other_device(x)
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
