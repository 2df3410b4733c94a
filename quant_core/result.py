"""QuantResult: what calibration produces, applied to a live model or saved to one file.

Applying never touches the given model: ``apply`` returns a structural clone (weights shared) with
quantized layers and time-table lookups swapped in and a pre-hook that routes each UNet call's
timestep to its activation-scale group. Frameworks that patch modules themselves (ComfyUI object
patches) use ``replacements`` plus ``set_timesteps`` from their own model wrapper instead.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .config import QuantConfig
from .adapters import detect_adapter
from .modeltree import clone_module_tree, fingerprint, fingerprints_match, set_submodule
from .modules import StepContext
from .timegroups import group_of, group_thresholds
from .timetables import TimeTableLookup, resolve_rows


class IncompatibleModelError(ValueError):
    """A quantization result was applied to a model it was not made for."""


class QuantResult:
    def __init__(self, family: str, variant: str, config: QuantConfig, base_fingerprint: dict,
                 layers: dict, group_keys: list, time_keys: torch.Tensor | None, time_tables: dict,
                 plan: dict, report: dict) -> None:
        self.family, self.variant = family, variant
        self.config = config
        self.base_fingerprint = base_fingerprint
        self.layers = layers              # name -> QuantLinear / QuantConv2d
        self.group_keys = group_keys      # list of lists of timestep keys, descending t
        self.thresholds = group_thresholds(group_keys)
        self.time_keys = time_keys        # sorted timesteps of the time tables (or None)
        self.time_tables = time_tables    # name -> float32 (T, D)
        self.plan = plan                  # name -> bits (4, 8 or 16 = kept float)
        self.report = report
        self.context = StepContext()
        for layer in layers.values():
            layer.context = self.context

    # ---------------------------------------------------------------- runtime

    def set_timesteps(self, timesteps: torch.Tensor) -> None:
        """Call once per UNet call with its timesteps (model time t); picks the activation group."""
        t = timesteps.detach().reshape(-1)
        self.context.timesteps = t
        # The whole batch shares one group (samplers step the batch together); use the first t.
        self.context.group = group_of(float(t[0]), self.thresholds) if self.thresholds else 0
        self.context.time_rows = resolve_rows(self.time_keys, t) if self.time_tables else None

    def check_compatible(self, unet: nn.Module) -> None:
        adapter = detect_adapter(unet)
        if (adapter.family, adapter.variant) != (self.family, self.variant):
            raise IncompatibleModelError(
                f"this FidelityQuant file is for a {self.variant} {self.family} UNet, but the model given is a "
                f"{adapter.variant} {adapter.family} UNet. Load it with the checkpoint it was calibrated on, "
                "or calibrate this model.")
        found = fingerprint(adapter.quantizable_layers(unet))
        if not fingerprints_match(found, self.base_fingerprint):
            raise IncompatibleModelError(
                "this FidelityQuant file was calibrated on a different checkpoint (weight fingerprint "
                f"{self.base_fingerprint.get('fp16')} vs {found.get('fp16')} for the model given). "
                "Load it with the checkpoint it was made from, or calibrate this model.")

    def replacements(self, unet: nn.Module) -> dict:
        """Modules to swap in, by dotted name relative to the UNet. Time lookups wrap ``unet``'s own modules."""
        modules = dict(self.layers)
        for name, table in self.time_tables.items():
            modules[name] = TimeTableLookup(unet.get_submodule(name), table, self.context)
        return modules

    def apply(self, unet: nn.Module, check: bool = True) -> nn.Module:
        """A quantized model: a clone of ``unet`` (sharing its float weights), ``unet`` itself untouched."""
        if check:
            self.check_compatible(unet)
        adapter = detect_adapter(unet)
        model = clone_module_tree(unet)
        for name, module in self.replacements(unet).items():
            set_submodule(model, name, module)

        def route(module, args, kwargs):
            self.set_timesteps(adapter.timesteps_from_call(args, kwargs))
        model.register_forward_pre_hook(route, with_kwargs=True)
        return model

    # ---------------------------------------------------------------- info

    def weight_bytes(self) -> int:
        return sum(layer.storage_bytes() - layer.act_scale.numel() * 4 for layer in self.layers.values())

    def summary(self) -> str:
        from .report import format_report
        return format_report(self)
