"""A single-file SD1.x-layout checkpoint (ldm key names, as A1111/ComfyUI users hold them) from a tiny diffusers
pipeline, for the CLI's single-file route. Written here from the key layout (tests/hosts/make_sd15_checkpoint.py
describes it): diffusers ships only the ldm -> diffusers direction.

UNet (``model.diffusion_model.``): input_blocks 0 = conv_in, then per down block ``layers`` (resnet, attention)
pairs and a downsampler; middle_block = resnet, attention, resnet; output_blocks per up block ``layers + 1``
(resnet, attention) pairs, the upsampler last in its block's final entry; out = norm, conv.
VAE (``first_stage_model.``): down.i.block.j / down.i.downsample, mid.block_1 / attn_1 / block_2, up blocks in
reverse order, attention as 1x1 convs (q, k, v, proj_out). CLIP-L (``cond_stage_model.transformer.text_model.``).
"""
from __future__ import annotations

import torch

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _sub(rest: str, table: dict) -> str:
    for old, new in table.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def unet_key(key: str, layers: int) -> str:
    top = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
           "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
    for old, new in top.items():
        if key.startswith(old + "."):
            return new + key[len(old):]
    parts = key.split(".")
    if parts[0] == "mid_block":
        index = {"resnets.0": 0, "attentions.0": 1, "resnets.1": 2}[".".join(parts[1:3])]
        rest = ".".join(parts[3:])
        return f"middle_block.{index}." + (_sub(rest, RESNET) if parts[1] == "resnets" else rest)
    block, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
    if parts[0] == "down_blocks":
        if kind == "downsamplers":
            return f"input_blocks.{(block + 1) * (layers + 1)}.0.op.{rest.split('.', 1)[1]}"
        where = f"input_blocks.{1 + block * (layers + 1) + j}"
    else:
        if kind == "upsamplers":
            return f"output_blocks.{block * (layers + 1) + layers}.UPSAMPLE.{rest}"
        where = f"output_blocks.{block * (layers + 1) + j}"
    return f"{where}.0.{_sub(rest, RESNET)}" if kind == "resnets" else f"{where}.1.{rest}"


def vae_key(key: str, levels: int) -> str:
    side, rest = key.split(".", 1)
    if side in ("quant_conv", "post_quant_conv"):
        return key
    rest = rest.replace("conv_norm_out", "norm_out")
    parts = rest.split(".")
    if parts[0] == "mid_block":
        inner = ".".join(parts[3:])
        if parts[1] == "attentions":
            return f"{side}.mid.attn_1.{_sub(inner, VAE_ATTN)}"
        return f"{side}.mid.block_{int(parts[2]) + 1}.{_sub(inner, VAE_RESNET)}"
    if parts[0] in ("down_blocks", "up_blocks"):
        level = int(parts[1]) if side == "encoder" else levels - 1 - int(parts[1])
        name = "down" if side == "encoder" else "up"
        if parts[2] in ("downsamplers", "upsamplers"):
            return f"{side}.{name}.{level}.{'downsample' if side == 'encoder' else 'upsample'}.{'.'.join(parts[4:])}"
        return f"{side}.{name}.{level}.block.{parts[3]}.{_sub('.'.join(parts[4:]), VAE_RESNET)}"
    return f"{side}.{rest}"


def sd1_checkpoint(pipe) -> dict:
    """{ldm key: tensor} of a StableDiffusionPipeline with an SD1-style UNet (2 levels or more, SD1 block order)."""
    layers = pipe.unet.config.layers_per_block
    unet = pipe.unet.state_dict()
    names = {key: unet_key(key, layers) for key in unet}
    out = {}
    for key, value in unet.items():
        new = names[key]
        if ".UPSAMPLE." in new:  # upsampler index: after the resnet (0) and the attention (1) if the block has one
            block = new.split(".")[1]
            has_attn = any(n.startswith(f"output_blocks.{block}.1.") for n in names.values())
            new = new.replace(".UPSAMPLE.", ".2." if has_attn else ".1.")
        out["model.diffusion_model." + new] = value.clone()
    levels = len(pipe.vae.config.block_out_channels)
    for key, value in pipe.vae.state_dict().items():
        new = vae_key(key, levels)
        if ".attn_1." in new and value.ndim == 2:
            value = value[:, :, None, None]  # ldm's VAE attention uses 1x1 convs
        out["first_stage_model." + new] = value.clone()
    text = pipe.text_encoder.state_dict()
    for key, value in text.items():
        name = key if key.startswith("text_model.") else "text_model." + key
        out["cond_stage_model.transformer." + name] = value.clone()
    return {k: v.contiguous() for k, v in out.items() if isinstance(v, torch.Tensor)}
