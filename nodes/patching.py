"""ComfyUI glue: a quantized MODEL as a ModelPatcher clone, and a calibration runner on ComfyUI's sampler.

The input MODEL is never modified: the layers of a runtime built from the calibration (one runtime per
calibration and model object, ``runtime_for``) go in as object patches on a clone (ComfyUI applies them on
load and undoes them on unload), and a DIFFUSION_MODEL wrapper hands each UNet call's timestep (0..999;
APPLY_MODEL would see sigma) to that runtime for group routing.

LoRA and other weight patches on the quantized MODEL are merged by ComfyUI itself, once per load,
through the layers' convert_weight / set_weight (nodes/comfy_layers.py). An ON_LOAD callback tells
the runtime that the weights may have changed (comfy/model_patcher.py: ``load`` runs the ON_LOAD
callbacks after patching weights), so time tables are re-verified and layer input ranges checked
once, on the next call; the wrapper reports the check after that call.
"""
from __future__ import annotations

import uuid
import weakref

import torch

from quant_core.runtime.layer_base import QuantLayer

from .comfy_layers import COMFY_LAYER_KINDS

WRAPPER_KEY = "fidelityquant"


def diffusion_model_of(model):
    """The UNet a MODEL will run (honouring object patches already on it)."""
    return model.get_model_object("diffusion_model")


# One runtime per (model object, calibration): ComfyUI merges LoRAs into the layers in place and unpatches
# per model object, so two model objects (e.g. the checkpoint loaded again in fp16) never share layer objects.
_RUNTIMES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def runtime_for(calibration, base_model, timesteps_from_call=None):
    """The runtime (quantized layers + routing) of ``calibration`` on ``base_model`` (a MODEL's ``.model``)."""
    per_model = _RUNTIMES.setdefault(base_model, {})
    entry = per_model.get(id(calibration))
    if entry is None or entry[0]() is not calibration:
        if timesteps_from_call is None:
            raise KeyError("no FidelityQuant runtime for this calibration and model yet")
        entry = (weakref.ref(calibration), calibration.runtime(timesteps_from_call, kinds=COMFY_LAYER_KINDS))
        per_model[id(calibration)] = entry
    return entry[1]


def quantized_model(model, calibration):
    """A clone of ``model`` whose UNet runs ``calibration``'s quantized layers."""
    import comfy.model_management
    import comfy.patcher_extension

    unet = diffusion_model_of(model)
    # ComfyUI unpatches lazily: the shared UNet may still hold another clone's LoRA. The fingerprint
    # must see this MODEL's weights as calibration saw them: with its own patches applied (loaded as the
    # sampler would), or, without patches, the plain checkpoint (unload clones: nothing else in memory).
    if has_weight_patches(model):
        comfy.model_management.load_models_gpu([model])
    else:
        unload_clones_of(model.model)
    adapter = calibration.check_compatible(unet)
    runtime = runtime_for(calibration, model.model, adapter.timesteps_from_call)
    patched = model.clone()
    for name, module in runtime.replacements(unet).items():
        patched.add_object_patch(f"diffusion_model.{name}", module)
    # Weight patches already on the MODEL (order 2: LoRA -> Calibrate) are baked into the quantized
    # layers (the fingerprint check above proved the weights match): merging them again would double
    # them. Patches added after this node (order 1) are merged into the quantized layers as usual.
    for key in list(patched.patches):
        if key.startswith("diffusion_model.") and key[len("diffusion_model."):].rsplit(".", 1)[0] in runtime.layers:
            del patched.patches[key]
    fresh_weight_state(patched)

    def route_timestep(executor, *args, **kwargs):
        # begin/end_call also flush denormals on the sampling threads for this call only (runtime/denormals.py)
        runtime.begin_call(adapter.timesteps_from_call(args, kwargs), args[0] if args else kwargs.get("x"))
        try:
            return executor(*args, **kwargs)
        finally:
            runtime.end_call()

    def on_load(patcher, device_to, lowvram_model_memory, force_patch_weights, full_load):
        runtime.weights_changed(patched=has_weight_patches(patcher))
        runtime.prepare()  # prepack now (layers where their weights are), not in the first sampling step

    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, route_timestep)
    patched.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_LOAD, WRAPPER_KEY, on_load)
    return patched


def unload_clones_of(base_model) -> None:
    """Unpatch and unload every loaded MODEL built on ``base_model`` (ComfyUI unpatches lazily)."""
    import comfy.model_management as mm

    for index in reversed(range(len(mm.current_loaded_models))):
        patcher = mm.current_loaded_models[index].model
        if patcher is not None and patcher.model is base_model:
            mm.current_loaded_models.pop(index).model_unload()


def drop_patches_of_quantized_layers(patcher, unet) -> None:
    """Order 2 (LoRA -> Calibrate): the quantized layers were built from the LoRA-merged weights, so
    the MODEL's weight patches must not be merged into them again in the consistency and evaluation
    passes; patches on layers that stay float (shared with the float UNet) are kept."""
    for key in list(patcher.patches):
        if not key.startswith("diffusion_model."):
            continue
        owner = key[len("diffusion_model."):].rsplit(".", 1)[0]
        try:
            module = unet.get_submodule(owner)
        except AttributeError:
            continue
        if isinstance(module, QuantLayer):
            del patcher.patches[key]


def fresh_weight_state(patcher) -> None:
    """Give a clone that swaps modules by object patch its own ``patches_uuid``.

    A clone keeps its parent's uuid (comfy/model_patcher.py:289). Switching between two loaded
    clones with the same uuid skips unpatching and loading (``partially_load``, :867 and :876), so
    the modules that our object patches hide keep their ``comfy_patched_weights`` flags (cleared in
    ``unpatch_model`` only on the modules visible at that moment, :792, before object patches are
    undone, :796). A later LoRA on the float MODEL then finds its layers flagged as patched and
    skips them (:712): the LoRA is silently lost. Measured in tests/test_comfyui_lora.py. A fresh
    uuid makes every switch between the float and the quantized model unpatch and load properly.
    """
    patcher.patches_uuid = uuid.uuid4()


def has_weight_patches(patcher) -> bool:
    """Whether a MODEL changes UNet weights (LoRA, merges, weight wrappers) on load."""
    return any(key.startswith("diffusion_model.") and patches
               for key, patches in list(patcher.patches.items()) + list(patcher.weight_wrapper_patches.items()))


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
            drop_patches_of_quantized_layers(model, unet)
            fresh_weight_state(model)
        outputs = []
        for index, (positive, negative) in enumerate(self.conditionings):
            comfy.model_management.throw_exception_if_processing_interrupted()
            noise = comfy.sample.prepare_noise(self.latent, self.seed + index)
            outputs.append(comfy.sample.sample(model, noise, self.steps, self.cfg, self.sampler_name, self.scheduler,
                                               positive, negative, self.latent, disable_pbar=True,
                                               seed=self.seed + index))
        return outputs
