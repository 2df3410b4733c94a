"""DDIM + classifier-free guidance sampler for the proxy model (a plain, hookable loop)."""
from __future__ import annotations

import torch


@torch.no_grad()
def encode_prompts(text_encoder, tokenize, prompts):
    """Token ids -> per-token hidden states (B, MAX_LEN, cross_attention_dim), as SD feeds the UNet."""
    device = next(text_encoder.parameters()).device
    return text_encoder(tokenize(prompts).to(device)).last_hidden_state


@torch.no_grad()
def sample(unet, text_encoder, tokenize, prompts, seed: int = 0, steps: int = 20, cfg: float = 3.0,
           scheduler_config: dict | None = None, batch_size: int | None = None, return_trajectory: bool = False):
    """Sample one image per prompt; returns (N, 3, H, W) float32 in [0, 1].

    Initial noise comes from ``torch.Generator().manual_seed(seed)`` (drawn on CPU for all prompts in
    order), so results are deterministic given seed and prompts. Every denoising step is one call
    ``unet(x, t, encoder_hidden_states=ctx)`` on the concatenated [uncond, cond] batch (cfg != 1) -- hook
    the UNet to observe or quantize it. ``batch_size`` splits long prompt lists into chunks (same noise).
    """
    from diffusers import DDIMScheduler

    from .model import build_scheduler_config

    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    cfg_dict = scheduler_config or build_scheduler_config()
    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    size = unet.config.sample_size
    channels = unet.config.in_channels
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(prompts), channels, size, size, generator=gen)
    batch_size = batch_size or len(prompts)
    outs, trajectory = [], []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        scheduler = DDIMScheduler(**cfg_dict)
        scheduler.set_timesteps(steps)
        cond = encode_prompts(text_encoder, tokenize, chunk).to(dtype)
        guided = cfg != 1.0
        if guided:
            uncond = encode_prompts(text_encoder, tokenize, [""] * len(chunk)).to(dtype)
            ctx = torch.cat([uncond, cond])
        else:
            ctx = cond
        x = noise[start:start + len(chunk)].to(device=device, dtype=dtype)
        for t in scheduler.timesteps:
            inp = torch.cat([x, x]) if guided else x
            eps = unet(inp, t, encoder_hidden_states=ctx).sample
            if guided:
                e_u, e_c = eps.chunk(2)
                eps = e_u + cfg * (e_c - e_u)
            x = scheduler.step(eps, t, x).prev_sample
            if return_trajectory:
                trajectory.append(x.float().cpu())
        outs.append(((x.float().clamp(-1, 1) + 1) / 2).cpu())
    images = torch.cat(outs)
    return (images, trajectory) if return_trajectory else images
