"""QuantResult: what calibration produces, applied to a live model or saved to one file.

Applying never touches the given model: ``apply`` returns a structural clone (weights shared) with
quantized layers and time-table lookups swapped in and a pre-hook that routes each UNet call's
timestep to its activation-scale group. Frameworks that patch modules themselves (ComfyUI object
patches) use ``replacements`` plus ``set_timesteps`` from their own model wrapper instead.

Weight patches (LoRA) after calibration: call ``weights_changed(patched=True)`` once after the
weights change (the ComfyUI glue does it on every load). Time lookups then re-verify their tables
and each static layer measures its input range once per timestep group; ``finish_call`` (after the
UNet call) logs a warning when a layer's input now falls far outside its calibrated range, and
records it in ``report["activation_range"]`` (shown by ``summary()``).
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

from .config import QuantConfig
from .adapters import detect_adapter
from .modeltree import clone_module_tree, fingerprint, fingerprints_match, set_submodule
from .modules import StepContext
from .timegroups import group_of, group_thresholds
from .timetables import TimeTableLookup, resolve_rows


log = logging.getLogger("fidelityquant")

# A layer input is "far outside" its calibrated range when the range limit cuts off more than this share
# of its energy. Calibration picks the range by output error, so the clipped share stays small: with a
# LoRA at strength 1 (25% of the weight norm on 18 layers) the largest was 0.31%; at strength 6 it was
# 25% in 6 layers (tests/test_comfyui_lora.py). 2% sits 6x above the first and 12x below the second.
CLIPPED_ENERGY_WARN = 0.02


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
        self._warned: set = set()

    # ---------------------------------------------------------------- runtime

    def set_timesteps(self, timesteps: torch.Tensor) -> None:
        """Call once per UNet call with its timesteps (model time t); picks the activation group."""
        t = timesteps.detach().reshape(-1)
        self.context.timesteps = t
        # The whole batch shares one group (samplers step the batch together); use the first t.
        self.context.group = group_of(float(t[0]), self.thresholds) if self.thresholds else 0
        self.context.time_rows = resolve_rows(self.time_keys, t) if self.time_tables else None

    def copy(self) -> "QuantResult":
        """The same result with its own layer objects (for a second, separate model object)."""
        import copy

        layers = {}
        for name, layer in self.layers.items():
            saved = (layer.weight_function, layer.bias_function, layer._derived)
            layer.weight_function, layer.bias_function, layer._derived = [], [], {}  # run-time state only
            try:
                layers[name] = copy.deepcopy(layer)
            finally:
                layer.weight_function, layer.bias_function, layer._derived = saved
        return QuantResult(self.family, self.variant, self.config, self.base_fingerprint, layers, self.group_keys,
                           self.time_keys, self.time_tables, self.plan, self.report)

    def merged_layers(self) -> list:
        """Layers whose codes currently hold a merged weight patch (e.g. a LoRA ComfyUI has not unpatched
        yet: it unpatches lazily). Saving now would save the merged weights."""
        return [name for name, layer in self.layers.items() if layer.has_merged_patch]

    def weights_changed(self, patched: bool = True) -> None:
        """The model's weights may have changed (call once per load, not per step).

        Time lookups re-verify their tables on their next call. With ``patched`` (weights differ from
        the calibrated ones, e.g. a LoRA), every static layer also re-measures its input range once
        per timestep group; ``finish_call`` reports what it finds.
        """
        self.context.weights_epoch += 1
        self.context.check_ranges = bool(patched)
        self.context.range_pending = False
        self._warned = set()

    def finish_call(self) -> None:
        """After each UNet call: reports range measurements taken during that call (no-op otherwise)."""
        if not self.context.range_pending:
            return
        self.context.range_pending = False
        self.report["activation_range"] = findings = self.range_findings()
        new = [name for name in findings["outside"] if name not in self._warned]
        if new:
            self._warned.update(new)
            log.warning("FidelityQuant: %s", self.range_message(findings))

    def range_findings(self) -> dict:
        """Per-layer worst input-range measurement of the current weights, and the layers far outside."""
        worst = {}
        for name, layer in self.layers.items():
            stats = max(layer.range_stats.values(), key=lambda s: s.clipped_energy, default=None)
            if stats is not None:
                worst[name] = stats.as_dict()
        outside = {name: s for name, s in worst.items() if s["clipped_energy"] > CLIPPED_ENERGY_WARN}
        return {"checked_layers": len(worst), "threshold": CLIPPED_ENERGY_WARN,
                "max_clipped_energy": max((s["clipped_energy"] for s in worst.values()), default=0.0),
                "outside": dict(sorted(outside.items(), key=lambda kv: -kv[1]["clipped_energy"]))}

    @staticmethod
    def range_message(findings: dict) -> str:
        outside = findings["outside"]
        shown = "; ".join(f"{name} (clips {s['clipped_energy']:.1%} of its input energy, max |x| "
                          f"{s['ratio']:.1f}x the range)" for name, s in list(outside.items())[:5])
        more = f" and {len(outside) - 5} more" if len(outside) > 5 else ""
        return (f"with the current weight patches (LoRA), {len(outside)} quantized layer(s) get inputs far outside "
                f"their calibrated activation range: {shown}{more}. The activation scales were calibrated "
                "without these patches, so quality may drop. Recommended: apply the LoRA before Calibrate & "
                "Quantize (checkpoint -> LoRA -> Calibrate & Quantize) so the ranges are calibrated with it, "
                "or lower the LoRA strength.")

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
                "Load it with the checkpoint it was made from, or calibrate this model. If a LoRA or another "
                "weight patch is applied before this node, apply it after the quantized model instead (or "
                "calibrate with it: the weights checked are the patched ones).")

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

        def finish(module, args, output):
            self.finish_call()
        model.register_forward_pre_hook(route, with_kwargs=True)
        model.register_forward_hook(finish)
        return model

    # ---------------------------------------------------------------- info

    def weight_bytes(self) -> int:
        return sum(layer.storage_bytes() - layer.act_scale.numel() * 4 for layer in self.layers.values())

    def summary(self) -> str:
        from .report import format_report
        text = format_report(self)
        findings = self.report.get("activation_range")
        if findings is not None:
            if findings["outside"]:
                text += "\nWARNING: " + self.range_message(findings)
            else:
                text += (f"\nweight patches: inputs of {findings['checked_layers']} layers checked, all within their "
                         f"calibrated ranges (largest clipped share {findings['max_clipped_energy']:.2%})")
        return text
