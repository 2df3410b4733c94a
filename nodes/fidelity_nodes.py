"""FidelityQuant nodes, category "FidelityQuant". Thin: the work is in quant_core.

Each node is declared once (``NodeSpec``: inputs, outputs, description) and does its work in one plain
function (``calibrate_and_quantize``, ``save_quantized``, ``load_quantized``, ``compare_images``).
Two front ends call them: the V1 classes below (``NODE_CLASS_MAPPINGS``, for ComfyUI without the V3
API) and the V3 nodes in ``v3_nodes.py``; the root ``__init__.py`` picks one at import time.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from quant_core import metrics
from quant_core.artifact import MissingDigestWarning, describe, load_result
from quant_core.calibration import Calibration
from quant_core.config import preset as make_preset
from quant_core.models.adapters import detect_adapter

from .host_model import check_weight_formats, host_model_line
from .inputs import check_calibrate_inputs, resolve_load, save_numbered
from .patching import ComfySamplerRunner, diffusion_model_of, quantized_model, runtime_for, unload_clones_of

CATEGORY = "FidelityQuant"
FOLDER = "fidelity_quant"
DEFAULT_PROMPTS = (Path(__file__).parent / "default_prompts.txt").read_text().strip()
QUANT_RESULT = "FQ_RESULT"
PRESETS = ["W8A8", "W4A8", "W4A8-mixed"]


def register_folder() -> None:
    import folder_paths

    if FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER))


@contextlib.contextmanager
def outside_inference_mode():
    """ComfyUI runs every node under ``torch.inference_mode()`` (execution.py:662). Tensors made there are
    inference tensors, which have no version counter, and quant_core's layers key their runtime caches
    on ``tensor._version``: build (and calibrate) quantized layers outside it, still without autograd."""
    with torch.inference_mode(False), torch.no_grad():
        yield


def pristine_unet(model):
    """``model``'s UNet with nothing applied to it, for calibration (whose sampling passes then load the
    MODEL as it runs). ComfyUI undoes a loaded clone's object patches (e.g. a quantized MODEL's layers)
    and merged LoRA weights only lazily, when it loads another clone or frees memory, so the shared
    module may still carry them: unload the loaded clones first (other models stay loaded)."""
    unload_clones_of(model.model)
    return diffusion_model_of(model)


def unet_as_run_by(model):
    """``model``'s UNet as ``model`` runs it (its own patches merged, other clones' undone), for checking a
    saved file's fingerprint: loading a clone undoes the previous one's patches first (partially_load,
    comfy/model_patcher.py:865-874). ``quantized_model`` loads the same way before its own check."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([model])
    return diffusion_model_of(model)


# --- the work: plain functions shared by the V1 and V3 nodes --------------------------------------------

def calibrate_and_quantize(model, clip, prompts, negative, steps, cfg, sampler_name, scheduler, width, height,
                           seed, preset, timestep_groups, bits_budget, consistency_pass, memory_limit_mb):
    """-> (quantized MODEL, Calibration, report). The input MODEL is not modified."""
    import comfy.model_management
    import comfy.utils

    from quant_core.calibrate.pipeline import quantize
    from quant_core.validate import check_finite_weights

    # Server side: a graph posted to the API may carry any values, whatever the widgets allow.
    lines = check_calibrate_inputs(prompts, negative, steps, cfg, width, height, seed, preset, timestep_groups,
                                   bits_budget, memory_limit_mb)
    encode = lambda text: clip.encode_from_tokens_scheduled(clip.tokenize(text))  # noqa: E731
    negative_cond = encode(negative)
    runner = ComfySamplerRunner(model, [(encode(p), negative_cond) for p in lines], steps, cfg, sampler_name,
                                scheduler, width, height, seed)
    options = {"timestep_groups": timestep_groups, "consistency_pass": consistency_pass,
               "memory_limit_mb": memory_limit_mb}
    if preset == "W4A8-mixed":
        options["bits_budget"] = bits_budget
    bar = comfy.utils.ProgressBar(1)

    def progress(done, total):
        bar.update_absolute(done, total)
        comfy.model_management.throw_exception_if_processing_interrupted()

    with outside_inference_mode():
        unet = pristine_unet(model)
        check_finite_weights(unet)  # ComfyUI casts weights per layer, so mixed dtypes are fine here
        check_weight_formats(unet, detect_adapter(unet).quantizable_layers(unet))
        calibration = quantize(unet, runner, make_preset(preset, **options), progress=progress)
        patched = quantized_model(model, calibration)
        return patched, calibration, calibration.summary() + host_model_line(model) + kernel_line(model, calibration)


def save_quantized(quant_result, filename) -> str:
    """Write ``models/fidelity_quant/<filename>.safetensors`` (numbered, never overwritten); -> message."""
    import folder_paths

    if not isinstance(quant_result, Calibration):
        raise ValueError("FidelityQuant: quant_result must come from Calibrate & Quantize "
                         f"(got {type(quant_result).__name__})")
    register_folder()
    path = save_numbered(quant_result, folder_paths.get_folder_paths(FOLDER)[0], filename)
    getattr(folder_paths, "filename_list_cache", {}).pop(FOLDER, None)  # the Load node's list shows the new file at once
    return f"saved {path.name}"


def load_quantized(model, file):
    """-> (quantized MODEL, report); raises IncompatibleModelError for a file made for another model."""
    import folder_paths

    register_folder()
    path = resolve_load(folder_paths.get_folder_paths(FOLDER), file)
    with outside_inference_mode(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MissingDigestWarning)
        unet = unet_as_run_by(model)
        check_weight_formats(unet, detect_adapter(unet).quantizable_layers(unet))
        calibration = load_result(path, unet)
        report = describe(calibration) + host_model_line(model)
        if any(issubclass(w.category, MissingDigestWarning) for w in caught):
            report += ("\nnote: this file has no integrity digest (saved by FidelityQuant 0.1.0), so its data were "
                       "not checked for damage; save it again to add one")
        patched = quantized_model(model, calibration)
        return patched, report + kernel_line(model, calibration)


def kernel_line(model, calibration) -> str:
    """The report line naming the kernels the quantized layers run here (and why, on CPU)."""
    return "\n" + runtime_for(calibration, model.model).kernel_summary(getattr(model, "load_device", None))


def compare_images(reference, images):
    """-> (report with PSNR / SSIM per image and mean, 4x amplified difference IMAGE)."""
    a, b = reference.movedim(-1, 1).float(), images.movedim(-1, 1).float()  # IMAGE is (B, H, W, C)
    if a.shape != b.shape:
        raise ValueError(f"FidelityQuant: images differ in size/batch: {tuple(reference.shape)} vs {tuple(images.shape)}")
    psnr, ssim = metrics.psnr(b, a).clamp(max=99), metrics.ssim(b, a)
    lines = [f"image {i}: PSNR {p:.2f} dB, SSIM {s:.4f}" for i, (p, s) in enumerate(zip(psnr.tolist(), ssim.tolist()))]
    lines.append(f"mean: PSNR {psnr.mean():.2f} dB, SSIM {ssim.mean():.4f}")
    difference = ((images - reference).abs() * 4).clamp(0, 1)
    return "\n".join(lines), difference


# --- one declaration per node, read by both APIs -------------------------------------------------------

@dataclass(frozen=True)
class NodeSpec:
    node_id: str
    display_name: str
    description: str
    inputs: Callable[[], list]  # -> [(name, type or list of options, options dict)]; called lazily (needs ComfyUI)
    outputs: tuple = ()         # ((type, name, tooltip), ...)
    output_node: bool = False


def _calibrate_inputs():
    import comfy.samplers

    return [
        ("model", "MODEL", {"tooltip": "the float model to quantize (left unchanged)"}),
        ("clip", "CLIP", {"tooltip": "encodes the calibration prompts"}),
        ("prompts", "STRING", {"multiline": True, "default": DEFAULT_PROMPTS,
                               "tooltip": "calibration prompts, one per line; each is sampled once"}),
        ("negative", "STRING", {"multiline": True, "default": "", "tooltip": "negative prompt for every sample"}),
        ("steps", "INT", {"default": 20, "min": 1, "max": 200,
                          "tooltip": "sampling steps per calibration prompt (use what you will sample with)"}),
        ("cfg", "FLOAT", {"default": 7.0, "min": 0.0, "max": 30.0, "step": 0.1}),
        ("sampler_name", comfy.samplers.KSampler.SAMPLERS, {}),
        ("scheduler", comfy.samplers.KSampler.SCHEDULERS, {}),
        ("width", "INT", {"default": 512, "min": 64, "max": 4096, "step": 8}),
        ("height", "INT", {"default": 512, "min": 64, "max": 4096, "step": 8}),
        # Fixed by default: a randomized seed would recalibrate on every queue.
        ("seed", "INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "control_after_generate": False,
                         "tooltip": "noise seed of the first prompt (prompt i uses seed + i)"}),
        ("preset", PRESETS, {"tooltip": "W8A8: int8 weights; W4A8: int4 weights; W4A8-mixed: int4 with the most "
                                        "sensitive layers promoted to int8 within bits_budget"}),
        ("timestep_groups", "INT", {"default": 4, "min": 1, "max": 16,
                                    "tooltip": "activation scales per layer, one per group of timesteps"}),
        # min 4.25: the engine needs an average above the 4-bit base (the smallest such value on the 0.25 grid)
        ("bits_budget", "FLOAT", {"default": 4.5, "min": 4.25, "max": 16.0, "step": 0.25,
                                  "tooltip": "average weight bits (W4A8-mixed only)"}),
        ("consistency_pass", "BOOLEAN", {"default": True, "tooltip": "refit activation scales on the quantized "
                                                                     "model's own trajectory (one more sampling pass)"}),
        ("memory_limit_mb", "INT", {"default": 256, "min": 16, "max": 16384,
                                    "tooltip": "memory for captured layer inputs"}),
    ]


def _load_inputs():
    import folder_paths

    register_folder()
    return [("model", "MODEL", {"tooltip": "the same checkpoint the file was calibrated on"}),
            ("file", folder_paths.get_filename_list(FOLDER), {"tooltip": "a file in models/fidelity_quant"})]


CALIBRATE = NodeSpec(
    "FidelityQuantCalibrate", "Calibrate & Quantize (FidelityQuant)",
    "Samples the calibration prompts with ComfyUI's sampler, fits int8/int4 scales per layer and timestep group, "
    "and returns a quantized copy of the MODEL (the input MODEL is not modified).",
    _calibrate_inputs,
    (("MODEL", "model", "quantized MODEL: plug into KSampler"),
     (QUANT_RESULT, "quant_result", "for Save Quantized UNet"),
     ("STRING", "report", "calibration report")))
SAVE = NodeSpec(
    "FidelityQuantSave", "Save Quantized UNet (FidelityQuant)",
    "Writes the quantization result to models/fidelity_quant/<filename>.safetensors (numbered, never overwritten).",
    lambda: [("quant_result", QUANT_RESULT, {}),
             ("filename", "STRING", {"default": "fidelityquant", "tooltip": "file name, without folders"})],
    (), output_node=True)
LOAD = NodeSpec(
    "FidelityQuantLoad", "Load Quantized UNet (FidelityQuant)",
    "Applies a saved quantization result to the MODEL it was made for, without calibrating.",
    _load_inputs,
    (("MODEL", "model", "quantized MODEL"), ("STRING", "report", "report of the loaded file")))
COMPARE = NodeSpec(
    "FidelityQuantCompare", "Compare Images (FidelityQuant)",
    "PSNR and SSIM of each image against its reference, and a 4x amplified difference image.",
    lambda: [("reference", "IMAGE", {"tooltip": "e.g. the float model's images"}),
             ("images", "IMAGE", {"tooltip": "e.g. the quantized model's images, same seed and size"})],
    (("STRING", "report", "PSNR / SSIM per image and mean"), ("IMAGE", "difference", "|images - reference| x 4")),
    output_node=True)
SPECS = (CALIBRATE, SAVE, LOAD, COMPARE)


def _v1_input_types(spec: NodeSpec) -> dict:
    return {"required": {name: (kind, opts) if opts else (kind,) for name, kind, opts in spec.inputs()}}


# --- V1 node API ------------------------------------------------------------------------------------------

class _V1Node:
    SPEC: NodeSpec
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        return _v1_input_types(cls.SPEC)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.RETURN_TYPES = tuple(kind for kind, _, _ in cls.SPEC.outputs)
        cls.RETURN_NAMES = tuple(name for _, name, _ in cls.SPEC.outputs)
        cls.OUTPUT_TOOLTIPS = tuple(tip for _, _, tip in cls.SPEC.outputs)
        cls.OUTPUT_NODE = cls.SPEC.output_node
        cls.DESCRIPTION = cls.SPEC.description


class CalibrateAndQuantize(_V1Node):
    """Calibrate on the real sampler's trajectory and return a quantized MODEL (the input is not modified)."""
    SPEC = CALIBRATE
    FUNCTION = "run"

    def run(self, **inputs):
        model, result, report = calibrate_and_quantize(**inputs)
        return {"ui": {"text": [report]}, "result": (model, result, report)}


class SaveQuantizedUNet(_V1Node):
    SPEC = SAVE
    FUNCTION = "save"

    def save(self, quant_result, filename):
        return {"ui": {"text": [save_quantized(quant_result, filename)]}}


class LoadQuantizedUNet(_V1Node):
    SPEC = LOAD
    FUNCTION = "load_with_report"  # ComfyUI calls this; ``load`` keeps returning the plain tuple

    def load(self, model, file):
        return load_quantized(model, file)

    def load_with_report(self, model, file):
        model, report = load_quantized(model, file)
        return {"ui": {"text": [report]}, "result": (model, report)}


class CompareImages(_V1Node):
    SPEC = COMPARE
    FUNCTION = "compare"

    def compare(self, reference, images):
        report, difference = compare_images(reference, images)
        return {"ui": {"text": [report]}, "result": (report, difference)}


NODE_CLASS_MAPPINGS = {cls.SPEC.node_id: cls for cls in (CalibrateAndQuantize, SaveQuantizedUNet, LoadQuantizedUNet,
                                                          CompareImages)}
NODE_DISPLAY_NAME_MAPPINGS = {spec.node_id: spec.display_name for spec in SPECS}
