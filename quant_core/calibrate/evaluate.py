"""Model-level fidelity: UNet-output error of the quantized model vs the float model, step by step.

:class:`UNetErrorMonitor` compares inside any sampling pass of the quantized model (the consistency pass
folds the evaluation in this way: one float UNet call per quantized call, no sampling pass of its own).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .capture import timestep_key


def _output_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    return out.sample if hasattr(out, "sample") else out[0]


class UNetErrorMonitor:
    """While active, every call of ``quant_unet`` is repeated on ``float_unet`` with the same inputs and the
    relative L2 error of the outputs recorded per timestep. Use as a context manager (the hook comes off)."""

    def __init__(self, float_unet: nn.Module, quant_unet: nn.Module, timesteps_from_call, progress=None) -> None:
        self.float_unet, self.quant_unet = float_unet, quant_unet
        self.timesteps_from_call, self.progress = timesteps_from_call, progress
        self.per_step: dict = {}
        self.calls = 0
        self.handle = None

    def __enter__(self) -> "UNetErrorMonitor":
        self.handle = self.quant_unet.register_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    def _hook(self, module, args, kwargs, output):
        with torch.no_grad():
            reference = _output_tensor(self.float_unet(*args, **kwargs)).float()
            diff = (_output_tensor(output).float() - reference).norm() / reference.norm().clamp_min(1e-12)
        key = timestep_key(self.timesteps_from_call(args, kwargs).reshape(-1)[0])
        self.per_step.setdefault(key, []).append(float(diff))
        self.calls += 1
        if self.progress is not None:
            self.progress(self.calls, 0)

    def result(self) -> dict:
        steps = {k: sum(v) / len(v) for k, v in sorted(self.per_step.items(), reverse=True)}
        return {"unet_rel_error_per_step": steps,
                "unet_rel_error_mean": sum(steps.values()) / len(steps) if steps else float("nan")}


def evaluate_unet_error(float_unet: nn.Module, quant_unet: nn.Module, runner, timesteps_from_call,
                        progress=None) -> dict:
    """A sampling pass of its own: run the sampler with the quantized UNet and compare at every call.

    Returns per-step relative L2 error of the UNet output and its mean.
    """
    with UNetErrorMonitor(float_unet, quant_unet, timesteps_from_call, progress) as monitor, torch.no_grad():
        runner(quant_unet)
    return monitor.result()
