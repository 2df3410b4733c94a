"""Forge glue: the same accordion, tab and API as in A1111, on Forge's backend.

Forge's UNet is ``sd_model.forge_objects.unet.model.diffusion_model`` (its own ldm-layout UNet with
``ForgeOperations`` layers; the adapter reads their ``Linear`` by its attributes). The quantized layers
are swapped into that instance in ``process_before_every_sampling`` (after Forge has set up the job's
UnetPatcher) and put back after each batch. Forge merges LoRAs when it loads the model for sampling
(``LoraLoader.refresh``, by parameter path): the glue runs that refresh itself before swapping, so its
restore of an earlier job's LoRA reaches the float layers, and refuses a LoRA together with a quantized
file (Forge's LoRA on quantized layers is not done yet). Forge modules are imported inside functions only.
"""
from __future__ import annotations

import threading

from . import a1111, common

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
    """Called from Script.process: checks the choice early (clear errors before sampling), records infotext."""
    deactivate()
    if common.is_none(choice):
        return None
    a1111.refuse_unsupported(p)
    common.resolve_file(folder(), choice)
    p.extra_generation_params[common.INFOTEXT_KEY] = str(choice)
    return str(choice)


def before_sampling(p, choice) -> None:
    """Swap the quantized layers in for this sampling pass (first pass and hires pass alike)."""
    global _active
    deactivate()
    if common.is_none(choice):
        return
    patcher = unet_patcher(p.sd_model)
    if patcher.lora_patches:
        raise ValueError("FidelityQuant: LoRA on a quantized UNet is not supported in Forge yet; remove the "
                         "<lora:...> tags or choose 'None' for FidelityQuant")
    path = common.resolve_file(folder(), choice)
    with _lock:
        patcher.refresh_loras()  # restores an earlier job's LoRA onto the float layers now, not after the swap
        unet = patcher.model.diffusion_model
        calibration, adapter = a1111.calibration_for(path, unet)
        runtime = a1111.runtime_for(calibration, unet, adapter, kinds=None)
        _active = common.LayerSwap(unet, runtime, adapter.timesteps_from_call)


def after_batch(p) -> None:
    deactivate()


def calibrate(prompts: str, *args, **kwargs) -> tuple[str, str]:
    """Calibrate the loaded checkpoint's UNet with Forge's sampler; -> (file name, report)."""
    from modules import shared

    deactivate()
    patcher = shared.sd_model.forge_objects_original.unet  # the checkpoint's patcher, without this job's LoRAs
    patcher.refresh_loras()
    return a1111.calibrate_unet(shared.sd_model, patcher.model, prompts, *args, **kwargs)
