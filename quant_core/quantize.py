"""quantize(unet, runner, config) -> QuantResult: the Serial-to-Parallel calibration pipeline.

1. Serial capture: ``runner(unet)`` samples the calibration prompts; hooks record each layer's inputs.
2. Timestep groups from the captured per-step ranges.
3. Parallel fitting: every layer independently (weight clipping, activation scale per group).
4. Mixed precision plan from measured sensitivity (optional).
5. Consistency pass: ``runner`` samples again with the *quantized* model; activation scales are
   refitted on the inputs it really produces.
6. Evaluation: UNet-output error vs float per step along the quantized trajectory.

A runner is any callable ``runner(unet)`` that samples with the UNet it is given. Optional
attributes ``steps`` and ``total_unet_calls`` size the capture budget and the progress bar.
``progress(done, total)`` is called once per UNet call across all phases; raising from it cancels.
"""
from __future__ import annotations

import time

import torch
import torch.nn as nn

from . import capture as capture_mod
from .config import QuantConfig, preset
from .adapters import detect_adapter
from .fitting import fit_all, refit_act_scales
from .modeltree import fingerprint
from .modules import QuantConv2d, QuantLinear
from .planner import FLOAT_BITS, average_bits, plan_precision, plan_random
from .result import QuantResult
from .timegroups import plan_groups


class _PhasedProgress:
    """One progress bar across all serial passes."""

    def __init__(self, progress, calls_per_run: int, runs: int) -> None:
        self.progress, self.calls_per_run, self.runs = progress, calls_per_run, runs
        self.offset = 0

    def check_cancel(self) -> None:
        """Between serial passes (fitting): re-report the position so a raising callback can cancel."""
        if self.progress is not None:
            done = min(self.offset, self.calls_per_run * self.runs)
            self.progress(done, self.calls_per_run * self.runs)

    def phase(self):
        offset = self.offset
        self.offset += self.calls_per_run

        def report(done, _total):
            if self.progress is not None:
                self.progress(min(offset + done, self.calls_per_run * self.runs), self.calls_per_run * self.runs)
        return report


def time_path_linears(unet: nn.Module, adapter) -> dict:
    """Linears on the time path: quantized like any layer only when time precalculation is off."""
    roots = [adapter.time_embedding_name(unet)] + adapter.time_projection_names(unet)
    return {name: module for name, module in unet.named_modules()
            if isinstance(module, nn.Linear) and min(module.in_features, module.out_features) >= 16
            and any(name == r or name.startswith(r + ".") for r in roots)}


def _build_layer(module: nn.Module, fit, cfg: QuantConfig):
    cls = QuantConv2d if isinstance(module, nn.Conv2d) else QuantLinear
    layer = cls.from_float(module, weight_bits=fit.weight_bits, group_size=cfg.group_size,
                           act_scales=fit.act_scales, weight_clip=fit.clip, per_tensor=cfg.weight_per_tensor)
    if fit.int8_weight is not None:
        # Same scales (same weight and clip), other codes: the fitted weight lies exactly on the
        # layer's grid, so requantizing it reproduces the fitted codes.
        fitted = fit.int8_weight.float() * layer.weight_scale.unsqueeze(1)
        layer.weight.data.copy_(layer.requantize_codes(fitted))
    return layer


def quantize(unet: nn.Module, runner, config: QuantConfig | str | None = None, progress=None) -> QuantResult:
    """Calibrate and quantize ``unet``. The given model is never modified."""
    cfg = preset(config) if isinstance(config, str) else (config or preset("W8A8"))
    adapter = detect_adapter(unet)
    base_layers = adapter.quantizable_layers(unet)
    layers = dict(base_layers)
    if not cfg.time_precalc:
        layers.update(time_path_linears(unet, adapter))
    steps_hint = int(getattr(runner, "steps", 50))
    calls = int(getattr(runner, "total_unet_calls", 0))
    runs = 1 + int(cfg.consistency_pass) + int(cfg.evaluate)
    phases = _PhasedProgress(progress, calls, runs)
    timings = {}

    # 1. serial capture on the float model's own trajectory
    start = time.perf_counter()
    cap = capture_mod.capture(unet, layers, runner, adapter.timesteps_from_call, steps_hint,
                              cfg.memory_limit_mb * 2**20, phases.phase(), calls, cfg.seed,
                              time_modules=({n: unet.get_submodule(n) for n in adapter.time_module_names(unet)}
                                            if cfg.time_precalc else None))
    timings["capture_s"] = time.perf_counter() - start

    # 2. timestep groups
    ranges = torch.tensor([[cap.layers[n].steps[k].amax if k in cap.layers[n].steps else 0.0
                            for k in cap.timesteps] for n in layers])
    group_keys = plan_groups(cap.timesteps, ranges, cfg.timestep_groups)

    # 3. parallel fit (+ 4. mixed precision plan)
    start = time.perf_counter()
    weights = {n: m.weight for n, m in layers.items()}
    bits_options = tuple(sorted({cfg.weight_bits, 8})) if cfg.mixed_precision else (cfg.weight_bits,)
    fits = fit_all(weights, cap.layers, group_keys, bits_options, cfg, phases.check_cancel)
    sizes = {n: w.numel() for n, w in weights.items()}
    if cfg.mixed_precision:
        errors = {n: {b: f.error for b, f in fits[n].items()} for n in fits}
        plan = (plan_precision(sizes, errors, cfg.weight_bits, cfg.bits_budget) if cfg.mixed_plan == "sensitivity"
                else plan_random(sizes, cfg.weight_bits, cfg.bits_budget, cfg.seed))
    else:
        plan = {n: cfg.weight_bits for n in layers}
    qlayers = {n: _build_layer(layers[n], fits[n][plan[n]], cfg) for n in layers if plan[n] != FLOAT_BITS}
    timings["fit_s"] = time.perf_counter() - start

    time_keys, time_tables = (cap.time_keys, cap.time_tables) if cfg.time_precalc else (None, {})
    report = {
        "family": adapter.family, "variant": adapter.variant,
        "timesteps": cap.timesteps, "groups": group_keys,
        "capture_bytes": cap.bytes, "unet_calls_per_run": cap.unet_calls,
        "average_weight_bits": average_bits(plan, sizes),
        "layers": {n: {"bits": plan[n], "error": fits[n][plan[n]].error if plan[n] in fits[n] else 0.0,
                       "params": sizes[n],
                       "rounding": "gptq" if plan[n] in fits[n] and fits[n][plan[n]].int8_weight is not None
                       else "nearest"} for n in layers},
        "timings": timings,
    }
    result = QuantResult(adapter.family, adapter.variant, cfg, fingerprint(base_layers), qlayers, group_keys,
                         time_keys, time_tables, plan, report)

    # 5. consistency pass on the quantized model's own trajectory
    if cfg.consistency_pass and qlayers:
        start = time.perf_counter()
        qmodel = result.apply(unet, check=False)
        qcap = capture_mod.capture(qmodel, {n: qmodel.get_submodule(n) for n in qlayers}, runner,
                                   adapter.timesteps_from_call, steps_hint, cfg.memory_limit_mb * 2**20,
                                   phases.phase(), calls, cfg.seed + 1)
        refit = refit_act_scales({n: weights[n] for n in qlayers}, qlayers, qcap.layers, group_keys, cfg,
                                 phases.check_cancel)
        for name, (scales, error) in refit.items():
            qlayers[name].set_act_scales(scales)
            report["layers"][name]["error_consistency"] = error
        timings["consistency_s"] = time.perf_counter() - start

    # 6. model-level fidelity on the calibration prompts
    if cfg.evaluate:
        start = time.perf_counter()
        report["fidelity"] = evaluate_unet_error(unet, result.apply(unet, check=False), runner, phases.phase())
        timings["evaluate_s"] = time.perf_counter() - start
    return result


def _output_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    return out.sample if hasattr(out, "sample") else out[0]


def evaluate_unet_error(float_unet: nn.Module, quant_unet: nn.Module, runner, progress=None) -> dict:
    """Run the sampler with the quantized UNet; at every call compare with the float UNet on the same input.

    Returns per-step relative L2 error of the UNet output and its mean.
    """
    adapter = detect_adapter(float_unet)
    per_step: dict = {}
    calls = [0]

    def hook(module, args, kwargs, output):
        with torch.no_grad():
            reference = _output_tensor(float_unet(*args, **kwargs)).float()
            diff = (_output_tensor(output).float() - reference).norm() / reference.norm().clamp_min(1e-12)
        key = capture_mod.timestep_key(adapter.timesteps_from_call(args, kwargs).reshape(-1)[0])
        per_step.setdefault(key, []).append(float(diff))
        calls[0] += 1
        if progress is not None:
            progress(calls[0], 0)

    handle = quant_unet.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            runner(quant_unet)
    finally:
        handle.remove()
    steps = {k: sum(v) / len(v) for k, v in sorted(per_step.items(), reverse=True)}
    return {"unet_rel_error_per_step": steps,
            "unet_rel_error_mean": sum(steps.values()) / len(steps) if steps else float("nan")}
