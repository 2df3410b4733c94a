"""Model-level fidelity: UNet-output error of the quantized model vs the float model, step by step."""
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


def evaluate_unet_error(float_unet: nn.Module, quant_unet: nn.Module, runner, timesteps_from_call,
                        progress=None) -> dict:
    """Run the sampler with the quantized UNet; at every call compare with the float UNet on the same input.

    Returns per-step relative L2 error of the UNet output and its mean.
    """
    per_step: dict = {}
    calls = [0]

    def hook(module, args, kwargs, output):
        with torch.no_grad():
            reference = _output_tensor(float_unet(*args, **kwargs)).float()
            diff = (_output_tensor(output).float() - reference).norm() / reference.norm().clamp_min(1e-12)
        key = timestep_key(timesteps_from_call(args, kwargs).reshape(-1)[0])
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
