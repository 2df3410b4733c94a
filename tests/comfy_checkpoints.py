"""Seeded single-file checkpoints that ComfyUI's own CheckpointLoaderSimple detects as SD1.5, SD2.x or SDXL.

Built at test time from ComfyUI's own classes (the checkout on ``sys.path``; nothing is downloaded): the
UNet is ComfyUI's ``UNetModel`` built on the meta device with seeded random fp16 values, the VAE a TAESD
(ComfyUI accepts one inside a checkpoint), the text encoders full size (ComfyUI builds them from fixed
configs and leaves missing layers uninitialised, so a shortened one would give garbage conditioning).
Text-encoder keys are written the way ComfyUI's own CheckpointSave writes them
(``model_config.process_clip_state_dict_for_saving``: open_clip layout for OpenCLIP-H / -G).

The UNets keep what ComfyUI's detection (comfy/model_detection.py ``detect_unet_config`` +
comfy/supported_models.py ``matches``) looks at and shrink the rest: model_channels 320, the context width,
linear/conv projections, the ADM width and, for SDXL, the exact ``transformer_depth`` list. Detection does
not match ``channel_mult``, so every level stays at 320 channels (CPU-sized).

- ``sd15``: one level (bench/tiny_models.py ``comfy_sd15_config``), CLIP-L -> ComfyUI class ``SD15``.
- ``sd2``: SD2's four levels x 2 ResBlocks, attention on the first level and in the middle, context 1024
  (OpenCLIP-H), linear projections -> ``SD20``. v-prediction: ComfyUI 0.3.64 and 0.8.0 decide it from the
  weights, not from a probe (``SD20.model_type``: the std of ``output_blocks.11.1.transformer_blocks.0.
  norm1.bias`` > 0.09), so that bias is drawn with std 0.2; the other biases have std 0.02.
- ``sdxl``: Segmind Vega's layout (``transformer_depth [0, 0, 1, 1, 2, 2]``, output ``[0, 0, 0, 1, 1, 1,
  2, 2, 2]``, ResBlock-only middle block) at channel_mult (1, 1, 1), context 2048, ADM 2816, CLIP-L +
  OpenCLIP-G -> ``Segmind_Vega`` (an SDXL subclass: SDXL's ADM size/crop conditioning and text encoders).
- ``sdxl_refiner``: the refiner's layout (model_channels 384, ``transformer_depth [0, 0, 4, 4, 4, 4, 0,
  0]``, context 1280, ADM 2560) at channel_mult (1, 1, 1, 1), UNet only (for ``load_diffusion_model``).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from bench.tiny_models import comfy_sd15_config

SD2_VPRED_KEY = "output_blocks.11.1.transformer_blocks.0.norm1.bias"
# ComfyUI's class names per family (model.model.model_config), what the report is expected to name
DETECTED = {"sd15": "SD15", "sd2": "SD20", "sdxl": "Segmind_Vega", "sdxl_refiner": "SDXLRefiner"}
# TAESD latent scales (ComfyUI's VAELoader: taesd 0.18215, taesdxl 0.13025)
VAE_SCALE = {"sd15": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}


def unet_config(family: str) -> dict:
    """Keyword arguments of ComfyUI's ``UNetModel`` for ``family``."""
    if family == "sd15":
        return comfy_sd15_config(1)
    common = dict(image_size=32, in_channels=4, out_channels=4, use_spatial_transformer=True, legacy=False,
                  num_heads=-1, num_head_channels=64, use_linear_in_transformer=True)
    if family == "sd2":
        return dict(common, model_channels=320, num_res_blocks=[2] * 4, channel_mult=(1, 1, 1, 1),
                    transformer_depth=[1, 1, 0, 0, 0, 0, 0, 0], transformer_depth_output=[1, 1, 1] + [0] * 9,
                    transformer_depth_middle=1, context_dim=1024)
    if family == "sdxl":
        return dict(common, model_channels=320, num_res_blocks=[2] * 3, channel_mult=(1, 1, 1),
                    transformer_depth=[0, 0, 1, 1, 2, 2], transformer_depth_output=[0, 0, 0, 1, 1, 1, 2, 2, 2],
                    transformer_depth_middle=-1, context_dim=2048, num_classes="sequential", adm_in_channels=2816)
    if family == "sdxl_refiner":
        return dict(common, model_channels=384, num_res_blocks=[2] * 4, channel_mult=(1, 1, 1, 1),
                    transformer_depth=[0, 0, 4, 4, 4, 4, 0, 0], transformer_depth_output=[0, 0, 0, 4, 4, 4, 4, 4, 4, 0, 0, 0],
                    transformer_depth_middle=4, context_dim=1280, num_classes="sequential", adm_in_channels=2560)
    raise ValueError(f"unknown family {family!r}")


def random_state(module: torch.nn.Module, seed: int, gain: float = 1.0) -> dict:
    """Seeded random fp16 values for every tensor of ``module`` (built on the meta device)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in module.state_dict().items():
        if t.dim() == 1 and "norm" in name and name.endswith("weight"):
            value = 1 + 0.1 * torch.randn(t.shape, generator=gen)
        elif name.endswith("bias"):
            value = 0.02 * torch.randn(t.shape, generator=gen)
        else:
            fan_in = max(1, t[0].numel()) if t.dim() > 1 else 1
            value = torch.randn(t.shape, generator=gen) * gain / fan_in ** 0.5
        out[name] = value.to(torch.float16)
    return out


def unet_state(family: str, seed: int) -> dict:
    """The UNet's seeded fp16 state dict (ComfyUI's names, without ``model.diffusion_model.``)."""
    import comfy.ldm.modules.diffusionmodules.openaimodel as oam
    import comfy.ops

    unet = oam.UNetModel(**unet_config(family), device="meta", operations=comfy.ops.disable_weight_init)
    state = random_state(unet, seed)
    if family == "sd2":  # what makes ComfyUI load it as v-prediction (see the module docstring)
        gen = torch.Generator().manual_seed(seed + 1000)
        state[SD2_VPRED_KEY] = (0.2 * torch.randn(state[SD2_VPRED_KEY].shape, generator=gen)).half()
    return state


def _clip_state(comfy_path: Path, config_file: str, seed: int) -> dict:
    import comfy.clip_model
    import comfy.ops

    config = json.loads((comfy_path / config_file).read_text())
    model = comfy.clip_model.CLIPTextModel(config, torch.float16, "meta", comfy.ops.disable_weight_init)
    return random_state(model, seed)


def text_encoder_state(family: str, comfy_path: Path, seed: int) -> dict:
    """The text encoders under checkpoint names, written as ComfyUI's CheckpointSave writes them."""
    import comfy.supported_models as sm

    if family == "sd15":
        clip = _clip_state(comfy_path, "comfy/sd1_clip_config.json", seed)
        clip.pop("text_projection.weight")  # SD1.5 checkpoints have none (ComfyUI tolerates its absence)
        return {"cond_stage_model.transformer." + k: v for k, v in clip.items()}
    if family == "sd2":
        clip = {"clip_h.transformer." + k: v
                for k, v in _clip_state(comfy_path, "comfy/text_encoders/sd2_clip_config.json", seed).items()}
        return sm.SD20.process_clip_state_dict_for_saving(None, clip)
    if family == "sdxl":
        clip = {"clip_l.transformer." + k: v
                for k, v in _clip_state(comfy_path, "comfy/sd1_clip_config.json", seed).items()}
        clip.update({"clip_g.transformer." + k: v
                     for k, v in _clip_state(comfy_path, "comfy/clip_config_bigg.json", seed + 1).items()})
        return sm.SDXL.process_clip_state_dict_for_saving(None, clip)
    raise ValueError(f"no text encoders for {family!r}")


def taesd_state(seed: int, scale: float) -> dict:
    """A TAESD whose decoder output sits in the middle of [0, 1] (``first_stage_model.*`` keys)."""
    import comfy.taesd.taesd

    with torch.device("meta"):
        taesd_meta = comfy.taesd.taesd.TAESD()
    taesd = random_state(taesd_meta, seed, gain=2 ** 0.5)  # ReLU network: He scaling keeps the signal alive
    taesd["vae_scale"], taesd["vae_shift"] = torch.tensor(scale), torch.tensor(0.0)
    # Rescale the last conv to output std 0.12 around 0.5 on random latents of std 2, so that images are
    # not clipped flat (which would make any two images look alike). Sampled latents come out wider:
    # the SD1.5 float image has std ~55/255 with 5.6% of its values clipped (0.2 on std-1 latents clipped 39%).
    decoder = comfy.taesd.taesd.Decoder()
    decoder.load_state_dict({k[len("taesd_decoder."):]: v.float() for k, v in taesd.items()
                             if k.startswith("taesd_decoder.")})
    with torch.no_grad():
        probe = decoder(torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)) * 2)
    last = max((k for k in taesd if k.startswith("taesd_decoder.") and k.endswith(".weight")),
               key=lambda k: int(k.split(".")[1]))
    bias = last.replace(".weight", ".bias")
    taesd[last] = (taesd[last].float() * 0.12 / float(probe.std())).half()
    taesd[bias] = (taesd[bias].float() - float(probe.mean()) * 0.12 / float(probe.std()) + 0.5).half()
    # TAESD.decode maps decoder output d to 2d - 1 and ComfyUI's process_output maps back to d, clamped.
    return {"first_stage_model." + k: v for k, v in taesd.items()}


def lora_state(unet: dict, seed: int, strength: float = 0.25) -> dict:
    """A kohya-named LoRA (rank 8, each delta ``strength`` x its weight's norm) on the transformer linears."""
    gen = torch.Generator().manual_seed(seed)
    lora = {}
    for key, w in unet.items():
        if ".transformer_blocks." in key and key.endswith(".weight") and w.dim() == 2:
            name = "lora_unet_" + key[: -len(".weight")].replace(".", "_")
            down = torch.randn(8, w.shape[1], generator=gen) / w.shape[1] ** 0.5
            up = torch.randn(w.shape[0], 8, generator=gen)
            up *= strength * float(w.float().norm()) / float((up @ down).norm())
            lora.update({f"{name}.lora_up.weight": up.half(), f"{name}.lora_down.weight": down.half(),
                         f"{name}.alpha": torch.tensor(8.0)})
    return lora


def write_checkpoint(family: str, comfy_path: Path, path: Path, seed: int = 0) -> dict:
    """Write ``family``'s single-file checkpoint to ``path``; -> its UNet state (for LoRAs and other files)."""
    from safetensors.torch import save_file

    unet = unet_state(family, seed)
    checkpoint = {**{"model.diffusion_model." + k: v for k, v in unet.items()},
                  **taesd_state(seed + 2, VAE_SCALE[family]), **text_encoder_state(family, comfy_path, seed + 1)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(checkpoint, str(path))
    return unet
