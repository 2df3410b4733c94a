"""Forge glue: the same accordion, tab and API as in A1111, on Forge's backend.

Forge's UNet is ``sd_model.forge_objects.unet.model.diffusion_model`` (its own ldm-layout UNet with
``ForgeOperations`` layers; the adapter reads their ``Linear`` by its attributes). The quantized layers
are swapped into that instance in ``process_before_every_sampling`` (after Forge has set up the job's
UnetPatcher) and put back after each batch. Forge merges LoRAs when it loads the model for sampling
(``LoraLoader.refresh``, by parameter path): the glue runs that refresh itself before swapping, so its
merge / restore reaches the float layers and Forge's own refresh during sampling finds nothing to do; the
quantized layers take the same LoRA set through ``forge_lora.py``. The file's fingerprint is checked on
the checkpoint's own weights (a LoRA merged by an earlier job is taken out first). Forge modules are
imported inside functions only.
"""
from __future__ import annotations

import sys
import threading

import torch

from . import a1111, common
from .forge_lora import FORGE_LAYER_KINDS, apply_lora_set

_active: "common.LayerSwap | None" = None
_lock = threading.Lock()
folder = a1111.folder


def unet_patcher(sd_model):
    return sd_model.forge_objects.unet


def deactivate() -> None:
    global _active
    if _active is not None:
        _active.restore()
        _active = None


def activate(p, choice) -> str | None:
    """Called from Script.process: records the infotext for a choice that can run. The checks that refuse a job
    run again in ``before_sampling``, on the UNet that samples (Forge may reload the model after ``process``)."""
    deactivate()
    if common.is_none(choice):
        return None
    try:
        a1111.refuse_unsupported(p)
        common.resolve_file(folder(), choice)
    except Exception:
        return None  # refused in before_sampling, with the message
    p.extra_generation_params[common.INFOTEXT_KEY] = str(choice)
    return str(choice)


def refuse(p, exc: Exception) -> None:
    """Make this job fail with ``exc`` at its first UNet call (``common.Refusal``; Forge only logs a script
    callback's exception and would sample the float model)."""
    global _active
    deactivate()
    print(f"FidelityQuant: job refused: {type(exc).__name__}: {exc}", file=sys.stderr)
    _active = common.Refusal(unet_patcher(p.sd_model).model.diffusion_model, exc)


def before_sampling(p, choice) -> None:
    """Swap the quantized layers in for this sampling pass (first pass and hires pass alike)."""
    deactivate()
    if common.is_none(choice):
        return
    try:
        a1111.refuse_unsupported(p)
        swap_in(p, choice)
    except Exception as exc:
        refuse(p, exc)


def swap_in(p, choice) -> None:
    global _active
    from backend.patcher.lora import merge_lora_to_weight

    patcher = unet_patcher(p.sd_model)
    path = common.resolve_file(folder(), choice)
    with _lock:
        loader = patcher.lora_loader
        if loader.backup or loader.online_backup:  # an earlier job's LoRA is in the float layers: take it out
            loader.refresh({}, offload_device=patcher.offload_device)
        unet = patcher.model.diffusion_model
        calibration, adapter = a1111.calibration_for(path, unet)  # fingerprint of the checkpoint's own weights
        patcher.refresh_loras()  # this job's LoRAs onto the float layers now; Forge's refresh later is a no-op
        runtime = a1111.runtime_for(calibration, unet, adapter, kinds=FORGE_LAYER_KINDS)
        apply_lora_set(runtime, patcher.lora_patches,
                       lambda patches, weight, key: merge_lora_to_weight(patches, weight, key,
                                                                        computation_dtype=torch.float32))
        _active = common.LayerSwap(unet, runtime, adapter.timesteps_from_call)


def after_batch(p) -> None:
    deactivate()


def calibrate(prompts: str, *args, **kwargs) -> tuple[str, str]:
    """Calibrate the loaded checkpoint's UNet with Forge's sampler; -> (file name, report)."""
    from modules import shared

    deactivate()
    patcher = shared.sd_model.forge_objects_original.unet  # the checkpoint's patcher, without this job's LoRAs
    patcher.refresh_loras()
    return a1111.calibrate_unet(shared.sd_model, patcher.model, prompts, *args, quantize_fn=quantize_cast_per_layer,
                                **kwargs)


def quantize_cast_per_layer(unet, runner, config, progress=None):
    """``quant_core.quantize`` without its uniform-dtype check: Forge's layers cast their weights per call (as
    ComfyUI's do), so a UNet with, e.g., fp16 storage and fp32 norms runs. Config and finite weights are checked."""
    from quant_core.calibrate.pipeline import quantize
    from quant_core.validate import check_config, check_finite_weights

    check_config(config)
    check_finite_weights(unet)
    return quantize(unet, runner, config, progress)
