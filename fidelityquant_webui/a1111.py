"""AUTOMATIC1111 glue: the quantized UNet for one job, calibration on A1111's own sampler, the API routes.

The UNet is ``sd_model.model.diffusion_model`` (ldm ``UNetModel``). For a job with a file chosen, its
quantized layers are swapped into that instance (``common.LayerSwap``) in ``Script.process`` and put back
in ``postprocess`` (and at the start of the next job, should a job have failed in between), so "None"
runs the float modules themselves. A1111 modules are imported inside the functions only.
"""
from __future__ import annotations

import os
import sys
import threading
import weakref
from contextlib import closing

import torch

from quant_core import load as load_result
from quant_core import quantize
from quant_core import save as save_result

from . import common
from .a1111_lora import A1111_LAYER_KINDS, copy_network_name, wanted_networks

_active: "common.LayerSwap | None" = None
_files: dict = {}  # path -> ((mtime_ns, size), Calibration): the last file read
_runtimes: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # UNet -> (weakref(calibration), runtime)
_lock = threading.Lock()


def folder() -> str:
    from modules import paths

    return os.path.join(paths.models_path, common.FOLDER_NAME)


def unet_of(sd_model):
    return sd_model.model.diffusion_model


def deactivate() -> None:
    """Put the float layers back (no-op when nothing is swapped in)."""
    global _active
    if _active is not None:
        _active.restore()
        _active = None


def restore_lora_weights(unet) -> None:
    """A1111's Lora extension leaves a LoRA merged into float weights until the next forward without it;
    put those weights back from its backups (as that extension would) so the fingerprint sees the checkpoint."""
    networks = sys.modules.get("networks")
    if networks is None:
        return
    with torch.no_grad():  # that extension restores in place (copy_ into the parameters), as in its forward
        for module in unet.modules():
            if getattr(module, "network_current_names", ()) != ():
                networks.network_restore_weights_from_backup(module)
                module.network_current_names = ()


def calibration_for(path: str, unet):
    """(Calibration, adapter) of the file at ``path``; refuses a file made for another checkpoint."""
    stat = os.stat(path)
    key = (stat.st_mtime_ns, stat.st_size)
    entry = _files.get(path)
    if entry is None or entry[0] != key:
        _files.clear()
        _files[path] = (key, load_result(path))
    calibration = _files[path][1]
    return calibration, calibration.check_compatible(unet)


def runtime_for(calibration, unet, adapter, kinds=A1111_LAYER_KINDS):
    entry = _runtimes.get(unet)
    if entry is None or entry[0]() is not calibration:
        device = next(unet.parameters()).device
        with torch.inference_mode(False):
            runtime = calibration.runtime(adapter.timesteps_from_call, kinds=kinds, device=device)
        entry = (weakref.ref(calibration), runtime)
        _runtimes[unet] = entry
    return entry[1]


def lora_watch(runtime):
    """-> on_call: tells the runtime once per change of the LoRA set that the weights changed (time tables are
    re-verified, layer input ranges checked once; see QuantizedModel.weights_changed)."""
    seen = {"networks": ()}

    def on_call():
        networks = sys.modules.get("networks")
        wanted = wanted_networks(networks) if networks is not None else ()
        if wanted != seen["networks"]:
            seen["networks"] = wanted
            runtime.weights_changed(patched=bool(wanted))
    return on_call


def refuse_unsupported(p) -> None:
    """Settings that would load another checkpoint into the UNet mid-job are refused before anything runs."""
    if str(getattr(p, "refiner_checkpoint", None) or "None") not in ("None", "none", ""):
        raise ValueError("FidelityQuant: a refiner checkpoint loads other weights into the UNet during the job; "
                         "choose 'None' for FidelityQuant or turn the refiner off")
    hr = getattr(p, "hr_checkpoint_name", None)
    if getattr(p, "enable_hr", False) and hr not in (None, "", "Use same checkpoint"):
        raise ValueError("FidelityQuant: a hires-fix checkpoint loads other weights into the UNet during the job; "
                         "use the same checkpoint for hires fix, or choose 'None' for FidelityQuant")


def activate(p, choice) -> str | None:
    """Swap the chosen file's quantized layers into ``p.sd_model``'s UNet for this job; -> the file name.

    A choice that cannot run (unknown or damaged file, another checkpoint's file, unsupported settings) makes the
    job fail with the message at its first UNet call (``common.Refusal``) instead of sampling the float model."""
    global _active
    deactivate()
    if common.is_none(choice):
        return None
    unet = unet_of(p.sd_model)
    try:
        refuse_unsupported(p)
        path = common.resolve_file(folder(), choice)
        with _lock:
            restore_lora_weights(unet)
            calibration, adapter = calibration_for(path, unet)
            runtime = runtime_for(calibration, unet, adapter)
            _active = common.LayerSwap(unet, runtime, adapter.timesteps_from_call, before_swap=copy_network_name,
                                       on_call=lora_watch(runtime))
    except Exception as exc:
        refuse(unet, exc)
        return None
    p.extra_generation_params[common.INFOTEXT_KEY] = str(choice)
    return str(choice)


def refuse(unet, exc: Exception) -> None:
    """Make this job fail with ``exc`` at its first UNet call (see ``common.Refusal``); logs it once now."""
    global _active
    deactivate()
    print(f"FidelityQuant: job refused: {type(exc).__name__}: {exc}", file=sys.stderr)
    _active = common.Refusal(unet, exc)


# ---------------------------------------------------------------------------- calibration

class CalibrationInterrupted(RuntimeError):
    pass


def check_interrupt() -> None:
    from modules import shared

    state = shared.state
    if state.interrupted or getattr(state, "stopping_generation", False):
        raise CalibrationInterrupted("FidelityQuant: calibration interrupted; nothing was written and the "
                                     "model is unchanged")


class A1111Runner:
    """quant_core's Runner on A1111's own sampler: ``processing.process_images`` with a txt2img job per prompt
    (prompt i uses seed + i), with the given UNet put in ``sd_model.model.diffusion_model`` for the run."""

    def __init__(self, sd_model, prompts: list, negative: str, steps: int, cfg: float, sampler_name: str,
                 width: int, height: int, seed: int, unet_holder=None) -> None:
        self.holder = unet_holder if unet_holder is not None else sd_model.model  # has .diffusion_model
        self.sd_model, self.prompts, self.negative = sd_model, prompts, negative
        self.steps, self.cfg, self.sampler_name = int(steps), float(cfg), sampler_name
        self.width, self.height, self.seed = int(width), int(height), int(seed)
        self.total_unet_calls = len(prompts) * self.steps  # cond + uncond in one call per step (1st-order samplers)

    def __call__(self, unet):
        wrapper = self.holder
        original = wrapper.diffusion_model
        if unet is not original:
            wrapper.diffusion_model = unet
        try:
            with common.unet_outside_inference_mode(unet):
                self.sample_prompts()
        finally:
            wrapper.diffusion_model = original

    def sample_prompts(self) -> None:
        from modules import processing

        for index, prompt in enumerate(self.prompts):
            check_interrupt()
            p = processing.StableDiffusionProcessingTxt2Img(
                sd_model=self.sd_model, prompt=prompt, negative_prompt=self.negative, seed=self.seed + index,
                steps=self.steps, cfg_scale=self.cfg, sampler_name=self.sampler_name, width=self.width,
                height=self.height, do_not_save_samples=True, do_not_save_grid=True)
            with closing(p):
                processing.process_images(p)
            check_interrupt()


def calibrate(prompts: str, *args, **kwargs) -> tuple[str, str]:
    """Calibrate the loaded checkpoint's UNet and write a file; -> (file name, report). Caller holds the queue lock."""
    from modules import shared

    return calibrate_unet(shared.sd_model, shared.sd_model.model, prompts, *args, **kwargs)


def calibrate_unet(sd_model, holder, prompts: str, negative: str = "", steps: int = 20, cfg: float = 7.0,
                   sampler_name: str = "Euler", width: int = 512, height: int = 512, seed: int = 0,
                   preset: str = "W8A8", timestep_groups: int = 4, bits_budget: float = 4.5,
                   consistency_pass: bool = True, memory_limit_mb: int = 256,
                   filename: str = "fidelityquant", quantize_fn=None) -> tuple[str, str]:
    """Calibrate ``holder.diffusion_model`` (the UNet ``sd_model`` samples with) on the host's sampler.

    ``quantize_fn``: default ``quant_core.quantize`` (checks the config, a uniform weight dtype and finite
    weights first); Forge passes its own, because its layers cast weights per call."""
    from modules import shared

    lines, steps, width, height, seed = common.check_calibration_inputs(prompts, negative, steps, cfg, width,
                                                                        height, seed)
    config = common.make_config(preset, timestep_groups, bits_budget, consistency_pass, memory_limit_mb)
    out = common.output_path(folder(), filename)
    deactivate()
    unet = holder.diffusion_model
    restore_lora_weights(unet)
    runner = A1111Runner(sd_model, lines, negative, steps, cfg, sampler_name, width, height, seed, holder)
    shared.state.begin(job="FidelityQuant calibration")
    shared.state.job_count = 2 * len(lines)  # at least capture + consistency; corrected by the first progress call
    shared.state.textinfo = "FidelityQuant: calibrating"

    def progress(done, total):
        shared.state.job_count = max(1, -(-int(total) // max(1, steps)))  # one job per prompt per sampling pass
        shared.state.textinfo = f"FidelityQuant: {done}/{total} UNet calls"
        check_interrupt()

    try:
        with torch.no_grad():
            calibration = (quantize_fn or quantize)(unet, runner, config, progress=progress)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        save_result(calibration, out)
    finally:
        shared.state.end()
    return os.path.relpath(out, folder()).replace(os.sep, "/"), calibration.summary()
