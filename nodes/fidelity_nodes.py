"""FidelityQuant nodes (ComfyUI V1 node API, category "FidelityQuant"). Thin: the work is in quant_core."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from quant_core import metrics
from quant_core.artifact import load_result, save_result
from quant_core.config import preset as make_preset

from .patching import ComfySamplerRunner, diffusion_model_of, quantized_model

CATEGORY = "FidelityQuant"
FOLDER = "fidelity_quant"
DEFAULT_PROMPTS = (Path(__file__).parent / "default_prompts.txt").read_text().strip()
QUANT_RESULT = "FQ_RESULT"


def register_folder() -> None:
    import folder_paths

    if FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER))


class CalibrateAndQuantize:
    """Calibrate on the real sampler's trajectory and return a quantized MODEL (the input is not modified)."""

    @classmethod
    def INPUT_TYPES(cls):
        import comfy.samplers

        return {"required": {
            "model": ("MODEL",),
            "clip": ("CLIP",),
            "prompts": ("STRING", {"multiline": True, "default": DEFAULT_PROMPTS,
                                   "tooltip": "calibration prompts, one per line"}),
            "negative": ("STRING", {"multiline": True, "default": ""}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 200}),
            "cfg": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 30.0, "step": 0.1}),
            "sampler_name": (comfy.samplers.KSampler.SAMPLERS,),
            "scheduler": (comfy.samplers.KSampler.SCHEDULERS,),
            "width": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 8}),
            "height": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 8}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF}),
            "preset": (["W8A8", "W4A8", "W4A8-mixed"],),
            "timestep_groups": ("INT", {"default": 4, "min": 1, "max": 16}),
            "bits_budget": ("FLOAT", {"default": 4.5, "min": 4.0, "max": 16.0, "step": 0.25,
                                      "tooltip": "average weight bits (W4A8-mixed only)"}),
            "consistency_pass": ("BOOLEAN", {"default": True}),
            "memory_limit_mb": ("INT", {"default": 256, "min": 16, "max": 16384}),
        }}

    RETURN_TYPES = ("MODEL", QUANT_RESULT, "STRING")
    RETURN_NAMES = ("model", "quant_result", "report")
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, model, clip, prompts, negative, steps, cfg, sampler_name, scheduler, width, height, seed,
            preset, timestep_groups, bits_budget, consistency_pass, memory_limit_mb):
        import comfy.model_management
        import comfy.utils

        from quant_core.quantize import quantize

        lines = [p.strip() for p in prompts.splitlines() if p.strip()]
        if not lines:
            raise ValueError("FidelityQuant: give at least one calibration prompt (one per line)")
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

        result = quantize(diffusion_model_of(model), runner, make_preset(preset, **options), progress=progress)
        report = result.summary()
        return {"ui": {"text": [report]}, "result": (quantized_model(model, result), result, report)}


class SaveQuantizedUNet:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"quant_result": (QUANT_RESULT,),
                             "filename": ("STRING", {"default": "fidelityquant"})}}

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"
    CATEGORY = CATEGORY

    def save(self, quant_result, filename):
        import folder_paths

        register_folder()
        stem = Path(filename).stem or "fidelityquant"
        if Path(filename).name != filename or stem.startswith("."):
            raise ValueError(f"FidelityQuant: {filename!r} must be a plain file name (no folders)")
        folder = folder_paths.get_folder_paths(FOLDER)[0]
        path = Path(folder) / f"{stem}.safetensors"
        counter = 1
        while path.exists():  # never overwrite silently: number new files instead
            path = Path(folder) / f"{stem}_{counter:05d}.safetensors"
            counter += 1
        save_result(quant_result, path)
        return {"ui": {"text": [f"saved {path.name}"]}}


class LoadQuantizedUNet:
    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        register_folder()
        return {"required": {"model": ("MODEL",), "file": (folder_paths.get_filename_list(FOLDER),)}}

    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "report")
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, model, file):
        import folder_paths

        register_folder()
        result = load_result(folder_paths.get_full_path_or_raise(FOLDER, file), diffusion_model_of(model))
        return (quantized_model(model, result), result.summary())


class CompareImages:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"reference": ("IMAGE",), "images": ("IMAGE",)}}

    RETURN_TYPES = ("STRING", "IMAGE")
    RETURN_NAMES = ("report", "difference")
    FUNCTION = "compare"
    CATEGORY = CATEGORY

    def compare(self, reference, images):
        a, b = reference.movedim(-1, 1).float(), images.movedim(-1, 1).float()  # IMAGE is (B, H, W, C)
        if a.shape != b.shape:
            raise ValueError(f"FidelityQuant: images differ in size/batch: {tuple(reference.shape)} vs {tuple(images.shape)}")
        psnr, ssim = metrics.psnr(b, a).clamp(max=99), metrics.ssim(b, a)
        lines = [f"image {i}: PSNR {p:.2f} dB, SSIM {s:.4f}" for i, (p, s) in enumerate(zip(psnr.tolist(), ssim.tolist()))]
        lines.append(f"mean: PSNR {psnr.mean():.2f} dB, SSIM {ssim.mean():.4f}")
        difference = ((images - reference).abs() * 4).clamp(0, 1)
        report = "\n".join(lines)
        return {"ui": {"text": [report]}, "result": (report, difference)}


NODE_CLASS_MAPPINGS = {
    "FidelityQuantCalibrate": CalibrateAndQuantize,
    "FidelityQuantSave": SaveQuantizedUNet,
    "FidelityQuantLoad": LoadQuantizedUNet,
    "FidelityQuantCompare": CompareImages,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FidelityQuantCalibrate": "Calibrate & Quantize (FidelityQuant)",
    "FidelityQuantSave": "Save Quantized UNet (FidelityQuant)",
    "FidelityQuantLoad": "Load Quantized UNet (FidelityQuant)",
    "FidelityQuantCompare": "Compare Images (FidelityQuant)",
}
