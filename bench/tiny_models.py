"""Seeded tiny models shared by tests/ and bench/: one diffusers UNet builder, one ComfyUI ldm UNet, one fake CLIP.

Import it as ``bench.tiny_models``: the repository root is on ``sys.path`` under pytest (pyproject's
``pythonpath``) and in every bench script (they insert it). Nothing is downloaded, and the weights
depend only on the arguments, so two calls with the same arguments give bit-identical models.

- ``tiny_unet``: a small ``diffusers.UNet2DConditionModel`` with SD structure (ResBlocks,
  cross-attention, skips), block_out_channels (32, 64), one layer per block, in the SD1 / SD2 / SDXL
  conditioning layout. The test suites use it at three sets of widths (tests/unets.py ``tiny_unet``
  and ``diffusers_unet``, tests/tiny_pipelines.py ``make_tiny_unet``); each is one call of this builder.
- ``comfy_sd15_unet`` / ``comfy_sd15_state`` / ``load_comfy_sd15``: ComfyUI's own ldm ``UNetModel``
  (from the checkout on ``sys.path``) in the SD1.5 layout (model_channels 320, context 768, conv
  projections), ``levels`` levels with one ResBlock and one transformer each, seeded random weights.
- ``FakeClip``: stands in for ComfyUI's CLIP; a prompt maps to a fixed seeded (1, 77, 768) embedding.
"""
from __future__ import annotations

import torch

# cross_attention_dim per variant when ``context`` is not given: the real SD widths (CLIP-L 768,
# OpenCLIP-H 1024, CLIP-L + bigG 2048), which is what adapter / variant detection looks at.
SD_CONTEXT = {"sd1": 768, "sd2": 1024, "sdxl": 2048}


def tiny_unet(variant: str = "sd1", seed: int = 0, *, context: int | None = None, pooled: int = 32,
              sdxl_blocks: bool = True, sample_size: int = 16, norm_groups: int = 32,
              isolate_rng: bool = True):
    """A seeded ``UNet2DConditionModel``, block_out_channels (32, 64), attention_head_dim 8.

    variant: ``sd1`` (conv proj_in/proj_out), ``sd2`` (linear projections), ``sdxl`` (linear
    projections and "text_time" added conditioning: ``pooled`` text features + 6 size/crop ids x 8).
    context: cross_attention_dim (default ``SD_CONTEXT[variant]``).
    sdxl_blocks: for ``sdxl``, SDXL's block layout (no attention at the highest resolution, two
    transformer layers in the lower block); False keeps the SD1/SD2 block layout.
    isolate_rng: build under ``torch.random.fork_rng`` so the caller's global RNG is left as it was;
    False seeds the global RNG with ``seed`` and leaves it where construction ends (what some tests'
    later random draws were written against).
    """
    from diffusers import UNet2DConditionModel

    if variant not in SD_CONTEXT:
        raise ValueError(f"unknown variant {variant!r} (expected 'sd1', 'sd2' or 'sdxl')")
    config = dict(sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
                  block_out_channels=(32, 64), attention_head_dim=8, cross_attention_dim=context or SD_CONTEXT[variant],
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    # diffusers' defaults (norm_num_groups 32, conv projections) are left unpassed, so that even the config's
    # record of which arguments were defaulted matches the builders this one replaced
    if norm_groups != 32:
        config.update(norm_num_groups=norm_groups)
    if variant != "sd1":
        config.update(use_linear_projection=True)
    if variant == "sdxl":
        config.update(addition_embed_type="text_time", addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=pooled + 6 * 8)
        if sdxl_blocks:
            config.update(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                          up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2))

    def build():
        torch.manual_seed(seed)
        return UNet2DConditionModel(**config).eval()

    if not isolate_rng:
        return build()
    with torch.random.fork_rng(devices=[]):
        return build()


# ------------------------------------------------------------------------------ ComfyUI (ldm layout)

def comfy_sd15_config(levels: int = 1, image_size: int = 32) -> dict:
    """Keyword arguments of ComfyUI's ``UNetModel`` (and, less out_channels, its ``ControlNet``) for the SD1.5
    layout with ``levels`` levels (channel_mult 1, 2, 4, 4, ...), one ResBlock and one transformer each."""
    return dict(image_size=image_size, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1] * levels,
                channel_mult=tuple(2 ** i if i < 3 else 4 for i in range(levels)), transformer_depth=[1] * levels,
                transformer_depth_output=[1, 1] * levels, transformer_depth_middle=1, use_spatial_transformer=True,
                context_dim=768, num_heads=8, use_linear_in_transformer=False, legacy=False)


def comfy_sd15_unet(levels: int = 1, image_size: int = 32, seed: int | None = 0, operations=None, device=None):
    """ComfyUI's ``UNetModel`` (from the checkout on ``sys.path``) built from ``comfy_sd15_config``.

    Built with ``comfy.ops.disable_weight_init`` unless ``operations`` is given; ``seed`` None leaves the
    weights as built (e.g. on the meta device), otherwise they are filled by ``seeded_init(seed)``.
    """
    import comfy.ldm.modules.diffusionmodules.openaimodel as oam
    import comfy.ops

    unet = oam.UNetModel(**comfy_sd15_config(levels, image_size), device=device,
                         operations=operations or comfy.ops.disable_weight_init)
    return unet if seed is None else seeded_init(unet, seed)


def seeded_init(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fill every parameter from a generator seeded with ``seed`` (disable_weight_init leaves torch.empty):
    biases N(0, 0.02); 1-D parameters named "norm" 1 + N(0, 0.1); others N(0, 1 / fan_in)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = 0.02 if name.endswith("bias") else 1 / max(1, p[0].numel()) ** 0.5
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen) if p.dim() == 1 and "norm" in name
                    else torch.randn(p.shape, generator=gen) * scale)
    return module


def comfy_sd15_state(seed: int = 0, levels: int = 1, image_size: int = 32) -> dict:
    """The seeded UNet's state dict under checkpoint names (``model.diffusion_model.*``)."""
    unet = comfy_sd15_unet(levels, image_size, seed)
    return {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}


def load_comfy_sd15(seed: int = 0, levels: int = 1, image_size: int = 32, model_options: dict | None = None):
    """The seeded UNet loaded by ComfyUI's own loader (``comfy.sd.load_diffusion_model_state_dict``): a ModelPatcher."""
    import comfy.sd

    state = comfy_sd15_state(seed, levels, image_size)
    return comfy.sd.load_diffusion_model_state_dict(state, model_options=model_options or {})


class FakeClip:
    """Stand-in for ComfyUI's CLIP: a prompt maps to a fixed seeded (1, 77, ``width``) embedding (zeros for "").

    ``pooled``: also a seeded (1, pooled) ``pooled_output`` (SDXL's ADM input: 1280 for CLIP-G). Text
    encoding is ComfyUI's business, and a real CLIP-L would dominate a test's or benchmark's run time.
    """

    def __init__(self, width: int = 768, pooled: int | None = None):
        self.width, self.pooled = width, pooled

    def tokenize(self, text):
        return text

    def encode_from_tokens_scheduled(self, tokens):
        gen = torch.Generator().manual_seed(sum(map(ord, tokens)) + 1)
        scale = 0 if not tokens else 1
        extra = {} if self.pooled is None else {"pooled_output": torch.randn(1, self.pooled, generator=gen) * scale}
        return [[torch.randn(1, 77, self.width, generator=gen) * scale, extra]]
