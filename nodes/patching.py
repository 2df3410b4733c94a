"""ComfyUI glue: a quantized MODEL as a ModelPatcher clone, and a calibration runner on ComfyUI's sampler.

The input MODEL is never modified: quantized layers and time lookups go in as object patches on a
clone (ComfyUI applies them on load and undoes them on unload), and a DIFFUSION_MODEL wrapper hands
each UNet call's timestep (0..999; APPLY_MODEL would see sigma) to the result for group routing.
"""
from __future__ import annotations

import torch

WRAPPER_KEY = "fidelityquant"


def diffusion_model_of(model):
    """The UNet a MODEL will run (honouring object patches already on it)."""
    return model.get_model_object("diffusion_model")


def quantized_model(model, result):
    """A clone of ``model`` whose UNet runs ``result``'s quantized layers."""
    import comfy.patcher_extension

    from quant_core.adapters import detect_adapter

    unet = diffusion_model_of(model)
    result.check_compatible(unet)
    adapter = detect_adapter(unet)
    patched = model.clone()
    for name, module in result.replacements(unet).items():
        patched.add_object_patch(f"diffusion_model.{name}", module)

    def route_timestep(executor, *args, **kwargs):
        result.set_timesteps(adapter.timesteps_from_call(args, kwargs))
        return executor(*args, **kwargs)

    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, route_timestep)
    return patched


class ComfySamplerRunner:
    """Calibration runner: samples every prompt with ComfyUI's own sampler, with a given UNet swapped in.

    ``runner(unet)`` clones the MODEL and, when ``unet`` is not the MODEL's own UNet (the quantized
    model of the consistency and evaluation passes), object-patches ``diffusion_model`` with it.
    Checks for a user cancel between prompts (ComfyUI's progress hook also checks on every update).
    """

    def __init__(self, model, conditionings: list, steps: int, cfg: float, sampler_name: str, scheduler: str,
                 width: int, height: int, seed: int) -> None:
        if not conditionings:
            raise ValueError("no calibration prompts: give at least one prompt, one per line")
        self.model, self.conditionings = model, conditionings
        self.steps, self.cfg, self.sampler_name, self.scheduler = steps, cfg, sampler_name, scheduler
        self.latent = torch.zeros(1, 4, height // 8, width // 8)
        self.seed = seed
        self.total_unet_calls = len(conditionings) * steps  # one batched cond+uncond call per step (1st-order samplers)

    def __call__(self, unet):
        import comfy.model_management
        import comfy.sample

        model = self.model.clone()
        if unet is not diffusion_model_of(self.model):
            model.add_object_patch("diffusion_model", unet)
        outputs = []
        for index, (positive, negative) in enumerate(self.conditionings):
            comfy.model_management.throw_exception_if_processing_interrupted()
            noise = comfy.sample.prepare_noise(self.latent, self.seed + index)
            outputs.append(comfy.sample.sample(model, noise, self.steps, self.cfg, self.sampler_name, self.scheduler,
                                               positive, negative, self.latent, disable_pbar=True,
                                               seed=self.seed + index))
        return outputs
