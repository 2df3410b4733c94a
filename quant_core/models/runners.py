"""Calibration runners: the :class:`Runner` protocol, and one for diffusers pipelines (used by the Python
library and ``python -m quant_core quantize``). Hosts bring their own (ComfyUI: ``nodes/patching.py``).

A *runner* is a callable ``runner(unet)`` that samples the calibration prompts with the UNet it is given,
step by step, exactly as inference does; quant_core's hooks on that UNet record what each layer sees.

diffusers and transformers are imported lazily inside the functions here, so ``quant_core`` itself imports
without them (ComfyUI / A1111 supply their own samplers and never import this module).
"""
from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path

from typing import Protocol, runtime_checkable

import torch

SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


@runtime_checkable
class Runner(Protocol):
    """What ``quantize()`` needs from a sampler.

    ``runner(unet)`` samples every calibration prompt with ``unet`` (the float UNet, or a quantized clone
    of it in later passes), step by step as inference does; the return value is not used. It must call
    the UNet it is given and leave it unmodified. It may raise to cancel (e.g. a host's interrupt).

    ``steps``: sampling steps per prompt (sizes the capture memory per timestep).
    ``total_unet_calls``: UNet calls in one ``runner(unet)`` (drives the progress bar; 0 if unknown).
    """

    steps: int
    total_unet_calls: int

    def __call__(self, unet) -> object:
        ...


class DiffusersRunner:
    """Samples a diffusers pipeline over calibration prompts with a given UNet swapped in.

    ``runner(unet)`` sets ``pipe.unet = unet`` for the duration of the run (the original UNet is put back
    in a ``finally``, also when sampling raises), then calls the pipeline once per batch of ``batch_size``
    prompts with ``num_inference_steps=steps``, ``guidance_scale``, ``height`` / ``width`` and a CPU
    ``torch.Generator`` seeded with ``seed + batch index`` (so a run is reproducible and independent of the
    device), under ``torch.no_grad()``. It returns the final latents of each batch (``output_type="latent"``);
    :meth:`images` does the same sampling and returns the decoded images in [0, 1].

    How the pipeline calls the UNet (StableDiffusionPipeline / StableDiffusionXLPipeline, diffusers 0.42):
    ``unet(latent_model_input, t, encoder_hidden_states=prompt_embeds, timestep_cond=..., cross_attention_kwargs=...,
    added_cond_kwargs=..., return_dict=False)``: sample and timestep *positional* (``t`` is a 0-d tensor, one
    element of ``scheduler.timesteps``), once per scheduler timestep. With classifier-free guidance
    (``guidance_scale > 1``) the unconditional and conditional halves are concatenated into one call of batch
    ``2 * batch_size`` (``[uncond..., cond...]``), so the number of calls does not depend on the guidance.
    SDXL also passes ``added_cond_kwargs={"text_embeds": pooled, "time_ids": ...}``.

    Swapping: the pipeline reads ``self.unet`` afresh on every call and ``pipe.components`` is built from the
    attributes, so assigning the attribute is enough; it is done with ``pipe.register_modules(unet=...)``,
    which also keeps the pipeline's config entry for ``unet`` consistent with the object in place (and the
    original entry comes back with the original UNet). The given UNet may be any object with the same
    config (e.g. a quantized clone); it must already be on the pipeline's device and dtype (the runner
    never moves or modifies it). SDXL caches ``default_sample_size`` from the UNet config at construction,
    which is the same for a UNet of the same config. Pipelines with accelerate offloading
    (``enable_model_cpu_offload`` / ``enable_sequential_cpu_offload``) are refused: their hooks belong to the
    original modules and re-attach to whatever UNet is in place at the end of a call, so swapping would
    leave the original UNet un-hooked (use ``pipe.to(device)`` for calibration instead).

    Attributes ``steps`` and ``total_unet_calls`` size quant_core's capture budget and progress bar.
    """

    def __init__(self, pipe, prompts: list[str], negative_prompt: str = "", steps: int = 20,
                 guidance_scale: float = 7.5, height: int | None = None, width: int | None = None, seed: int = 0,
                 batch_size: int = 1):
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a non-empty list of strings")
        if int(steps) < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if getattr(pipe, "unet", None) is None or getattr(pipe, "scheduler", None) is None:
            raise TypeError(f"{type(pipe).__name__} is not a diffusers UNet pipeline (no .unet / .scheduler)")
        self.pipe = pipe
        self.prompts = prompts
        self.negative_prompt = negative_prompt or ""
        self.steps = int(steps)
        self.guidance_scale = float(guidance_scale)
        self.height, self.width = height, width
        self.seed = int(seed)
        self.batch_size = int(batch_size)

    # ------------------------------------------------------------------ sizes

    @property
    def batches(self) -> list[list[str]]:
        """The prompts in sampling order, ``batch_size`` at a time (the last batch may be smaller)."""
        return [self.prompts[i:i + self.batch_size] for i in range(0, len(self.prompts), self.batch_size)]

    @property
    def calls_per_batch(self) -> int:
        """UNet calls one pipeline call makes: one per scheduler timestep (2nd-order schedulers have ~2 per step)."""
        scheduler = copy.deepcopy(self.pipe.scheduler)
        scheduler.set_timesteps(self.steps)
        return len(scheduler.timesteps)

    @property
    def total_unet_calls(self) -> int:
        """How many UNet forward calls one run (``runner(unet)`` or :meth:`images`) makes."""
        return len(self.batches) * self.calls_per_batch

    # ------------------------------------------------------------------ sampling

    def __call__(self, unet, output_type: str = "latent") -> list:
        """Sample every prompt with ``unet`` swapped in; the pipeline's output per batch (final latents by default)."""
        return self._run(unet, output_type)

    def images(self, unet, output_type: str = "pt"):
        """The same sampling, decoded: ``output_type="pt"`` gives a float tensor (N, 3, H, W) in [0, 1];
        ``"np"`` an array (N, H, W, 3) in [0, 1]; ``"pil"`` a list of PIL images."""
        if output_type == "latent":
            raise ValueError("images() decodes; use runner(unet) for latents")
        outputs = self._run(unet, output_type)
        if output_type == "pt":
            return torch.cat(outputs)
        if output_type == "np":
            import numpy as np

            return np.concatenate(outputs)
        return [image for batch in outputs for image in batch]

    def _run(self, unet, output_type: str) -> list:
        pipe = self.pipe
        _refuse_offloaded(pipe)
        unet = pipe.unet if unet is None else unet
        had_bar_config = hasattr(pipe, "_progress_bar_config")
        bar_config = dict(getattr(pipe, "_progress_bar_config", {}))
        outputs = []
        try:
            if hasattr(pipe, "set_progress_bar_config"):
                pipe.set_progress_bar_config(**{**bar_config, "disable": True})
            with swapped_unet(pipe, unet), torch.no_grad():
                for index, batch in enumerate(self.batches):
                    generator = torch.Generator(device="cpu").manual_seed(self.seed + index)
                    result = pipe(prompt=batch,
                                  negative_prompt=[self.negative_prompt] * len(batch) if self.negative_prompt else None,
                                  num_inference_steps=self.steps, guidance_scale=self.guidance_scale,
                                  height=self.height, width=self.width, generator=generator,
                                  output_type=output_type, return_dict=True)
                    outputs.append(result.images)
        finally:
            if had_bar_config:
                pipe._progress_bar_config = bar_config
            elif hasattr(pipe, "_progress_bar_config"):
                del pipe._progress_bar_config
        return outputs

    def __repr__(self) -> str:
        return (f"DiffusersRunner({type(self.pipe).__name__}, prompts={len(self.prompts)}, steps={self.steps}, "
                f"guidance_scale={self.guidance_scale}, size={self.height}x{self.width}, seed={self.seed}, "
                f"batch_size={self.batch_size})")


def _refuse_offloaded(pipe) -> None:
    components = getattr(pipe, "components", {}) or {}
    offloaded = bool(getattr(pipe, "_all_hooks", None)) or any(
        hasattr(m, "_hf_hook") for c in components.values() if isinstance(c, torch.nn.Module) for m in c.modules())
    if offloaded:
        raise ValueError("DiffusersRunner cannot swap the UNet of a pipeline with accelerate CPU offloading "
                         "(enable_model_cpu_offload / enable_sequential_cpu_offload); call "
                         "pipe.remove_all_hooks() and pipe.to(device) before calibrating")


def _set_unet(pipe, unet) -> None:
    if hasattr(pipe, "register_modules"):
        pipe.register_modules(unet=unet)
    else:
        pipe.unet = unet


# ---------------------------------------------------------------------- loading

def load_diffusers_pipeline(path: str, device="cpu", dtype=torch.float32):
    """Load a local diffusers pipeline folder (``model_index.json``) as StableDiffusion(XL)Pipeline.

    The class comes from ``model_index.json``'s ``_class_name``: ``StableDiffusionPipeline`` (SD 1.x / 2.x)
    or ``StableDiffusionXLPipeline``. Loading is offline (``local_files_only=True``). The safety checker is
    not loaded (calibration images are never shown) and the SDXL watermarker is off (images compared for
    fidelity stay unaltered). Raises FileNotFoundError for a missing folder or a folder without
    ``model_index.json``, ValueError for a file instead of a folder, an unreadable index, an unsupported
    pipeline class or a pipeline without a UNet.
    """
    folder = Path(path).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"diffusers model folder not found: {str(path)!r}")
    if not folder.is_dir():
        raise ValueError(f"{str(path)!r} is a file; expected a diffusers pipeline folder containing model_index.json "
                         f"(a single-file .safetensors checkpoint loads with single_file.load_single_file_pipeline)")
    index = folder / "model_index.json"
    if not index.is_file():
        found = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
        shown = ", ".join(found[:12]) + (f", ... ({len(found)} entries)" if len(found) > 12 else "")
        raise FileNotFoundError(f"{str(path)!r} has no model_index.json, so it is not a diffusers pipeline folder "
                                f"(expected model_index.json next to unet/, vae/, text_encoder/, tokenizer/, "
                                f"scheduler/; found: {shown or 'nothing, the folder is empty'})")
    try:
        meta = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"could not read {index}: {exc}") from exc
    class_name = meta.get("_class_name") if isinstance(meta, dict) else None
    if class_name not in SUPPORTED_PIPELINES:
        raise ValueError(f"{index} declares pipeline class {class_name!r}; supported: "
                         f"{', '.join(SUPPORTED_PIPELINES)} (SD 1.x / 2.x and SDXL text-to-image)")
    unet_entry = meta.get("unet")
    if not (isinstance(unet_entry, (list, tuple)) and len(unet_entry) == 2 and unet_entry[0] is not None):
        raise ValueError(f"{index} has no UNet component (unet: {unet_entry!r}); expected e.g. "
                         f"[\"diffusers\", \"UNet2DConditionModel\"]")

    import diffusers

    cls = getattr(diffusers, class_name)
    # diffusers renamed from_pretrained's ``torch_dtype`` to ``dtype`` (the old name warns, and goes in 1.0).
    renamed = hasattr(getattr(diffusers.utils, "deprecation_utils", None), "_resolve_dtype")
    dtype_key = "dtype" if renamed else "torch_dtype"
    kwargs = {dtype_key: dtype, "local_files_only": True}
    if class_name == "StableDiffusionPipeline":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    else:
        kwargs.update(add_watermarker=False)
    pipe = cls.from_pretrained(str(folder), **kwargs)
    return pipe.to(device)


@contextlib.contextmanager
def swapped_unet(pipe, unet):
    """``with swapped_unet(pipe, unet):`` run the pipeline with ``unet``; the original comes back afterwards."""
    original = pipe.unet
    if unet is not original:
        _set_unet(pipe, unet)
    try:
        yield pipe
    finally:
        if pipe.unet is not original:
            _set_unet(pipe, original)
