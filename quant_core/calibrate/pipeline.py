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
6. Evaluation: UNet-output error vs float per step along the quantized trajectory (optional), measured
   inside the consistency pass (one float UNet call per quantized call), so a default calibration
   samples 3 times in all: capture, the quantized consistency pass, and the float calls beside it.

Error-compensated rounding needs each layer's input Gram matrix (``gram.py``). Those of all layers
usually fit ``cfg.gram_memory_mb`` and are accumulated during the capture; when not, the layers are
split into groups and each later group gets a Gram-only sampling pass, fitted and freed before the next.

``runner`` follows :class:`quant_core.models.runners.Runner`. ``progress(done, total)`` is called once per
UNet call across all sampling passes (and once per layer while fitting); raising from it cancels.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import replace

import torch
import torch.nn as nn

from ..calibration import Calibration, LayerState
from ..config import QuantConfig, preset
from ..models.adapters import UNetAdapter, detect_adapter
from ..models.modeltree import fingerprint
from ..runtime.layers import LAYER_KINDS
from . import capture as capture_mod
from . import gram
from .evaluate import UNetErrorMonitor, evaluate_unet_error
from .fitting import fit_all, refit_act_scales
from .host_memory import release_freed_memory
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


def _capture(unet, layers, runner, adapter: UNetAdapter, cfg: QuantConfig, progress, seed: int, time_modules=None,
             grams=None):
    return capture_mod.capture(unet, layers, runner, adapter.timesteps_from_call, int(getattr(runner, "steps", 50)),
                               cfg.memory_limit_mb * 2**20, progress, int(getattr(runner, "total_unet_calls", 0)),
                               seed, time_modules=time_modules, grams=grams, gram_cost=cfg.gram_cost)


def gram_passes(layers: dict, cfg: QuantConfig, device: torch.device) -> list[list[str]]:
    """Layers whose Gram matrices each capture pass accumulates (error-compensated rounding needs them).

    The budget is ``cfg.gram_memory_mb``, and at most half the memory the model's device has free now.
    """
    if cfg.weight_rounding != "gptq" or cfg.weight_per_tensor:
        return [[]]
    sizes = {n: gram.gram_bytes(capture_mod._reduce_dim(m), cfg.gram_block, _taps(m)) for n, m in layers.items()}
    return gram.plan_passes(sizes, gram.budget_bytes(cfg.gram_memory_mb, device))


def _taps(module: nn.Module) -> int:
    """Kernel taps per input channel: Gram blocks keep a channel's taps together."""
    return module.weight[0, 0].numel() if module.weight.dim() > 2 else 1


def _new_grams(names, layers: dict, cfg: QuantConfig) -> dict:
    return {n: gram.GramAccumulator(capture_mod._reduce_dim(layers[n]), cfg.gram_block, _taps(layers[n]))
            for n in names}


def quantize(unet: nn.Module, runner, config: QuantConfig | str | None = None, progress=None) -> Calibration:
    """Calibrate and quantize ``unet``. The given model is never modified."""
    cfg = preset(config) if isinstance(config, str) else (config or preset("W8A8"))
    adapter = detect_adapter(unet)
    base_layers = adapter.quantizable_layers(unet)
    layers = dict(base_layers)
    if not cfg.time_precalc:
        layers.update(adapter.time_path_linears(unet))
    passes = gram_passes(layers, cfg, next((m.weight.device for m in layers.values()), torch.device("cpu")))
    runs = len(passes) + int(cfg.consistency_pass) + int(cfg.evaluate and not cfg.consistency_pass)
    phases = PhasedProgress(progress, int(getattr(runner, "total_unet_calls", 0)), runs)
    timings = {"capture_s": 0.0, "fit_s": 0.0}
    sampling_passes = 0

    # 1. serial capture on the float model's own trajectory (+ the Gram matrices of the first pass's layers)
    start = time.perf_counter()
    time_modules = ({n: unet.get_submodule(n) for n in adapter.time_module_names(unet)}
                    if cfg.time_precalc else None)
    grams = _new_grams(passes[0], layers, cfg)
    cap = _capture(unet, layers, runner, adapter, cfg, phases.phase(), cfg.seed, time_modules, grams)
    timings["capture_s"] += time.perf_counter() - start
    sampling_passes += 1

    # 2. timestep groups
    ranges = torch.tensor([[cap.layers[n].steps[k].amax if k in cap.layers[n].steps else 0.0
                            for k in cap.timesteps] for n in layers])
    step_groups = plan_groups(cap.timesteps, ranges, cfg.timestep_groups)

    # 3. parallel fit, pass by pass: each later pass accumulates the next layers' Gram matrices
    weights = {n: m.weight for n, m in layers.items()}
    bits_options = tuple(sorted({cfg.weight_bits, 8})) if cfg.mixed_precision else (cfg.weight_bits,)
    fits = {}
    for index, names in enumerate(passes):
        if index:
            start = time.perf_counter()
            grams = _new_grams(names, layers, cfg)
            capture_mod.capture_grams(unet, {n: layers[n] for n in names}, grams, runner, adapter.timesteps_from_call,
                                      phases.phase(), int(getattr(runner, "total_unet_calls", 0)), cfg.seed + 2 + index,
                                      cfg.gram_cost)
            timings["capture_s"] += time.perf_counter() - start
            sampling_passes += 1
        start = time.perf_counter()
        todo = [n for n in layers if n in names or (index == 0 and not any(n in p for p in passes))]
        fits.update(fit_all({n: weights[n] for n in todo}, cap.layers, step_groups, bits_options, cfg,
                            phases.check_cancel, grams))
        del grams
        release_freed_memory()
        timings["fit_s"] += time.perf_counter() - start

    # 4. mixed precision plan
    sizes = {n: w.numel() for n, w in weights.items()}
    if cfg.mixed_precision:
        errors = {n: {b: f.error for b, f in fits[n].items()} for n in fits}
        plan = (plan_precision(sizes, errors, cfg.weight_bits, cfg.bits_budget) if cfg.mixed_plan == "sensitivity"
                else plan_random(sizes, cfg.weight_bits, cfg.bits_budget, cfg.seed))
    else:
        plan = {n: cfg.weight_bits for n in layers}
    chosen = {n: fits[n][plan[n]] for n in layers if plan[n] != FLOAT_BITS}
    states = {n: layer_state(layers[n], fit, cfg) for n, fit in chosen.items()}
    layer_reports = {n: _layer_report(plan[n], chosen.get(n), sizes[n]) for n in layers}
    del fits, chosen  # the states hold copies of the chosen weights; the other precisions are not needed

    report = {
        "family": adapter.layout, "variant": adapter.sd_version,
        "timesteps": cap.timesteps, "groups": step_groups,
        "capture_bytes": cap.bytes, "unet_calls_per_run": cap.unet_calls,
        "average_weight_bits": average_bits(plan, sizes),
        "layers": layer_reports,
        "timings": timings,
        "gram": {"passes": len(passes), "block": cfg.gram_block, "bytes_per_pass":
                 [sum(gram.gram_bytes(capture_mod._reduce_dim(layers[n]), cfg.gram_block, _taps(layers[n]))
                      for n in names) for names in passes]},
    }
    time_keys, time_tables = (cap.time_keys, cap.time_tables) if cfg.time_precalc else (None, {})
    # Drafts carry no report: the report is finished last and the returned calibration is never changed.
    calibration = Calibration(adapter.layout, adapter.sd_version, cfg, fingerprint(base_layers), states,
                              step_groups, time_keys, time_tables, plan)
    del cap  # the captured rows are no longer needed: free them before the next sampling pass
    release_freed_memory()

    # 5. consistency pass on the quantized model's own trajectory: new activation scales; the evaluation
    #    (6.) rides along, comparing each quantized call with the float UNet on the same inputs
    if cfg.consistency_pass and states:
        start = time.perf_counter()
        qmodel = calibration.runtime(adapter.timesteps_from_call).apply(unet)
        monitor = UNetErrorMonitor(unet, qmodel, adapter.timesteps_from_call) if cfg.evaluate else nullcontext()
        with monitor:
            qcap = _capture(qmodel, {n: qmodel.get_submodule(n) for n in states}, runner, adapter, cfg,
                            phases.phase(), cfg.seed + 1)
        quant_weights = {n: qmodel.get_submodule(n).weight_value() for n in states}  # shares the states' tensors
        refit = refit_act_scales({n: weights[n] for n in states}, quant_weights, qcap.layers, step_groups, cfg,
                                 phases.check_cancel)
        del qmodel, qcap, quant_weights
        release_freed_memory()
        for name, (_, error) in refit.items():
            report["layers"][name]["error_consistency"] = error
        timings["consistency_s"] = time.perf_counter() - start
        sampling_passes += 1 + int(cfg.evaluate)  # the quantized pass, and the float calls beside it
        if cfg.evaluate:
            report["fidelity"] = {**monitor.result(), "measured": "in the consistency pass, before its refit"}
        calibration = _with_act_scales(calibration, {n: scales for n, (scales, _) in refit.items()})
    elif cfg.evaluate:
        start = time.perf_counter()
        qmodel = calibration.runtime(adapter.timesteps_from_call).apply(unet)
        report["fidelity"] = {**evaluate_unet_error(unet, qmodel, runner, adapter.timesteps_from_call,
                                                    phases.phase()), "measured": "after calibration"}
        timings["evaluate_s"] = time.perf_counter() - start
        sampling_passes += 2
    report["sampling_passes"] = sampling_passes
    return replace(calibration, report=report)


def _layer_report(bits: int, fit, params: int) -> dict:
    if fit is None:
        return {"bits": bits, "error": 0.0, "params": params, "rounding": "float"}
    entry = {"bits": bits, "error": fit.error, "params": params, "rounding": fit.rounding}
    if fit.fallback_reason:
        entry["fallback"] = fit.fallback_reason
    return entry


def _with_act_scales(calibration: Calibration, scales: dict) -> Calibration:
    return replace(calibration, layers={n: state.with_act_scales(scales[n]) if n in scales else state
                                        for n, state in calibration.layers.items()})
