"""Quantized layers: QuantLinear and QuantConv2d (W8A8 and W4A8), on the shared storage of ``layer_base.py``."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels, onednn_ops
from ..models.adapters import is_linear
from .layer_base import QuantLayer
from .compat import is_compiling


def _act_groups(act_scales) -> int:
    return 0 if act_scales is None else torch.as_tensor(act_scales).numel()


def _fill_from_float(layer: QuantLayer, module: nn.Module, act_scales, weight_clip, per_tensor, weight) -> QuantLayer:
    if weight is not None:
        layer.store_weight(weight)
    else:
        layer.set_float_weight(module.weight, weight_clip, per_tensor)
    if act_scales is not None:
        layer.set_act_scales(act_scales)
    if module.bias is not None:
        layer.bias.data.copy_(module.bias.detach().float())
    return layer


class QuantLinear(QuantLayer):
    """Linear layer with int8 or grouped-int4 weights and int8 activations."""

    BACKENDS = ("onednn", "int_mm", "float")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, weight_bits: int = 8,
                 group_size: int = 64, act_groups: int = 1, device=None) -> None:
        super().__init__(out_features, in_features, (out_features, in_features), weight_bits,
                         group_size, act_groups, bias, device)
        self.in_features = in_features
        self.out_features = out_features

    @classmethod
    def from_float(cls, linear: nn.Linear, weight_bits: int = 8, group_size: int = 64, act_scales=None,
                   weight_clip=None, per_tensor: bool = False, weight=None) -> "QuantLinear":
        """Build from an ``nn.Linear`` (or subclass). ``act_scales=None`` means dynamic per-token;
        ``weight``: an already quantized weight value (e.g. fitted) instead of quantizing the float one."""
        if not is_linear(linear):
            raise TypeError(f"QuantLinear.from_float needs an nn.Linear, got {type(linear).__name__}")
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, weight_bits,
                    group_size, _act_groups(act_scales), device=linear.weight.device)
        return _fill_from_float(layer, linear, act_scales, weight_clip, per_tensor, weight)

    def backend_for(self, device: torch.device) -> str:
        if self._backend_override:
            return self._backend_override
        backend = self._backend.get(device.type)
        compiling = self._compiling_backend(backend)
        if compiling is not None:
            return compiling
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
        if backend == "onednn" and is_compiling() and not self._prepacked_ready("onednn"):
            backend = "float"  # not prepared: a graph cannot prepack (see prepare)
        x2d = x.reshape(-1, self.in_features)
        w_scale, bias = self._float_tensors(x.device)
        if backend == "onednn":
            out = self._run_onednn(x2d, w_scale, bias)
            return out.view(*x.shape[:-1], self.out_features).to(x.dtype)
        w8 = self.int8_weight_2d()
        if self.is_dynamic:
            qx, row_scale = kernels.quantize_dynamic_rows(x2d)
            out = kernels.rescale(kernels.int8_matmul(qx, w8, backend), w_scale, bias, row_scale)
        else:
            scale = self.current_act_scale()
            qx = kernels.quantize_static(x2d, scale)
            out = kernels.rescale(kernels.int8_matmul(qx, w8, backend), w_scale * scale, bias)
        return out.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def prepare(self, device=None) -> str:
        device = torch.device(device) if device is not None else self.weight.device
        backend = self.backend_for(device)
        if backend == "onednn" and self.weight.device == device:
            self._packed(device)
        return backend

    def _packed(self, device: torch.device) -> tuple:
        # Prepacked once per weight (W4: from the unpacked codes, so W4 calls skip the unpack too).
        packed = self._cached("onednn", (device.type,), lambda: onednn_ops.prepack(self.int8_weight_2d()))
        zeros = self._cached("zero_points", (device.type,), lambda: torch.zeros(self.out_features, dtype=torch.int64))
        return packed, zeros

    def _run_onednn(self, x2d: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        packed, zeros = self._packed(x2d.device)
        if self.is_dynamic:  # per-row scales: the op's epilogue takes one activation scale, so apply them after
            qx, row_scale = kernels.quantize_dynamic_rows(x2d)
            out = onednn_ops.linear(qx, torch.ones((), dtype=torch.float32), packed, w_scale, zeros, None)
            out = out.mul_(row_scale)
            return out.add_(bias) if bias is not None else out
        scale = self.current_act_scale()
        return onednn_ops.linear(kernels.quantize_static(x2d, scale), scale, packed, w_scale, zeros, bias)

    def spec(self) -> dict:
        """Everything needed to rebuild an empty layer that ``load_state_dict`` can fill."""
        return {"kind": "linear", "in_features": self.in_features, "out_features": self.out_features,
                **self._common_spec()}

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self._format_repr()}"


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


class QuantConv2d(QuantLayer):
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
                   weight_clip=None, per_tensor: bool = False, weight=None) -> "QuantConv2d":
        """Build from an ``nn.Conv2d`` (or subclass). ``act_scales=None`` means dynamic per-tensor;
        ``weight`` as for :meth:`QuantLinear.from_float`."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"QuantConv2d.from_float needs an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"grouped convolution (groups={conv.groups}) is not supported; keep it in float")
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"conv padding {conv.padding!r} / mode {conv.padding_mode!r} is not supported; "
                             "only explicit zero padding")
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.bias is not None, weight_bits, group_size, _act_groups(act_scales),
                    device=conv.weight.device)
        return _fill_from_float(layer, conv, act_scales, weight_clip, per_tensor, weight)

    def out_hw(self, height: int, width: int) -> tuple[int, int]:
        return kernels.conv_out_hw(height, width, self.kernel_size, self.stride, self.padding, self.dilation)

    def backend_for(self, device: torch.device, out_pixels: int = 0) -> str:
        if self._backend_override:
            return self._backend_override
        key = (device.type, out_pixels if device.type == "cuda" else 0)
        backend = self._backend.get(key)
        compiling = self._compiling_backend(backend)
        if compiling is not None:
            return compiling
        if backend is None:
            backend = kernels.conv_backend(device, self.reduce_dim, self.out_channels, out_pixels)
            self._backend[key] = backend
            kernels.log_backend_once("conv", device, backend)
        return backend

    @property
    def backend(self) -> str:
        """The path of the last call (on CUDA it depends on the resolution), else the default choice."""
        return self._last_backend or self.backend_for(self.weight.device)

    def prepare(self, device=None) -> str:
        device = torch.device(device) if device is not None else self.weight.device
        backend = self.backend_for(device)
        if backend == "onednn" and self.weight.device == device:
            self._packed(device, self._float_tensors(device)[0])
        return backend

    def _packed(self, device: torch.device, w_scale: torch.Tensor) -> tuple:
        packed = self._cached("onednn", (device.type,), lambda: kernels.onednn_prepack(
            self._int8_weight_4d(), w_scale, self.stride, self.padding, self.dilation))
        zeros = self._cached("zero_points", (device.type,), lambda: torch.zeros(self.out_channels, dtype=torch.int64))
        return packed, zeros

    def _int8_weight_4d(self) -> torch.Tensor:
        return self.int8_weight_2d().view(self.weight_shape)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        out_h, out_w = self.out_hw(height, width)
        backend = self.backend_for(x.device, out_h * out_w)
        if backend == "onednn" and is_compiling() and not self._prepacked_ready("onednn"):
            backend = "float"  # not prepared: a graph cannot prepack (see prepare)
        self._last_backend = backend
        w_scale, bias = self._float_tensors(x.device)
        if self.is_dynamic:
            scale = x.detach().abs().amax().to(torch.float32).clamp_min(1e-8) / kernels.ACT_QMAX
        else:
            scale = self.current_act_scale()

        if backend == "onednn":
            packed, zeros = self._packed(x.device, w_scale)
            out = kernels.conv_onednn(x, scale, packed, w_scale, zeros, bias,
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
                "padding": list(self.padding), "dilation": list(self.dilation), **self._common_spec()}

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, {self._format_repr()}")


LAYER_KINDS = {"linear": QuantLinear, "conv": QuantConv2d}


def layer_from_spec(spec: dict, device=None, kinds: dict | None = None) -> QuantLayer:
    """Empty layer of the right shape for ``load_state_dict``; ``kinds`` lets host glue use its subclasses."""
    spec = dict(spec)
    kind = spec.pop("kind")
    classes = kinds or LAYER_KINDS
    if kind not in classes:
        raise ValueError(f"unknown layer kind {kind!r}")
    return classes[kind](device=device, **spec)
