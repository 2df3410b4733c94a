"""Quantization config: presets plus a switch for every technique, so benchmarks can ablate them."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class QuantConfig:
    weight_bits: int = 8              # 8 (W8A8) or 4 (W4A8, grouped int4)
    group_size: int = 64              # int4 group size along K: 32, 64 or 128
    timestep_groups: int = 4          # G activation-scale groups over t; 1 = one scale for all steps
    consistency_pass: bool = True     # refit activation scales on the quantized model's own trajectory
    time_precalc: bool = True         # time MLP + ResBlock time projections: float tables, never quantized
    mixed_precision: bool = False     # promote sensitive layers to W8 / float within bits_budget
    bits_budget: float = 4.5          # average weight bits over quantizable layers (mixed precision)
    mixed_plan: str = "sensitivity"   # "sensitivity": by measured error; "random": same budget, random layers (ablation)
    weight_clip_search: bool = True   # per-output-channel weight clipping chosen by output error
    act_clip_search: bool = True      # activation clipping per timestep group chosen by output error
    weight_per_tensor: bool = False   # naive baseline: one weight range per tensor
    weight_rounding: str = "gptq"     # "gptq": error-compensating rounding on captured inputs; "nearest": RTN
    memory_limit_mb: int = 256        # capture reservoir budget
    gram_block: int = 1024            # error-compensated rounding: input Gram matrices kept block-diagonal,
                                      # blocks of at most this many inputs (calibrate/gram.py)
    gram_memory_mb: int = 8192        # Gram matrices held at once; more layers -> more capture passes
    gram_cost: float = 0.5            # Gram update per call ~ this x the layer's own FLOPs (rows subsampled)
    gptq_min_rows: float = 0.0        # rows per Gram-block input below which a layer rounds to nearest
                                      # instead (0: always error-compensated, with damping)
    fit_rows: int = 2048              # rows per layer and group for the clip / scale searches (subsampled,
                                      # seeded); error-compensated rounding uses the Gram matrices instead
    workers: int = 2                  # threads for parallel per-layer fitting
    evaluate: bool = True             # measure UNet-output error vs float per step: inside the consistency
                                      # pass when there is one (before its refit), else in a pass of its own
    seed: int = 0

    def __post_init__(self) -> None:
        if self.weight_bits not in (4, 8):
            raise ValueError(f"weight_bits must be 4 or 8, got {self.weight_bits}")
        if self.group_size not in (32, 64, 128):
            raise ValueError(f"group_size must be 32, 64 or 128, got {self.group_size}")
        if self.mixed_plan not in ("sensitivity", "random"):
            raise ValueError(f"mixed_plan must be 'sensitivity' or 'random', got {self.mixed_plan!r}")
        if self.weight_rounding not in ("gptq", "nearest"):
            raise ValueError(f"weight_rounding must be 'gptq' or 'nearest', got {self.weight_rounding!r}")
        if self.timestep_groups < 1:
            raise ValueError("timestep_groups must be at least 1")
        if self.gram_block < 16 or self.gram_memory_mb <= 0 or self.gram_cost <= 0 or self.gptq_min_rows < 0:
            raise ValueError("gram_block must be >= 16 and gram_memory_mb, gram_cost positive, gptq_min_rows >= 0 "
                             f"(got {self.gram_block}, {self.gram_memory_mb}, {self.gram_cost}, {self.gptq_min_rows})")
        if self.mixed_precision and not (self.weight_bits < self.bits_budget <= 16):
            raise ValueError(f"bits_budget {self.bits_budget} must lie in ({self.weight_bits}, 16]")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "QuantConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


_NAIVE = dict(timestep_groups=1, consistency_pass=False, time_precalc=False, weight_clip_search=False,
              act_clip_search=False, weight_per_tensor=True, weight_rounding="nearest")
PRESETS = {
    "W8A8": dict(weight_bits=8),
    "W4A8": dict(weight_bits=4),
    "W4A8-mixed": dict(weight_bits=4, mixed_precision=True, bits_budget=4.5),
    # Baselines for benchmarks (configs, not separate code):
    "naive-W8A8": dict(weight_bits=8, **_NAIVE),
    "naive-W4A8": dict(weight_bits=4, **_NAIVE),
    # Q-Diffusion style: FP-trajectory calibration over all steps, per-channel weights with clipping
    # search, one activation scale for all timesteps, no consistency pass, no precalc.
    # (Q-Diffusion itself learns the rounding with BRECQ/AdaRound; this baseline rounds to nearest.)
    "qdiff-W4A8": dict(weight_bits=4, timestep_groups=1, consistency_pass=False, time_precalc=False,
                       weight_rounding="nearest"),
}


def preset(name: str, **overrides) -> QuantConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return QuantConfig(**{**PRESETS[name], **overrides})
