"""quantize(unet, runner, config) -> Calibration: the Serial-to-Parallel calibration pipeline.

The phases run in order, each returning new values (nothing built is mutated later):

1. Serial capture: ``runner(unet)`` samples the calibration prompts; hooks record each layer's inputs
   (and the time path's float outputs, for time precalculation).
2. Timestep groups from the captured per-step ranges.
3. Parallel fitting: every layer independently (weight clipping and rounding, activation scale per group),
   at every precision the plan may choose.
4. Mixed precision plan from measured sensitivity (optional).
5. Consistency pass: ``runner`` samples again with the *quantized* model; new activation scales are
   fitted on the inputs it really produces.
6. Evaluation: UNet-output error vs float per step along the quantized trajectory (optional).

``runner`` follows :class:`quant_core.models.runners.Runner`. ``progress(done, total)`` is called once per
UNet call across all sampling passes (and once per layer while fitting); raising from it cancels.
"""
from __future__ import annotations

import time
from dataclasses import replace

import torch
import torch.nn as nn

from ..calibration import Calibration, LayerState
from ..config import QuantConfig, preset
from ..models.adapters import UNetAdapter, detect_adapter
from ..models.modeltree import fingerprint
from ..runtime.layers import LAYER_KINDS
from . import capture as capture_mod
from .evaluate import evaluate_unet_error
from .fitting import fit_all, refit_act_scales
from .planner import FLOAT_BITS, average_bits, plan_precision, plan_random
from .timegroups import plan_groups


class PhasedProgress:
    """One progress bar across all serial passes."""

    def __init__(self, progress, calls_per_run: int, runs: int) -> None:
        self.progress, self.total = progress, calls_per_run * runs
        self.calls_per_run, self.offset = calls_per_run, 0

    def check_cancel(self) -> None:
        """Between serial passes (fitting): re-report the position so a raising callback can cancel."""
        if self.progress is not None:
            self.progress(min(self.offset, self.total), self.total)

    def phase(self):
        offset = self.offset
        self.offset += self.calls_per_run

        def report(done, _total):
            if self.progress is not None:
                self.progress(min(offset + done, self.total), self.total)
        return report


def layer_state(module: nn.Module, fit, cfg: QuantConfig) -> LayerState:
    """The calibrated layer for ``module``: its fitted weight value, activation scales and float bias."""
    kind = "conv" if isinstance(module, nn.Conv2d) else "linear"
    layer = LAYER_KINDS[kind].from_float(module, weight_bits=fit.weight_bits, group_size=cfg.group_size,
                                         act_scales=fit.act_scales, weight=fit.weight)
    return LayerState.of(layer)


def _capture(unet, layers, runner, adapter: UNetAdapter, cfg: QuantConfig, progress, seed: int, time_modules=None):
    return capture_mod.capture(unet, layers, runner, adapter.timesteps_from_call, int(getattr(runner, "steps", 50)),
                               cfg.memory_limit_mb * 2**20, progress, int(getattr(runner, "total_unet_calls", 0)),
                               seed, time_modules=time_modules)


def quantize(unet: nn.Module, runner, config: QuantConfig | str | None = None, progress=None) -> Calibration:
    """Calibrate and quantize ``unet``. The given model is never modified."""
    cfg = preset(config) if isinstance(config, str) else (config or preset("W8A8"))
    adapter = detect_adapter(unet)
    base_layers = adapter.quantizable_layers(unet)
    layers = dict(base_layers)
    if not cfg.time_precalc:
        layers.update(adapter.time_path_linears(unet))
    runs = 1 + int(cfg.consistency_pass) + int(cfg.evaluate)
    phases = PhasedProgress(progress, int(getattr(runner, "total_unet_calls", 0)), runs)
    timings = {}

    # 1. serial capture on the float model's own trajectory
    start = time.perf_counter()
    time_modules = ({n: unet.get_submodule(n) for n in adapter.time_module_names(unet)}
                    if cfg.time_precalc else None)
    cap = _capture(unet, layers, runner, adapter, cfg, phases.phase(), cfg.seed, time_modules)
    timings["capture_s"] = time.perf_counter() - start

    # 2. timestep groups
    ranges = torch.tensor([[cap.layers[n].steps[k].amax if k in cap.layers[n].steps else 0.0
                            for k in cap.timesteps] for n in layers])
    step_groups = plan_groups(cap.timesteps, ranges, cfg.timestep_groups)

    # 3. parallel fit (+ 4. mixed precision plan)
    start = time.perf_counter()
    weights = {n: m.weight for n, m in layers.items()}
    bits_options = tuple(sorted({cfg.weight_bits, 8})) if cfg.mixed_precision else (cfg.weight_bits,)
    fits = fit_all(weights, cap.layers, step_groups, bits_options, cfg, phases.check_cancel)
    sizes = {n: w.numel() for n, w in weights.items()}
    if cfg.mixed_precision:
        errors = {n: {b: f.error for b, f in fits[n].items()} for n in fits}
        plan = (plan_precision(sizes, errors, cfg.weight_bits, cfg.bits_budget) if cfg.mixed_plan == "sensitivity"
                else plan_random(sizes, cfg.weight_bits, cfg.bits_budget, cfg.seed))
    else:
        plan = {n: cfg.weight_bits for n in layers}
    chosen = {n: fits[n][plan[n]] for n in layers if plan[n] != FLOAT_BITS}
    states = {n: layer_state(layers[n], fit, cfg) for n, fit in chosen.items()}
    timings["fit_s"] = time.perf_counter() - start

    report = {
        "family": adapter.layout, "variant": adapter.sd_version,
        "timesteps": cap.timesteps, "groups": step_groups,
        "capture_bytes": cap.bytes, "unet_calls_per_run": cap.unet_calls,
        "average_weight_bits": average_bits(plan, sizes),
        "layers": {n: {"bits": plan[n], "error": chosen[n].error if n in chosen else 0.0, "params": sizes[n],
                       "rounding": chosen[n].rounding if n in chosen else "nearest"} for n in layers},
        "timings": timings,
    }
    time_keys, time_tables = (cap.time_keys, cap.time_tables) if cfg.time_precalc else (None, {})
    # Drafts carry no report: the report is finished last and the returned calibration is never changed.
    calibration = Calibration(adapter.layout, adapter.sd_version, cfg, fingerprint(base_layers), states,
                              step_groups, time_keys, time_tables, plan)
    del cap  # the captured rows are no longer needed: free them before the next sampling pass

    # 5. consistency pass on the quantized model's own trajectory: new activation scales
    if cfg.consistency_pass and states:
        start = time.perf_counter()
        qmodel = calibration.runtime(adapter.timesteps_from_call).apply(unet)
        qcap = _capture(qmodel, {n: qmodel.get_submodule(n) for n in states}, runner, adapter, cfg,
                        phases.phase(), cfg.seed + 1)
        refit = refit_act_scales({n: weights[n] for n in states}, {n: fit.weight for n, fit in chosen.items()},
                                 qcap.layers, step_groups, cfg, phases.check_cancel)
        del qmodel, qcap
        for name, (_, error) in refit.items():
            report["layers"][name]["error_consistency"] = error
        timings["consistency_s"] = time.perf_counter() - start
        calibration = _with_act_scales(calibration, {n: scales for n, (scales, _) in refit.items()})

    # 6. model-level fidelity on the calibration prompts
    if cfg.evaluate:
        start = time.perf_counter()
        qmodel = calibration.runtime(adapter.timesteps_from_call).apply(unet)
        report["fidelity"] = evaluate_unet_error(unet, qmodel, runner, adapter.timesteps_from_call, phases.phase())
        timings["evaluate_s"] = time.perf_counter() - start
    return replace(calibration, report=report)


def _with_act_scales(calibration: Calibration, scales: dict) -> Calibration:
    return replace(calibration, layers={n: state.with_act_scales(scales[n]) if n in scales else state
                                        for n, state in calibration.layers.items()})
