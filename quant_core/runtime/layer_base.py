"""The quantized layers' shared part: weight storage, activation scales, backend bookkeeping, offloaded runs.

Storage (registered tensors, so ``state_dict()`` shows the real bytes). ``weight`` and ``bias`` are
frozen ``nn.Parameter``s because hosts load, move and weight-patch (LoRA) a module's parameters;
everything else is a buffer:

    weight              int8 codes (W8: the float weight's shape) or packed int4 (W4: uint8 (N, K/2))
    weight_group_scale  W4 only: uint8 (N, K/group_size), integer group scales in [1, 16]
    weight_scale        float32 (N,): per-output-channel scale
    act_scale           float32 (G,): static activation scale per timestep group; empty = dynamic
    bias                float32 (N,) or absent

A W4 layer may also hold plain int8 codes (N, K) in ``weight``: a merged weight patch is kept at
int8 rather than re-rounded on the int4 grid (``weight_patch.py``). The layers only compute: the
timestep group comes from a shared :class:`StepContext`; host protocols live in host glue.
QuantLinear and QuantConv2d are in ``layers.py``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import formats
from .context import StepContext, tensor_version
from .compat import is_compiling


class QuantLayer(nn.Module):
    """Weight storage, scales and backend bookkeeping shared by linear and conv layers."""

    BACKENDS: tuple = ()

    def __init__(self, out_features: int, reduce_dim: int, weight_shape: tuple, weight_bits: int,
                 group_size: int, act_groups: int, has_bias: bool, device=None) -> None:
        super().__init__()
        self.format = formats.format_for(weight_bits)
        self.weight_bits = weight_bits
        self.group_size = group_size if self.format.grouped else 0
        self.reduce_dim = reduce_dim  # K of the GEMM (in_features, or C*kh*kw for convs)
        self.weight_shape = tuple(weight_shape)
        layout = self.format.storage_layout(out_features, reduce_dim, group_size, self.weight_shape)
        self._format_tensors = tuple(layout)
        self._storage_shape = tuple(layout["weight"][0])
        for name, (shape, dtype) in layout.items():
            tensor = torch.empty(shape, dtype=dtype, device=device)
            if name == "weight":
                self.weight = nn.Parameter(tensor, requires_grad=False)
            else:
                self.register_buffer(name, tensor)
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32, device=device))
        self.register_buffer("act_scale", torch.empty(act_groups, dtype=torch.float32, device=device))
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=torch.float32, device=device), requires_grad=False)
                     if has_bias else None)
        self.context = StepContext()
        self.keep_unpacked = False  # W4: keep the exact int8 copy after first use (speed over memory)
        self._derived: dict = {}
        self._backend: dict = {}
        self._backend_override: str | None = None

    def use_backend(self, name: str | None) -> None:
        """Pin this layer to one backend (None restores automatic choice), e.g. to compare paths."""
        if name is not None and name not in self.BACKENDS:
            raise ValueError(f"{type(self).__name__} backends are {self.BACKENDS}, got {name!r}")
        self._backend_override = name

    # ---------------------------------------------------------------- weights

    def _format_of(self, codes: torch.Tensor):
        """The format of ``codes``: the calibrated one, or int8 (N, K) for a W4 layer's merged patch."""
        return self.format if tuple(codes.shape) == self._storage_shape else formats.Int8Weight

    def calibrated_grid(self, scale: torch.Tensor):
        """A value of the calibrated format on ``scale`` with the stored group scales (codes zero): its grid."""
        tensors = {name: getattr(self, name) for name in self._format_tensors}
        tensors["weight"] = torch.zeros(self._storage_shape, dtype=torch.int8, device=scale.device)
        return self.format.from_storage(tensors, scale, self.reduce_dim, self.group_size)

    def weight_value(self, codes: torch.Tensor | None = None, scale: torch.Tensor | None = None):
        """The format value of ``codes`` (default: the stored ones) on ``scale`` (default: the stored one).

        Codes given in another dtype (a host may pass a float copy) are converted back first.
        """
        codes = (self.weight if codes is None else codes).detach()
        scale = (self.weight_scale if scale is None else scale).to(codes.device, torch.float32)
        tensors = {name: getattr(self, name) for name in self._format_tensors}
        tensors["weight"] = codes
        return self._format_of(codes).from_storage(tensors, scale, self.reduce_dim, self.group_size)

    def storage_codes(self, value) -> torch.Tensor:
        """The ``weight`` tensor that holds a format value: the calibrated format's storage, or int8 (N, K)
        for a W4 layer's merged patch."""
        return value.storage(self.weight_shape if type(value) is self.format else value.codes.shape)["weight"]

    def store_weight(self, value) -> None:
        """Copy a value of this layer's calibrated format into the storage tensors."""
        if type(value) is not self.format:
            raise ValueError(f"a W{value.bits} value cannot be stored in a W{self.weight_bits} layer")
        with torch.no_grad():
            for name, tensor in value.storage(self.weight_shape).items():
                getattr(self, name).copy_(tensor)
            self.weight_scale.copy_(value.channel_scale)

    def set_float_weight(self, weight: torch.Tensor, clip=None, per_tensor: bool = False) -> None:
        """Quantize a float weight (the layer's natural shape) into this layer's storage."""
        w2d = weight.detach().reshape(weight.shape[0], -1)
        self.store_weight(formats.quantize_weight(w2d, self.weight_bits, self.group_size or 64, clip, per_tensor))

    def _cached(self, name: str, key: tuple, build):
        """Runtime data derived from the stored tensors (unpacked int8, prepacked oneDNN weight).

        Keyed on the identity and version of the codes and scale tensors, so that replacing them
        (a LoRA merge or its unpatch) or a later ``copy_`` / ``load_state_dict`` invalidates it.
        """
        hit = self._derived.get(name)
        if is_compiling():  # version counters are not traceable: identity (guards) only
            if hit is not None and hit[1] is self.weight and hit[2] is self.weight_scale:
                return hit[3]
            return build()
        key = key + tuple(tensor_version(getattr(self, n)) for n in self._format_tensors) + (
            tensor_version(self.weight_scale),)
        # Identity, not data_ptr: a freed patched tensor's address can be reused by the next patch.
        if hit is not None and hit[0] == key and hit[1] is self.weight and hit[2] is self.weight_scale:
            return hit[3]
        value = build()
        self._derived[name] = (key, self.weight, self.weight_scale, value)
        return value

    def _prepacked_ready(self, name: str) -> bool:
        """Whether runtime data ``name`` exists for the current codes and scale (read under torch.compile,
        where the prepack ops cannot run: they have no shape rules)."""
        hit = self._derived.get(name)
        return hit is not None and hit[1] is self.weight and hit[2] is self.weight_scale

    def prepare(self, device=None) -> str:
        """Resolve the backend and build the runtime data (prepacked weights) for ``device`` (default: where the
        weights are) now: once per load rather than in the first step, and before torch.compile traces the
        layer, so the graph keeps the int8 kernel. Returns the backend."""
        raise NotImplementedError

    def _compiling_backend(self, backend: str | None) -> str | None:
        """Under torch.compile: the backend resolved eagerly before, else the float path (the choice measures
        and logs, which a graph cannot do; ``prepare()`` first avoids this). None when not compiling."""
        if not is_compiling():
            return None
        return self._backend_override or backend or "float"

    def int8_weight_2d(self) -> torch.Tensor:
        """Exact int8 weight (N, K) that the GEMM uses."""
        if self.weight.dtype == torch.int8:  # int8 storage (W8, or a W4 layer's merged patch)
            return self.weight.view(self.weight.shape[0], -1)

        def unpack():
            return self.format.storage_to_int8(self.weight, self._buffers, self.reduce_dim)
        if self.keep_unpacked:
            key = tuple(tensor_version(getattr(self, n)) for n in self._format_tensors if n != "weight")
            return self._cached("int8", key, unpack)
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
        if is_compiling():  # a tensor index: changing groups needs no recompile
            index = self.context.group_index.to(self.act_scale.device).view(1)
            return self.act_scale.index_select(0, index).view(()).to(torch.float32)
        return self.act_scale[self.context.step_group].to(torch.float32)

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

    # ---------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.device != x.device:
            return self._forward_on_copies(x)
        return self._run(x)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def patch_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Per-call weight patches of a host (none here); see ``_forward_on_copies``."""
        return codes

    def patch_bias(self, bias: torch.Tensor) -> torch.Tensor:
        return bias

    def _forward_on_copies(self, x: torch.Tensor) -> torch.Tensor:
        """Run on temporary tensors on ``x``'s device: an offloading host can leave this layer in system
        RAM while activations are on the GPU, and may attach per-call weight patches.

        The originals are put back afterwards, so offloading still saves memory, the stored codes stay
        the unpatched ones and no derived cache keeps a temporary copy alive.
        """
        saved_buffers, saved_params, saved_derived = dict(self._buffers), dict(self._parameters), self._derived
        try:
            for name, tensor in saved_buffers.items():
                if tensor is not None and tensor.device != x.device:
                    self._buffers[name] = tensor.to(x.device, non_blocking=True)
            codes = self.patch_codes(self.weight.to(x.device, non_blocking=True))
            self._parameters["weight"] = nn.Parameter(codes, requires_grad=False)
            if self.bias is not None:
                bias = self.patch_bias(self.bias.to(x.device, non_blocking=True))
                self._parameters["bias"] = nn.Parameter(bias.to(torch.float32), requires_grad=False)
            self._derived = {}
            return self._run(x)
        finally:
            self._buffers.update(saved_buffers)
            self._parameters.update(saved_params)
            self._derived = saved_derived

    def storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def _format_repr(self) -> str:
        mode = "dynamic" if self.is_dynamic else f"static x{self.act_scale.numel()} groups"
        fmt = f"W{self.weight_bits}" + (f" g{self.group_size}" if self.group_size else "")
        return f"{fmt}A8, act={mode}"

    def _common_spec(self) -> dict:
        return {"bias": self.bias is not None, "weight_bits": self.weight_bits,
                "group_size": self.group_size or 64, "act_groups": self.act_scale.numel()}
