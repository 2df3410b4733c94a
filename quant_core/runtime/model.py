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
from .context import StepContext, group_of, group_thresholds
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

    # ---------------------------------------------------------------- per call

    def set_timesteps(self, timesteps: torch.Tensor) -> None:
        """Call once per UNet call with its timesteps (model time t); picks the activation group."""
        t = timesteps.detach().reshape(-1)
        self.context.timesteps = t
        # The whole batch shares one group (samplers step the batch together); use the first t.
        self.context.step_group = group_of(float(t[0]), self.thresholds) if self.thresholds else 0
        self.context.time_rows = resolve_rows(self.time_keys, t) if self.time_tables else None

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

        def route(module, args, kwargs):
            self.set_timesteps(self.timesteps_from_call(args, kwargs))

        def finish(module, args, output):
            self.finish_call()
        model.register_forward_pre_hook(route, with_kwargs=True)
        model.register_forward_hook(finish)
        return model

    def weight_bytes(self) -> int:
        return sum(layer.storage_bytes() - layer.act_scale.numel() * 4 for layer in self.layers.values())

    def summary(self) -> str:
        """The calibration's report, plus what the range check found after a weight patch."""
        return (self._describe() if self._describe else "") + self.range_summary()

    def range_summary(self) -> str:
        """The range check's finding after a weight patch, as report lines ('' when none ran)."""
        findings = self.report.get("activation_range")
        if findings is None:
            return ""
        if findings["outside"]:
            return "\nWARNING: " + range_message(findings)
        return (f"\nweight patches: inputs of {findings['checked_layers']} layers checked, all within their "
                f"calibrated ranges (largest clipped share {findings['max_clipped_energy']:.2%})")
