"""Activation-range check after a weight patch (LoRA): do the layers' inputs still fit their scales?

Merged weights keep the calibrated activation scales. After the weights change, each static layer
measures once per timestep group how much of its input falls outside its calibrated range (one
extra reduction on that call only, through a forward pre-hook that removes itself once every group
has been seen); the model's runtime turns the findings into a warning.
"""
from __future__ import annotations

import torch

from . import kernels

# A layer input is "far outside" its calibrated range when the range limit cuts off more than this share
# of its energy. Calibration picks the range by output error, so the clipped share stays small: with a
# LoRA at strength 1 (25% of the weight norm on 18 layers) the largest was 0.31%; at strength 6 it was
# 25% in 6 layers (tests/test_comfyui_lora.py). 2% sits 6x above the first and 12x below the second.
CLIPPED_ENERGY_WARN = 0.02


class RangeStats:
    """How a layer's input compares to its calibrated static range in one timestep group.

    ``clipped_energy``: ||x - clamp(x)||^2 / ||x||^2, the share of the input's energy cut off by the
    range limit; ``outside``: fraction of elements beyond it; ``ratio``: max |x| / range limit.
    """

    __slots__ = ("step_group", "clipped_energy", "outside", "ratio")

    def __init__(self, step_group: int, clipped_energy: float, outside: float, ratio: float) -> None:
        self.step_group, self.clipped_energy, self.outside, self.ratio = step_group, clipped_energy, outside, ratio

    def as_dict(self) -> dict:
        return {"group": self.step_group, "clipped_energy": self.clipped_energy, "outside": self.outside,
                "ratio": self.ratio}


def measure_range(x: torch.Tensor, scale: torch.Tensor, step_group: int) -> RangeStats:
    limit = float(scale) * kernels.ACT_QMAX
    a = x.detach().float().abs()
    total = float(a.pow(2).sum()) or 1.0
    over = (a - limit).clamp_min_(0)
    return RangeStats(step_group, float(over.pow(2).sum()) / total, float((over > 0).float().mean()),
                      float(a.amax()) / limit if limit > 0 else float("inf"))


class RangeMonitor:
    """Measures each static layer's input range once per timestep group while armed."""

    def __init__(self, layers: dict, context) -> None:
        self.layers, self.context = layers, context
        self.stats: dict = {}  # name -> {step group: RangeStats}
        self.pending = False   # a layer measured during the current call
        self._handles: dict = {}

    def arm(self) -> None:
        self.disarm()
        self.stats = {}
        for name, layer in self.layers.items():
            if not layer.is_dynamic:
                self._handles[name] = layer.register_forward_pre_hook(self._hook(name))

    def disarm(self) -> None:
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()
        self.pending = False

    def _hook(self, name: str):
        def hook(layer, args):
            group = self.context.step_group
            seen = self.stats.setdefault(name, {})
            if group not in seen:
                seen[group] = measure_range(args[0], layer.current_act_scale(), group)
                self.pending = True
                if len(seen) >= layer.act_scale.numel() and name in self._handles:
                    self._handles.pop(name).remove()  # every group seen: no per-call cost from now on
            return None
        return hook

    def findings(self) -> dict:
        """Per-layer worst measurement of the current weights, and the layers far outside their range."""
        worst = {}
        for name, per_group in self.stats.items():
            stats = max(per_group.values(), key=lambda s: s.clipped_energy, default=None)
            if stats is not None:
                worst[name] = stats.as_dict()
        outside = {name: s for name, s in worst.items() if s["clipped_energy"] > CLIPPED_ENERGY_WARN}
        return {"checked_layers": len(worst), "threshold": CLIPPED_ENERGY_WARN,
                "max_clipped_energy": max((s["clipped_energy"] for s in worst.values()), default=0.0),
                "outside": dict(sorted(outside.items(), key=lambda kv: -kv[1]["clipped_energy"]))}


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
