"""Serial capture: run the caller's sampler and record what every quantizable layer sees, per timestep.

The caller supplies a *runner* (``runner(unet)`` samples the calibration prompts with that UNet,
exactly as inference does). We hook the UNet and its layers, the runner runs, the hooks are always
removed. Per layer and timestep we keep:

- the input's absolute maximum (per tensor and per input channel), from the full tensor;
- a bounded, seeded reservoir of input rows (tokens for linears, im2col patches for convs),
  stored as float16, so that fitting can evaluate each layer's output error offline.

Reservoir memory follows ``memory_limit_bytes`` split evenly over layers and timesteps, with a floor
of ``MIN_ROWS_PER_STEP`` rows per layer and timestep (so a very small limit can be exceeded; the
report states the bytes captured). The split uses the runner's ``steps`` as the number of timesteps.

Layers given a :class:`~.gram.GramAccumulator` also accumulate their input Gram matrix (``gram.py``).
A pass may record only Gram matrices (``stats=False``): later passes of a memory-bounded calibration.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..runtime.kernels import conv_out_hw
from .gram import GramAccumulator, rows_per_call
from .time_recording import TimeOutputRecorder

ProgressFn = Callable[[int, int], None]  # (unet calls done, total) ; may raise to cancel
MIN_ROWS_PER_STEP, MAX_ROWS_PER_STEP = 8, 512


def timestep_key(t: float) -> float:
    """Timesteps are dictionary keys: round away float noise from samplers that compute t from sigma."""
    return round(float(t), 3)


@dataclass
class StepRecord:
    amax: float = 0.0
    channel_amax: torch.Tensor | None = None  # float32 (C_in,)
    rows: torch.Tensor | None = None          # float16 (n, K)
    priorities: torch.Tensor | None = None    # float32 (n,): reservoir keys (top-n uniform priorities)
    calls: int = 0


@dataclass
class LayerCapture:
    name: str
    kind: str            # "linear" | "conv"
    reduce_dim: int      # K of the layer's GEMM
    rows_per_step: int
    steps: dict = field(default_factory=dict)  # timestep key -> StepRecord

    def rows(self, keys=None) -> torch.Tensor:
        """Captured input rows (float32) for the given timestep keys (all when None)."""
        keys = self.steps.keys() if keys is None else keys
        parts = [self.steps[k].rows for k in keys if k in self.steps and self.steps[k].rows is not None]
        if not parts:
            return torch.empty(0, self.reduce_dim)
        return torch.cat(parts).float()

    def amax(self, keys=None) -> float:
        keys = self.steps.keys() if keys is None else keys
        return max((self.steps[k].amax for k in keys if k in self.steps), default=0.0)

    def nbytes(self) -> int:
        total = 0
        for rec in self.steps.values():
            for t in (rec.rows, rec.priorities, rec.channel_amax):
                if t is not None:
                    total += t.numel() * t.element_size()
        return total


@dataclass
class CaptureResult:
    layers: dict                 # name -> LayerCapture
    timesteps: list              # sorted unique timestep keys, descending (sampling order)
    unet_calls: int
    bytes: int
    time_keys: torch.Tensor | None = None  # ascending timesteps of the time tables
    time_tables: dict = field(default_factory=dict)  # time-path module name -> (T, D) float32 outputs


def _conv_geometry(module: nn.Module):
    return module.kernel_size, module.stride, module.padding, module.dilation


def _sample_conv_patches(x: torch.Tensor, module, index: torch.Tensor, out_w: int, out_hw: int) -> torch.Tensor:
    """im2col rows (n, C*kh*kw) at flat output positions ``index`` without unfolding the whole input."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = _conv_geometry(module)
    x_pad = F.pad(x, (pw, pw, ph, ph))
    batch = index // out_hw
    pos = index % out_hw
    oy, ox = (pos // out_w) * sh, (pos % out_w) * sw
    taps = []
    for i in range(kh):
        for j in range(kw):
            taps.append(x_pad[batch, :, oy + i * dh, ox + j * dw])  # (n, C)
    return torch.stack(taps, dim=2).flatten(1)  # (n, C, kh*kw) -> unfold's (C, kh, kw) order


class Recorder:
    """Installs capture hooks; use as a context manager so hooks always come off."""

    def __init__(self, unet: nn.Module, layers: dict, timesteps_from_call, rows_per_step: dict,
                 total_calls: int = 0, progress: ProgressFn | None = None, seed: int = 0,
                 grams: dict | None = None, gram_cost: float = 0.5, stats: bool = True) -> None:
        self.unet, self.layers = unet, layers
        self.grams, self.gram_cost, self.stats = grams or {}, gram_cost, stats
        self.timesteps_from_call = timesteps_from_call
        self.progress, self.total_calls = progress, total_calls
        self.generator = torch.Generator().manual_seed(seed)
        self.captures = {
            name: LayerCapture(name, "conv" if isinstance(m, nn.Conv2d) or hasattr(m, "kernel_size") else "linear",
                               _reduce_dim(m), rows_per_step[name])
            for name, m in layers.items()
        }
        self.current_key: float | None = None
        self.current_keys: torch.Tensor | None = None  # (B,) rounded timesteps of the current call
        self.calls = 0
        self.handles: list = []

    def __enter__(self) -> "Recorder":
        self.handles.append(self.unet.register_forward_pre_hook(self._on_unet_call, with_kwargs=True))
        for name, module in self.layers.items():
            if self.stats or name in self.grams:
                self.handles.append(module.register_forward_pre_hook(self._layer_hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _on_unet_call(self, module, args, kwargs):
        t = self.timesteps_from_call(args, kwargs).reshape(-1).float().cpu()
        self.current_keys = torch.round(t * 1000) / 1000
        self.current_key = timestep_key(t[0])
        self.calls += 1
        if self.progress is not None:
            self.progress(self.calls, self.total_calls)
        return None

    def _layer_hook(self, name: str):
        def hook(module, args):
            if self.current_key is not None:
                with torch.no_grad():
                    if self.stats:
                        self._record(self.captures[name], module, args[0])
                    if name in self.grams:
                        self._add_gram(self.grams[name], self.captures[name], module, args[0])
            return None
        return hook

    def _record(self, cap: LayerCapture, module, x: torch.Tensor) -> None:
        rec = cap.steps.get(self.current_key)
        if rec is None:
            rec = cap.steps[self.current_key] = StepRecord()
        rec.calls += 1
        xd = x.detach()
        # per input channel |x| max as max(amax, -amin): no |x| temporary (2-3x faster on CPU than abs().amax)
        flat = xd if cap.kind == "conv" else xd.reshape(-1, xd.shape[-1])
        reduce = [0, 2, 3] if cap.kind == "conv" else [0]
        ch = torch.maximum(flat.amax(dim=reduce), flat.amin(dim=reduce).neg()).float().cpu()
        rec.amax = max(rec.amax, float(ch.max()))
        rec.channel_amax = ch if rec.channel_amax is None else torch.maximum(rec.channel_amax, ch)

        # Reservoir: every candidate row gets a uniform priority; keeping the top-n priorities over
        # all calls is a uniform sample without replacement, and merging is order-independent.
        if cap.kind == "conv":
            out_h, out_w = _out_hw(module, xd.shape[2], xd.shape[3])
            n_candidates = xd.shape[0] * out_h * out_w
        else:
            n_candidates = xd.numel() // cap.reduce_dim
        prio = torch.rand(n_candidates, generator=self.generator)
        keep = min(cap.rows_per_step, n_candidates)
        top = torch.topk(prio, keep).indices
        if cap.kind == "conv":
            new_rows = _sample_conv_patches(xd, module, top.to(xd.device), out_w, out_h * out_w)
        else:
            new_rows = xd.reshape(-1, cap.reduce_dim)[top.to(xd.device)]
        new_rows = new_rows.float().clamp_(-65000, 65000).to(torch.float16).cpu()
        new_prio = prio[top]
        if rec.rows is not None:
            new_rows, new_prio = torch.cat([rec.rows, new_rows]), torch.cat([rec.priorities, new_prio])
            best = torch.topk(new_prio, min(cap.rows_per_step, new_prio.numel())).indices
            new_rows, new_prio = new_rows[best], new_prio[best]
        rec.rows, rec.priorities = new_rows, new_prio


    def _add_gram(self, gram: GramAccumulator, cap: LayerCapture, module, x: torch.Tensor) -> None:
        """Add a seeded uniform subset of this call's input rows (all of them when the budget allows)."""
        xd = x.detach()
        if cap.kind == "conv":
            out_h, out_w = _out_hw(module, xd.shape[2], xd.shape[3])
            n_rows = xd.shape[0] * out_h * out_w
        else:
            n_rows = xd.numel() // cap.reduce_dim
        keep = rows_per_call(n_rows, cap.reduce_dim, module.weight.shape[0], gram.widest, self.gram_cost)
        if keep >= n_rows:
            rows = _all_conv_patches(xd, module) if cap.kind == "conv" else xd.reshape(-1, cap.reduce_dim)
        else:
            index = torch.randperm(n_rows, generator=self.generator)[:keep].to(xd.device)
            rows = (_sample_conv_patches(xd, module, index, out_w, out_h * out_w) if cap.kind == "conv"
                    else xd.reshape(-1, cap.reduce_dim)[index])
        gram.add(rows)


def _all_conv_patches(x: torch.Tensor, module) -> torch.Tensor:
    """Every im2col row (B*L, C*kh*kw) of a conv input."""
    kernel, stride, padding, dilation = _conv_geometry(module)
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # (B, K, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _reduce_dim(module: nn.Module) -> int:
    if hasattr(module, "reduce_dim"):
        return module.reduce_dim
    weight = module.weight
    return weight[0].numel() if weight.dim() > 1 else weight.numel()


def _out_hw(module, height: int, width: int) -> tuple[int, int]:
    return conv_out_hw(height, width, *_conv_geometry(module))


def rows_per_step_budget(layers: dict, steps: int, memory_limit_bytes: int) -> dict:
    """Split the reservoir budget evenly across layers (bytes), then into rows per timestep."""
    per_layer = memory_limit_bytes / max(1, len(layers))
    return {name: int(min(MAX_ROWS_PER_STEP, max(MIN_ROWS_PER_STEP,
                                                 math.floor(per_layer / (2 * _reduce_dim(m) * max(1, steps))))))
            for name, m in layers.items()}


def capture(unet: nn.Module, layers: dict, runner, timesteps_from_call, steps_hint: int,
            memory_limit_bytes: int, progress: ProgressFn | None = None, total_calls: int = 0,
            seed: int = 0, time_modules: dict | None = None, grams: dict | None = None,
            gram_cost: float = 0.5) -> CaptureResult:
    """Run ``runner(unet)`` once with capture hooks on ``layers`` (name -> module inside ``unet``).

    ``time_modules`` (name -> module) also get their float outputs recorded per timestep; ``grams``
    (name -> GramAccumulator, a subset of ``layers``) accumulate those layers' input Gram matrices.
    """
    rows = rows_per_step_budget(layers, steps_hint, memory_limit_bytes)
    with torch.no_grad(), Recorder(unet, layers, timesteps_from_call, rows, total_calls, progress, seed,
                                   grams, gram_cost) as rec, \
            TimeOutputRecorder(time_modules or {}, lambda: rec.current_keys) as time_rec:
        runner(unet)
    keys = sorted({k for cap in rec.captures.values() for k in cap.steps}, reverse=True)
    if not keys:
        raise RuntimeError(_NO_CALLS)
    time_keys, time_tables = time_rec.tables()
    return CaptureResult(rec.captures, keys, rec.calls, sum(c.nbytes() for c in rec.captures.values()),
                         time_keys, time_tables)


def capture_grams(unet: nn.Module, layers: dict, grams: dict, runner, timesteps_from_call,
                  progress: ProgressFn | None = None, total_calls: int = 0, seed: int = 0,
                  gram_cost: float = 0.5) -> int:
    """A Gram-only pass: ``runner(unet)`` with hooks on ``grams``' layers only; returns the UNet calls."""
    with torch.no_grad(), Recorder(unet, layers, timesteps_from_call, {n: 0 for n in layers}, total_calls,
                                   progress, seed, grams, gram_cost, stats=False) as rec:
        runner(unet)
    if not rec.calls:
        raise RuntimeError(_NO_CALLS)
    return rec.calls


_NO_CALLS = ("calibration captured nothing: the runner never called the UNet "
             "(check that it samples with the model it is given)")
