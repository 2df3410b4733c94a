"""QuantizedModel: the runtime of one calibration on one model object.

It alone owns the step context and the per-call routing: the layers built from a calibration share
one :class:`StepContext`, and the runtime sets it once per UNet call from the call's timesteps
(timestep group for the activation scales, rows of the time tables). ``apply`` returns a structural
clone of the float UNet (weights shared) with the quantized layers and time lookups swapped in and
hooks that do the routing; hosts that swap modules themselves (ComfyUI object patches) use
``replacements`` plus ``set_timesteps`` / ``finish_call`` from their own model wrapper.

Weight patches (LoRA) after calibration: call ``weights_changed(patched=True)`` once after the weights
change (the ComfyUI glue does it on every load). Time lookups then re-verify their tables and each
static layer measures its input range once per timestep group (``range_check.py``); ``finish_call``
logs a warning when a layer's input now falls far outside its calibrated range and records it in
``report["activation_range"]`` (this runtime's copy of the calibration report).
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

from ..models.modeltree import clone_module_tree, set_submodule
from . import kernels
from .context import StepContext, group_of, group_thresholds
from .denormals import FlushDenormals
from .range_check import RangeMonitor, range_message
from .timetables import TimeTableLookup, resolve_rows

log = logging.getLogger("fidelityquant")


class QuantizedModel:
    """Quantized layers + time tables of one calibration, with their routing state."""

    def __init__(self, layers: dict, step_groups: list, time_keys: torch.Tensor | None = None,
                 time_tables: dict | None = None, report: dict | None = None, timesteps_from_call=None,
                 describe=None) -> None:
        self.layers = layers              # name -> QuantLinear / QuantConv2d
        self.step_groups = step_groups    # list of lists of timestep keys, descending t
        self.thresholds = group_thresholds(step_groups)
        self.time_keys = time_keys        # sorted timesteps of the time tables (or None)
        self.time_tables = time_tables or {}
        self.report = dict(report or {})  # this runtime's copy: range findings are added here
        self.timesteps_from_call = timesteps_from_call
        self._describe = describe  # -> the calibration's report text (summary())
        self.context = StepContext()
        for layer in layers.values():
            layer.context = self.context
        self.ranges = RangeMonitor(layers, self.context)
        self._warned: set = set()
        # Denormals flushed on the CPU threads that run a call (begin_call .. end_call), then restored.
        self.flush_denormals = True
        self._flush = FlushDenormals()

    # ---------------------------------------------------------------- per call

    def set_timesteps(self, timesteps: torch.Tensor) -> None:
        """Call once per UNet call with its timesteps (model time t); picks the activation group."""
        t = timesteps.detach().reshape(-1)
        self.context.timesteps = t
        # The whole batch shares one group (samplers step the batch together); use the first t.
        self.context.step_group = group_of(float(t[0]), self.thresholds) if self.thresholds else 0
        self.context.time_rows = resolve_rows(self.time_keys, t) if self.time_tables else None

    def begin_call(self, timesteps: torch.Tensor, sample=None) -> None:
        """Start of a UNet call: routing (``set_timesteps``) and, on CPU, denormals flushed on this thread and
        its intra-op pool until ``end_call`` (which a host must reach also when the call raises)."""
        self.set_timesteps(timesteps)
        device = sample.device if isinstance(sample, torch.Tensor) else timesteps.device
        if self.flush_denormals and device.type == "cpu":
            self._flush.enter()

    def end_call(self) -> None:
        """End of a UNet call: the range report (``finish_call``) and the threads' denormal flags restored."""
        try:
            self.finish_call()
        finally:
            self._flush.exit()

    def finish_call(self) -> None:
        """After each UNet call: reports range measurements taken during that call (no-op otherwise)."""
        if not self.ranges.pending:
            return
        self.ranges.pending = False
        self.report["activation_range"] = findings = self.ranges.findings()
        new = [name for name in findings["outside"] if name not in self._warned]
        if new:
            self._warned.update(new)
            log.warning("FidelityQuant: %s", range_message(findings))

    # ---------------------------------------------------------------- weight patches

    def weights_changed(self, patched: bool = True) -> None:
        """The model's weights may have changed (call once per load, not per step).

        Time lookups and host glue re-verify on their next call. With ``patched`` (weights differ from the
        calibrated ones, e.g. a LoRA), every static layer also re-measures its input range once per group.
        """
        self.context.weights_epoch += 1
        self._warned = set()
        if patched:
            self.ranges.arm()
        else:
            self.ranges.disarm()

    def prepare(self, device=None) -> None:
        """Choose each layer's kernel and prepack its weights now (for ``device``; default where each layer's
        weights are). Hosts call it once per load, after weight patches: the first step then costs no more
        than the others, and torch.compile sees prepacked weights (it cannot prepack inside a graph)."""
        for layer in self.layers.values():
            layer.prepare(device)

    def merged_layers(self) -> list:
        """Layers whose codes currently hold a merged weight patch (e.g. a LoRA a host has not unpatched yet)."""
        return [name for name, layer in self.layers.items() if getattr(layer, "has_merged_patch", False)]

    # ---------------------------------------------------------------- models

    def replacements(self, unet: nn.Module) -> dict:
        """Modules to swap in, by dotted name relative to the UNet. Time lookups wrap ``unet``'s own modules."""
        modules = dict(self.layers)
        for name, table in self.time_tables.items():
            modules[name] = TimeTableLookup(unet.get_submodule(name), table, self.context)
        return modules

    def apply(self, unet: nn.Module) -> nn.Module:
        """A quantized model: a clone of ``unet`` (sharing its float weights), ``unet`` itself untouched."""
        if self.timesteps_from_call is None:
            raise ValueError("this runtime was built without the model's timestep reader; use Calibration.apply")
        model = clone_module_tree(unet)
        for name, module in self.replacements(unet).items():
            set_submodule(model, name, module)
        self.prepare()

        def route(module, args, kwargs):
            sample = args[0] if args else next((kwargs[k] for k in ("x", "sample") if k in kwargs), None)
            self.begin_call(self.timesteps_from_call(args, kwargs), sample)

        def finish(module, args, output):
            self.end_call()
        model.register_forward_pre_hook(route, with_kwargs=True)
        try:
            model.register_forward_hook(finish, always_call=True)  # also when the call raises
        except TypeError:  # torch < 2.1: a raising call is made good by the next call's end_call
            model.register_forward_hook(finish)
        return model

    def weight_bytes(self) -> int:
        return sum(layer.storage_bytes() - layer.act_scale.numel() * 4 for layer in self.layers.values())

    def summary(self) -> str:
        """The calibration's report, plus what the range check found after a weight patch."""
        text = self._describe() if self._describe else ""
        return text + ("\n" if text else "") + self.kernel_summary() + self.range_summary()

    def kernel_summary(self, device=None) -> str:
        """One report line: the kernel each layer kind runs on ``device`` (default: where its weights are; a
        host that moves the model at sampling passes its load device), and why the CPU linear kernel was
        chosen (once per process, ``kernels.cpu_linear_choice``). CUDA convs also depend on the resolution."""
        counts: dict = {}
        for layer in self.layers.values():
            where = torch.device(device) if device is not None else layer.weight.device
            key = (where.type, "conv" if hasattr(layer, "kernel_size") else "linear", layer.backend_for(where))
            counts[key] = counts.get(key, 0) + 1
        parts = [f"{kind} {backend} x{n} ({device})" for (device, kind, backend), n in sorted(counts.items())]
        line = "kernels: " + ", ".join(parts)
        if any(device == "cpu" and kind == "linear" and backend != "float" for device, kind, backend in counts):
            line += f"; CPU linear choice: {kernels.cpu_linear_choice()[1]}"
        return line

    def range_summary(self) -> str:
        """The range check's finding after a weight patch, as report lines ('' when none ran)."""
        findings = self.report.get("activation_range")
        if findings is None:
            return ""
        if findings["outside"]:
            return "\nWARNING: " + range_message(findings)
        return (f"\nweight patches: inputs of {findings['checked_layers']} layers checked, all within their "
                f"calibrated ranges (largest clipped share {findings['max_clipped_energy']:.2%})")
