"""Single-file SD1.x / SD2.x / SDXL checkpoints (one ``.safetensors`` holding UNet, text encoder(s) and VAE,
as ComfyUI and A1111 users keep them), loaded offline through diffusers' own ``from_single_file``.

Only safetensors is read (a ``.ckpt`` is a pickle, which can run code when loaded). The family is read
from the file's header alone (key names and shapes; no tensor data): the text encoder's key prefix names
it (``cond_stage_model.transformer.`` CLIP-L: SD1.x; ``cond_stage_model.model.`` OpenCLIP-H: SD2.x;
``conditioner.embedders.1.model.`` OpenCLIP-bigG beside CLIP-L: SDXL base; bigG alone: SDXL refiner).

diffusers builds the pipeline from a *diffusers config folder* of the same family (``model_index.json``,
each component's ``config.json``, the tokenizer files; no weights needed). Without ``config`` it would
fetch one from the Hugging Face Hub; here it is always local: the folder given, or the Hub cache's copy
of the family's default repository (diffusers' choice, e.g. stable-diffusion-v1-5/stable-diffusion-v1-5)
if it is there. Otherwise the error says what to pass.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

UNET = "model.diffusion_model."
# family -> (pipeline class, Hub repository whose configs diffusers uses for it, what it is)
FAMILIES = {
    "sd1": ("StableDiffusionPipeline", "stable-diffusion-v1-5/stable-diffusion-v1-5", "SD1.x"),
    "sd2": ("StableDiffusionPipeline", "stabilityai/stable-diffusion-2-1", "SD2.x"),
    "sdxl": ("StableDiffusionXLPipeline", "stabilityai/stable-diffusion-xl-base-1.0", "SDXL"),
}
UNSAFE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


def checkpoint_header(path) -> dict:
    """{tensor name: shape} from the safetensors header (no tensor data is read); ValueError if unreadable."""
    from safetensors import safe_open

    file = Path(path)
    if file.suffix.lower() in UNSAFE_SUFFIXES:
        raise ValueError(f"{file.name}: only .safetensors checkpoints are read ({file.suffix} files are Python "
                         "pickles, which can run code when loaded); convert it to .safetensors with a tool you trust")
    if file.suffix.lower() != ".safetensors":
        raise ValueError(f"{file.name}: expected a .safetensors checkpoint or a diffusers model folder")
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint not found: {str(path)!r}")
    try:
        with safe_open(str(file), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as exc:  # safetensors' own error types differ between versions
        raise ValueError(f"{file.name} is not a readable safetensors file ({exc}); the download or copy may be "
                         "incomplete") from None


def detect_family(header: dict) -> str:
    """'sd1', 'sd2' or 'sdxl' from the key names; ValueError naming what the file is instead."""
    if not any(k.startswith(UNET) for k in header):
        raise ValueError("the checkpoint has no UNet (no model.diffusion_model.* tensors): it is not a full SD1.x/"
                         "SD2.x/SDXL checkpoint (a LoRA, a VAE, a UNet-only or another model's file?)")
    conv_in = header.get(UNET + "input_blocks.0.0.weight")
    if conv_in is not None and len(conv_in) == 4 and conv_in[1] != 4:
        raise ValueError(f"the UNet takes {conv_in[1]} input channels (an inpainting or other special model); only "
                         "text-to-image UNets with 4 latent channels are supported")
    xl_g = any(k.startswith("conditioner.embedders.1.model.") for k in header)
    refiner = any(k.startswith("conditioner.embedders.0.model.") for k in header)
    if xl_g:
        return "sdxl"
    if refiner:
        raise ValueError("this is an SDXL refiner checkpoint (OpenCLIP-bigG text encoder only): the refiner is an "
                         "img2img second stage and is not supported; quantize the SDXL base model")
    if any(k.startswith("cond_stage_model.model.") for k in header):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in header):
        return "sd1"
    raise ValueError("the checkpoint has a UNet but no SD1.x (CLIP-L), SD2.x (OpenCLIP-H) or SDXL text encoder "
                     "that diffusers recognises; it cannot be loaded as a single-file Stable Diffusion checkpoint")


def context_width(header: dict):
    """The UNet's cross-attention width (768 SD1.x, 1024 SD2.x, 2048 SDXL), or None if not found."""
    for key, shape in sorted(header.items()):
        if key.startswith(UNET) and key.endswith("attn2.to_k.weight") and len(shape) == 2:
            return shape[1]
    return None


def resolve_config(family: str, header: dict, config=None) -> Path:
    """The local diffusers config folder to build the pipeline from; ValueError saying what to do if none."""
    class_name, repo, label = FAMILIES[family]
    if config is None:
        folder = _cached_config(repo)
        if folder is None:
            raise ValueError(
                f"single-file {label} checkpoint: diffusers needs the configs of {repo} to build it, and they are not "
                "in the Hugging Face cache (nothing is downloaded). Pass --config with a local diffusers folder of the "
                "same family (model_index.json, the */config.json files and the tokenizer files; weights are not "
                f"needed), e.g. a diffusers copy of a {label} model, or fetch the configs once on a machine online: "
                f"huggingface-cli download {repo} --exclude '*.safetensors' '*.bin' '*.ckpt' '*.onnx*' '*.msgpack'")
    else:
        folder = Path(config).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"--config {str(config)!r}: not a folder (expected a diffusers config folder "
                                    "with model_index.json)")
    _check_config(folder, class_name, label, context_width(header))
    return folder


def _cached_config(repo: str):
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError), or no huggingface_hub: same answer
        return None


def _check_config(folder: Path, class_name: str, label: str, width) -> None:
    try:
        meta = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
        unet = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"config folder {folder}: {exc}; expected a diffusers folder with model_index.json and "
                         "unet/config.json") from None
    if meta.get("_class_name") != class_name:
        raise ValueError(f"config folder {folder} is for {meta.get('_class_name')!r}, but the checkpoint is {label} "
                         f"({class_name}); pass a config folder of the same family")
    if width is not None and unet.get("cross_attention_dim") != width:
        raise ValueError(f"config folder {folder} describes a UNet with cross-attention width "
                         f"{unet.get('cross_attention_dim')}, but the checkpoint's is {width}: a config of another "
                         "model family or size")


def load_single_file_pipeline(path, config=None, device="cpu", dtype=torch.float32):
    """StableDiffusion(XL)Pipeline from one .safetensors checkpoint, offline; see the module docstring."""
    header = checkpoint_header(path)
    family = detect_family(header)
    folder = resolve_config(family, header, config)

    import diffusers

    class_name = FAMILIES[family][0]
    renamed = hasattr(getattr(diffusers.utils, "deprecation_utils", None), "_resolve_dtype")
    kwargs = {"dtype" if renamed else "torch_dtype": dtype, "config": str(folder), "local_files_only": True}
    if class_name == "StableDiffusionPipeline":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    else:
        kwargs.update(add_watermarker=False)
    pipe = getattr(diffusers, class_name).from_single_file(str(path), **kwargs)
    return pipe.to(device)
