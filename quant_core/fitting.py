"""Parallel fitting: every layer's scales chosen independently from its own capture.

Each layer is fitted against its own float output on its captured input rows, so there is no error
accumulation while fitting, the order does not matter, and layers run in a thread pool (torch ops
release the GIL). Candidates are evaluated vectorised where memory allows.

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

from . import formats, rounding

WEIGHT_CLIP_CANDIDATES = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)
# Error-compensated rounding tolerates outliers better, so it needs fewer (and milder) clip ratios.
GPTQ_CLIP_CANDIDATES = (1.0, 0.95, 0.9, 0.85, 0.8, 0.7)
ACT_CLIP_CANDIDATES = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2)
ACT_QMAX = 127


def fake_quant_weight(w2d: torch.Tensor, bits: int, group_size: int, clip=None, per_tensor=False) -> torch.Tensor:
    """Float weight after a quantize/dequantize round trip in the layer's storage format."""
    if bits == 8:
        codes, scale = formats.quantize_int8_per_channel(w2d, clip, per_tensor)
        return codes.float() * scale.unsqueeze(1)
    q = formats.quantize_int4_grouped(w2d, group_size, clip, per_tensor)
    return q.to_int8().float() * q.channel_scale.unsqueeze(1)


def weight_grid(w2d: torch.Tensor, bits: int, group_size: int, clip=None, per_tensor=False):
    """The layer format's grid for ``w2d``: (step (N, K), channel scale (N,), integer group scale (N, K), qmin, qmax).

    ``step = channel_scale * group_scale``; the int8 value the GEMM uses is ``code * group_scale``.
    """
    n, k = w2d.shape
    if bits == 8:
        _, scale = formats.quantize_int8_per_channel(w2d, clip, per_tensor)
        ones = torch.ones(n, k)
        return scale.unsqueeze(1) * ones, scale, ones, -formats.INT8_QMAX, formats.INT8_QMAX
    q = formats.quantize_int4_grouped(w2d, group_size, clip, per_tensor)
    group = q.group_scale.float().repeat_interleave(group_size, dim=1)[:, :k]
    return q.channel_scale.unsqueeze(1) * group, q.channel_scale, group, formats.INT4_QMIN, formats.INT4_QMAX


def error_feedback_weight(w2d: torch.Tensor, rounder, bits: int, group_size: int, clip=None,
                          per_tensor=False) -> tuple[torch.Tensor, torch.Tensor]:
    """(exact int8 weight (N, K), channel scale (N,)) after error-compensating rounding on the format's grid."""
    step, channel_scale, group, qmin, qmax = weight_grid(w2d, bits, group_size, clip, per_tensor)
    codes = rounder.round(w2d, step, qmin, qmax)
    return (codes * group.to(torch.int32)).to(torch.int8), channel_scale


def search_clip_error_feedback(w2d: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int,
                               candidates=GPTQ_CLIP_CANDIDATES) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel clip ratio for error-compensated rounding; returns (clip (N,), int8 weight, channel scale).

    Rows are independent under this rounding, so each channel keeps the candidate whose rounded row
    gives the smallest output error ``d H d^T``; the int8 row and its channel scale come with it.
    """
    rounder = rounding.ErrorFeedbackRounder(hessian)
    best_err = best_clip = best_w8 = best_scale = None
    for c in candidates:
        w8, scale = error_feedback_weight(w2d, rounder, bits, group_size, clip=c)
        err = rounding.output_error_per_channel(w2d - w8.float() * scale.unsqueeze(1), hessian)
        if best_err is None:
            best_err, best_w8, best_scale = err, w8, scale.clone()
            best_clip = torch.full((w2d.shape[0],), float(c))
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_clip[better] = float(c)
        best_w8[better] = w8[better]
        best_scale[better] = scale[better]
    return best_clip, best_w8, best_scale


def fake_quant_act(x: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.clamp(torch.round(x / scale), -128, 127) * scale


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
    weight_bits: int
    clip: torch.Tensor        # (N,) per-output-channel clip ratio
    act_scales: torch.Tensor  # (G,) one per timestep group
    error: float              # relative L2 output error over captured rows (weights + activations)
    int8_weight: torch.Tensor | None = None  # (N, K) exact int8 weight when not plain round-to-nearest


def fit_layer(weight: torch.Tensor, capture, group_keys: list, bits: int, cfg, seed: int) -> LayerFit:
    """Fit one layer at ``bits`` from its capture; ``group_keys[g]`` lists the timestep keys of group g."""
    w2d = weight.detach().float().reshape(weight.shape[0], -1)
    all_rows = subsample(capture.rows(), cfg.fit_rows, seed)
    int8_weight = None
    rows = capture.rows() if cfg.weight_rounding == "gptq" and not cfg.weight_per_tensor else None
    # H from fewer rows than K is rank-deficient: the rounding would fit those rows, not the layer.
    if rows is not None and rows.shape[0] >= w2d.shape[1]:
        hessian = rounding.input_gram(rows)  # every captured row, not the fit subsample
        candidates = GPTQ_CLIP_CANDIDATES if cfg.weight_clip_search else (1.0,)
        clip, int8_weight, channel_scale = search_clip_error_feedback(w2d, hessian, bits, cfg.group_size, candidates)
        w_quant = int8_weight.float() * channel_scale.unsqueeze(1)
    else:
        if cfg.weight_clip_search and not cfg.weight_per_tensor:
            clip = search_weight_clip(w2d, all_rows, bits, cfg.group_size)
        else:
            clip = torch.ones(w2d.shape[0])
        w_quant = fake_quant_weight(w2d, bits, cfg.group_size, clip, cfg.weight_per_tensor)
    act_scales, err_num, err_den = fit_act_scales(capture, group_keys, w2d, w_quant, cfg, seed)
    return LayerFit(bits, clip, act_scales, (err_num / err_den) ** 0.5 if err_den else float("nan"), int8_weight)


def fit_act_scales(capture, group_keys: list, w2d: torch.Tensor, w_quant: torch.Tensor, cfg, seed: int):
    """One scale per group; returns (scales (G,), summed squared error, summed squared target)."""
    scales, err_num, err_den = [], 0.0, 0.0
    candidates = ACT_CLIP_CANDIDATES if cfg.act_clip_search else (1.0,)
    for g, keys in enumerate(group_keys):
        rows = subsample(capture.rows(keys), cfg.fit_rows, seed + g)
        scale, rel = search_act_scale(rows, capture.amax(keys), w2d, w_quant, candidates)
        scales.append(scale)
        if rows.numel():
            target_energy = float((rows @ w2d.t()).pow(2).sum())
            err_num += rel * target_energy
            err_den += target_energy
    return torch.tensor(scales, dtype=torch.float32), err_num, err_den


def fit_all(weights: dict, captures: dict, group_keys: list, bits_options: tuple, cfg, check_cancel=None) -> dict:
    """Fit every layer at every precision in ``bits_options``; {name: {bits: LayerFit}}.

    Each layer's seed derives from its name, so results do not depend on order or thread timing.
    ``check_cancel()`` runs before each layer (raising from it cancels: the remaining jobs stop at once).
    """
    def job(name):
        if check_cancel is not None:
            check_cancel()
        seed = cfg.seed + _stable_hash(name)
        return name, {bits: fit_layer(weights[name], captures[name], group_keys, bits, cfg, seed)
                      for bits in bits_options}

    with ThreadPoolExecutor(max_workers=max(1, cfg.workers)) as pool:
        return dict(pool.map(job, sorted(weights)))


def refit_act_scales(weights: dict, quant_layers: dict, captures: dict, group_keys: list, cfg,
                     check_cancel=None) -> dict:
    """Consistency pass: new activation scales from inputs the *quantized* model produced.

    Targets are the float layer on those same inputs; the quantized weights stay as fitted.
    Returns {name: (scales, relative error)}.
    """
    def job(name):
        if check_cancel is not None:
            check_cancel()
        w2d = weights[name].detach().float().reshape(weights[name].shape[0], -1)
        w_quant = quant_layers[name].dequantize_weight().reshape(w2d.shape).float()
        scales, num, den = fit_act_scales(captures[name], group_keys, w2d, w_quant, cfg,
                                          cfg.seed + _stable_hash(name) + 7919)
        return name, (scales, (num / den) ** 0.5 if den else float("nan"))

    with ThreadPoolExecutor(max_workers=max(1, cfg.workers)) as pool:
        return dict(pool.map(job, sorted(weights)))


def _stable_hash(name: str) -> int:
    value = 0
    for ch in name.encode():
        value = (value * 131 + ch) % 1_000_003
    return value
