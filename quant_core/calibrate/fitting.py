"""Parallel fitting: every layer's scales chosen independently from its own capture.

Each layer is fitted against its own float output on its captured input rows, so there is no error
accumulation while fitting, the order does not matter, and layers run in a thread pool (torch ops
release the GIL). Candidates are evaluated one after another, each on all rows of the layer at once.

- Weight clipping: one ratio per output channel, chosen by the layer's output error. The error of
  output channel n only depends on row n of the weight, so all channels are chosen at once.
- Weight rounding: round to nearest, or error-compensating rounding on the same grid
  (``rounding.py``, GPTQ's idea) driven by the captured inputs; the clip ratio is then chosen per
  channel by the output error *after* that rounding.
- Activation clipping: one static scale per timestep group, chosen by output error on that group's
  rows with the (already quantized) weight.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ..runtime import formats, kernels
from . import rounding
from .host_memory import MemoryGate, release_freed_memory

WEIGHT_CLIP_CANDIDATES = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)
# Error-compensated rounding tolerates outliers better, so it needs fewer (and milder) clip ratios.
GPTQ_CLIP_CANDIDATES = (1.0, 0.95, 0.9, 0.85, 0.8, 0.7)
ACT_CLIP_CANDIDATES = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2)
ACT_QMAX = kernels.ACT_QMAX
# Temporaries of the layers fitted at once (see fit_transient_bytes): SD1.5's largest layers take turns.
FIT_TRANSIENT_BYTES = 1 << 30


def fit_transient_bytes(weight: torch.Tensor) -> int:
    """Rough peak temporaries of fitting one layer: candidate codes (1 byte each), a few float32 copies."""
    return weight.numel() * (len(GPTQ_CLIP_CANDIDATES) + 4 * 4)


def fake_quant_weight(w2d: torch.Tensor, bits: int, group_size: int, clip=None, per_tensor=False) -> torch.Tensor:
    """Float weight after a quantize/dequantize round trip in the format for ``bits``."""
    return formats.quantize_weight(w2d, bits, group_size, clip, per_tensor).dequantize()


def search_clip_error_feedback(w2d: torch.Tensor, rounder, bits: int, group_size: int,
                               candidates=GPTQ_CLIP_CANDIDATES) -> tuple[torch.Tensor, object]:
    """Per-channel clip ratio for error-compensated rounding; returns (clip (N,), weight value).

    ``rounder``: a :class:`rounding.BlockRounder`. Rows are independent under this rounding, so each
    channel keeps the candidate whose rounded row gives the smallest output error ``d H d^T``.
    """
    grids = [formats.quantize_weight(w2d, bits, group_size, clip=c) for c in candidates]
    codes, errors = rounder.round_candidates(w2d, grids)
    best = errors.argmin(0)  # the first candidate wins ties, as the one-at-a-time search did
    value = grids[0].with_codes(codes[0])
    for index in range(1, len(grids)):
        value = grids[index].with_codes(codes[index]).where_rows(best == index, value)
    return torch.tensor(candidates, dtype=torch.float32)[best], value


def fake_quant_act(x: torch.Tensor, scale: float) -> torch.Tensor:
    """The activation rounding the layers run (``kernels.quantize_static``), back in float."""
    return kernels.fake_quantize_static(x, scale)


def search_weight_clip(w2d: torch.Tensor, rows: torch.Tensor, bits: int, group_size: int,
                       candidates=WEIGHT_CLIP_CANDIDATES) -> torch.Tensor:
    """Per-output-channel clip ratio minimising ||X (W - Q_c(W))^T||^2 column by column.

    Without captured rows the error is measured in weight space (X = identity).
    """
    errors = []
    for c in candidates:
        diff = w2d - fake_quant_weight(w2d, bits, group_size, clip=c)
        err = (rows @ diff.t()).pow_(2).sum(0) if rows.numel() else diff.pow(2).sum(1)
        errors.append(err)
    best = torch.stack(errors).argmin(0)
    return torch.tensor(candidates, dtype=torch.float32)[best]


def search_act_scale(rows: torch.Tensor, amax: float, w_float: torch.Tensor, w_quant: torch.Tensor,
                     candidates=ACT_CLIP_CANDIDATES) -> tuple[float, float]:
    """Static activation scale for one timestep group; returns (scale, relative output error)."""
    amax = max(float(amax), 1e-8)
    if rows.numel() == 0:
        return amax / ACT_QMAX, float("nan")
    target = rows @ w_float.t()
    norm = float(target.pow(2).sum()) or 1.0
    best = (float("inf"), amax / ACT_QMAX)
    for alpha in candidates:
        scale = alpha * amax / ACT_QMAX
        err = float((fake_quant_act(rows, scale) @ w_quant.t() - target).pow_(2).sum())
        if err < best[0]:
            best = (err, scale)
    return best[1], best[0] / norm


def subsample(rows: torch.Tensor, limit: int, seed: int) -> torch.Tensor:
    if rows.shape[0] <= limit:
        return rows
    gen = torch.Generator().manual_seed(seed)
    return rows[torch.randperm(rows.shape[0], generator=gen)[:limit]]


@dataclass
class LayerFit:
    """Fitted parameters of one layer at one weight precision."""
    weight: object            # the quantized weight, a runtime.formats value
    clip: torch.Tensor        # (N,) per-output-channel clip ratio
    act_scales: torch.Tensor  # (G,) one per timestep group
    error: float              # relative L2 output error over captured rows (weights + activations)
    rounding: str = "nearest"  # "gptq" when error-compensated rounding chose the codes
    fallback_reason: str = ""  # why a layer meant for error-compensated rounding was rounded to nearest

    @property
    def weight_bits(self) -> int:
        return self.weight.bits


def fit_layer(weight: torch.Tensor, capture, step_groups: list, bits: int, cfg, seed: int,
              rounder=None) -> LayerFit:
    """Fit one layer at ``bits`` from its capture; ``step_groups[g]`` lists the timestep keys of group g.

    ``rounder``: the layer's :class:`rounding.BlockRounder` (from its Gram matrix) for error-compensated
    rounding; None rounds to nearest.
    """
    w2d = weight.detach().float().reshape(weight.shape[0], -1)
    if rounder is not None:
        candidates = GPTQ_CLIP_CANDIDATES if cfg.weight_clip_search else (1.0,)
        clip, value = search_clip_error_feedback(w2d, rounder, bits, cfg.group_size, candidates)
        method = "gptq"
    else:
        if cfg.weight_clip_search and not cfg.weight_per_tensor:
            clip = search_weight_clip(w2d, subsample(capture.rows(), cfg.fit_rows, seed), bits, cfg.group_size)
        else:
            clip = torch.ones(w2d.shape[0])
        value = formats.quantize_weight(w2d, bits, cfg.group_size, clip, cfg.weight_per_tensor)
        method = "nearest"
    act_scales, err_num, err_den = fit_act_scales(capture, step_groups, w2d, value.dequantize(), cfg, seed)
    return LayerFit(value, clip, act_scales, (err_num / err_den) ** 0.5 if err_den else float("nan"), method)


def fit_act_scales(capture, step_groups: list, w2d: torch.Tensor, w_quant: torch.Tensor, cfg, seed: int):
    """One scale per group; returns (scales (G,), summed squared error, summed squared target)."""
    scales, err_num, err_den = [], 0.0, 0.0
    candidates = ACT_CLIP_CANDIDATES if cfg.act_clip_search else (1.0,)
    for g, keys in enumerate(step_groups):
        rows = subsample(capture.rows(keys), cfg.fit_rows, seed + g)
        scale, rel = search_act_scale(rows, capture.amax(keys), w2d, w_quant, candidates)
        scales.append(scale)
        if rows.numel():
            target_energy = float((rows @ w2d.t()).pow(2).sum())
            err_num += rel * target_energy
            err_den += target_energy
    return torch.tensor(scales, dtype=torch.float32), err_num, err_den


def rounding_plan(gram, cfg) -> tuple[object, str]:
    """(BlockRounder or None, reason for round-to-nearest or "") for a layer with Gram accumulator ``gram``."""
    if cfg.weight_rounding != "gptq" or cfg.weight_per_tensor:
        return None, ""
    if gram is None or gram.rows == 0:
        return None, "no input rows were captured for it"
    if gram.rows < cfg.gptq_min_rows * gram.widest:
        return None, f"{gram.rows} captured rows < {cfg.gptq_min_rows:g} x {gram.widest} inputs per Gram block"
    return rounding.BlockRounder(gram.blocks()), ""


def fit_all(weights: dict, captures: dict, step_groups: list, bits_options: tuple, cfg, check_cancel=None,
            grams: dict | None = None) -> dict:
    """Fit every layer at every precision in ``bits_options``; {name: {bits: LayerFit}}.

    Each layer's seed derives from its name, so results do not depend on order or thread timing.
    ``check_cancel()`` runs before each layer (raising from it cancels: the remaining jobs stop at once).
    ``grams`` (name -> GramAccumulator) drive error-compensated rounding; each is taken out of the dict
    when its layer starts and freed (pages returned to the OS) when it is fitted, so memory falls as the fit proceeds.
    """
    grams = {} if grams is None else grams

    gate = MemoryGate(FIT_TRANSIENT_BYTES)

    def job(name):
        if check_cancel is not None:
            check_cancel()
        seed = cfg.seed + _stable_hash(name)
        with gate.hold(fit_transient_bytes(weights[name])):
            rounder, reason = rounding_plan(grams.pop(name, None), cfg)
            fits = {bits: fit_layer(weights[name], captures[name], step_groups, bits, cfg, seed, rounder)
                    for bits in bits_options}
            del rounder  # this layer's Gram blocks and their factors: give the pages back before the next layer
            release_freed_memory()
        for fit in fits.values():
            fit.fallback_reason = reason
        return name, fits

    with ThreadPoolExecutor(max_workers=max(1, cfg.workers)) as pool:
        return dict(pool.map(job, sorted(weights)))


def refit_act_scales(weights: dict, quant_weights: dict, captures: dict, step_groups: list, cfg,
                     check_cancel=None) -> dict:
    """Consistency pass: new activation scales from inputs the *quantized* model produced.

    Targets are the float layer on those same inputs; the quantized weights (format values) stay as fitted.
    Returns {name: (scales, relative error)}.
    """
    def job(name):
        if check_cancel is not None:
            check_cancel()
        w2d = weights[name].detach().float().reshape(weights[name].shape[0], -1)
        w_quant = quant_weights[name].dequantize().reshape(w2d.shape)
        scales, num, den = fit_act_scales(captures[name], step_groups, w2d, w_quant, cfg,
                                          cfg.seed + _stable_hash(name) + 7919)
        return name, (scales, (num / den) ** 0.5 if den else float("nan"))

    with ThreadPoolExecutor(max_workers=max(1, cfg.workers)) as pool:
        return dict(pool.map(job, sorted(weights)))


def _stable_hash(name: str) -> int:
    value = 0
    for ch in name.encode():
        value = (value * 131 + ch) % 1_000_003
    return value
