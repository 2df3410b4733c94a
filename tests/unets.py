"""Small seeded UNets (diffusers layout) and a plain sampler loop used as a calibration runner.

The diffusers UNets come from the one shared builder, bench/tiny_models.py ``tiny_unet``; the names here
are the widths the tests were written against."""
import torch

from bench.tiny_models import tiny_unet as build_tiny_unet


def tiny_unet(variant: str = "sd1", seed: int = 0):
    """The calibration tests' UNet: contexts 64 / 96 / 64, SDXL conditioning on the SD1 block layout (pooled 64),
    seeded on the global RNG (the tests' later random draws follow from it)."""
    return build_tiny_unet(variant, seed, context={"sd1": 64, "sd2": 96, "sdxl": 64}.get(variant), pooled=64,
                           sdxl_blocks=False, norm_groups=16, isolate_rng=False)


class LoopRunner:
    """Seeded DDIM sampling with classifier-free guidance over fixed random 'prompt embeddings'."""

    def __init__(self, unet, prompts: int = 2, steps: int = 6, guidance: float = 5.0, seed: int = 0, size: int = 16):
        from diffusers import DDIMScheduler

        self.steps, self.guidance, self.size = steps, guidance, size
        self.total_unet_calls = prompts * steps
        gen = torch.Generator().manual_seed(seed)
        dim = unet.config.cross_attention_dim
        self.cond = [torch.randn(1, 7, dim, generator=gen) for _ in range(prompts)]
        self.uncond = torch.zeros(1, 7, dim)
        self.noise = [torch.randn(1, 4, size, size, generator=gen) for _ in range(prompts)]
        self.sdxl = unet.config.addition_embed_type == "text_time"
        self.pooled = [torch.randn(1, 64, generator=gen) for _ in range(prompts)]
        self.scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)

    def __call__(self, unet):
        return [self.sample(unet, i) for i in range(len(self.cond))]

    @torch.no_grad()
    def sample(self, unet, index: int):
        self.scheduler.set_timesteps(self.steps)
        x = self.noise[index].clone()
        context = torch.cat([self.uncond, self.cond[index]])
        kwargs = {}
        if self.sdxl:
            pooled = torch.cat([torch.zeros_like(self.pooled[index]), self.pooled[index]])
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled,
                                           "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]] * 2, dtype=torch.float32)}
        for t in self.scheduler.timesteps:
            eps = unet(torch.cat([x, x]), t, encoder_hidden_states=context, **kwargs).sample
            uncond, cond = eps.chunk(2)
            x = self.scheduler.step(uncond + self.guidance * (cond - uncond), t, x).prev_sample
        return x


# --------------------------------------------------------------------------------------------------
# Builders for family-adapter and time-precalculation tests: small diffusers UNets with the real
# context widths (so variant detection sees 768 / 1024 / 2048), and a miniature ldm-layout UNet
# (ComfyUI / A1111 module names) for when ComfyUI itself is not importable.

def diffusers_unet(variant: str = "sd1", seed: int = 0):
    """The adapter tests' UNet: the real SD context widths (768 / 1024 / 2048), SDXL block layout, sample 8,
    seeded on the global RNG."""
    return build_tiny_unet(variant, seed, sample_size=8, isolate_rng=False)


def diffusers_call(unet, batch: int = 2, tokens: int = 5, seed: int = 1) -> dict:
    """Keyword arguments (besides the timestep) for one call of a ``diffusers_unet``."""
    gen = torch.Generator().manual_seed(seed)
    kwargs = {"sample": torch.randn(batch, 4, 8, 8, generator=gen),
              "encoder_hidden_states": torch.randn(batch, tokens, unet.config.cross_attention_dim, generator=gen)}
    if unet.config.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 32, generator=gen),
                                       "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]]).repeat(batch, 1)}
    return kwargs


def timestep_embedding(timesteps, dim, max_period=10000, repeat_only=False):
    """Sinusoidal embedding, ldm convention (cos then sin); the mini ldm UNet's forward calls this."""
    import math

    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class _ResBlock(torch.nn.Module):
    def __init__(self, ch, emb_ch, out_ch):
        super().__init__()
        nn = torch.nn
        self.in_layers = nn.Sequential(nn.GroupNorm(8, ch), nn.SiLU(), nn.Conv2d(ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_ch, out_ch))
        self.out_layers = nn.Sequential(nn.GroupNorm(8, out_ch), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip_connection = nn.Identity() if ch == out_ch else nn.Conv2d(ch, out_ch, 1)

    def forward(self, x, emb):
        h = self.in_layers(x) + self.emb_layers(emb).type(x.dtype)[..., None, None]
        return self.skip_connection(x) + self.out_layers(h)


class _Attention(torch.nn.Module):
    def __init__(self, dim, context_dim, heads=2):
        super().__init__()
        nn = torch.nn
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x, context=None):
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # noqa: E731
        out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
        return self.to_out(out.transpose(1, 2).flatten(2))


class _SpatialTransformer(torch.nn.Module):
    def __init__(self, ch, context_dim, linear):
        super().__init__()
        nn = torch.nn
        self.norm = nn.GroupNorm(8, ch)
        self.proj_in = nn.Linear(ch, ch) if linear else nn.Conv2d(ch, ch, 1)
        block = nn.Module()
        block.attn1, block.attn2 = _Attention(ch, ch), _Attention(ch, context_dim)
        block.norm1, block.norm2, block.norm3 = nn.LayerNorm(ch), nn.LayerNorm(ch), nn.LayerNorm(ch)
        block.ff = nn.Module()
        block.ff.net = nn.Sequential(nn.Linear(ch, 4 * ch), nn.GELU(), nn.Linear(4 * ch, ch))
        self.transformer_blocks = nn.ModuleList([block])
        self.proj_out = nn.Linear(ch, ch) if linear else nn.Conv2d(ch, ch, 1)
        self.linear = linear

    def forward(self, x, context):
        b, c, h, w = x.shape
        y = self.norm(x)
        if not self.linear:
            y = self.proj_in(y)
        y = y.flatten(2).transpose(1, 2)
        if self.linear:
            y = self.proj_in(y)
        for block in self.transformer_blocks:
            y = y + block.attn1(block.norm1(y))
            y = y + block.attn2(block.norm2(y), context)
            y = y + block.ff.net(block.norm3(y))
        if self.linear:
            y = self.proj_out(y)
        y = y.transpose(1, 2).reshape(b, c, h, w)
        return x + (y if self.linear else self.proj_out(y))


class _Down(torch.nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.op = torch.nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class _Up(torch.nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = torch.nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))


class _EmbedSequential(torch.nn.Sequential):
    def forward(self, x, emb, context=None):
        for layer in self:
            if isinstance(layer, _ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, _SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNetModel(torch.nn.Module):
    """Miniature ldm-layout UNet (ComfyUI / A1111 module names and forward signature), two levels."""

    def __init__(self, context_dim=768, linear=False, adm_in_channels=None, model_channels=32):
        super().__init__()
        nn = torch.nn
        mc, ted = model_channels, 4 * model_channels
        self.model_channels = mc
        self.time_embed = nn.Sequential(nn.Linear(mc, ted), nn.SiLU(), nn.Linear(ted, ted))
        if adm_in_channels:
            self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(adm_in_channels, ted), nn.SiLU(), nn.Linear(ted, ted)))
        st = lambda ch: _SpatialTransformer(ch, context_dim, linear)  # noqa: E731
        self.input_blocks = nn.ModuleList([
            _EmbedSequential(nn.Conv2d(4, mc, 3, padding=1)),
            _EmbedSequential(_ResBlock(mc, ted, mc), st(mc)),
            _EmbedSequential(_Down(mc)),
            _EmbedSequential(_ResBlock(mc, ted, 2 * mc), st(2 * mc))])
        self.middle_block = _EmbedSequential(_ResBlock(2 * mc, ted, 2 * mc), st(2 * mc), _ResBlock(2 * mc, ted, 2 * mc))
        self.output_blocks = nn.ModuleList([
            _EmbedSequential(_ResBlock(4 * mc, ted, 2 * mc), st(2 * mc)),
            _EmbedSequential(_ResBlock(3 * mc, ted, 2 * mc), st(2 * mc), _Up(2 * mc)),
            _EmbedSequential(_ResBlock(3 * mc, ted, mc), st(mc)),
            _EmbedSequential(_ResBlock(2 * mc, ted, mc), st(mc))])
        self.out = nn.Sequential(nn.GroupNorm(8, mc), nn.SiLU(), nn.Conv2d(mc, 4, 3, padding=1))

    def forward(self, x, timesteps=None, context=None, y=None, **kwargs):
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels, repeat_only=False).to(x.dtype))
        if hasattr(self, "label_emb"):
            emb = emb + self.label_emb(y)
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.out(h)


def ldm_unet(variant: str = "sd1", seed: int = 0) -> UNetModel:
    """Seeded miniature ldm UNet: sd1 (context 768, conv projections), sd2 (1024, linear), sdxl (2048, label_emb)."""
    torch.manual_seed(seed)
    if variant == "sd1":
        return UNetModel(768).eval()
    if variant == "sd2":
        return UNetModel(1024, linear=True).eval()
    if variant == "sdxl":
        return UNetModel(2048, linear=True, adm_in_channels=48).eval()
    raise ValueError(variant)


_COMFY_CACHE: dict = {}


def comfyui_unet(variant: str = "sd1"):
    """A seeded small UNetModel from a real ComfyUI checkout (env COMFYUI_PATH), or pytest.skip with the reason.

    SD1.5 layout (model_channels 320, context 768, conv projections) or SDXL layout (context 2048,
    linear projections, label_emb with adm_in_channels 2816), channel_mult (1, 2), one ResBlock per level,
    built with comfy.ops.disable_weight_init and then initialised here. Cached: deepcopy before mutating.
    """
    from comfyui_env import comfyui_path, import_comfyui

    comfyui_path("the ldm adapter tests on ComfyUI's UNetModel")
    if variant in _COMFY_CACHE:
        return _COMFY_CACHE[variant]
    import_comfyui("the ldm adapter tests on ComfyUI's UNetModel", "comfy.ops",
                   "comfy.ldm.modules.diffusionmodules.openaimodel")
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel as ComfyUNetModel
    kw = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1, 1],
              channel_mult=(1, 2), transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1],
              transformer_depth_middle=1, use_spatial_transformer=True, context_dim=768, num_heads=-1,
              num_head_channels=64, use_linear_in_transformer=False, legacy=False, adm_in_channels=None,
              use_temporal_attention=False, use_temporal_resblock=False, use_checkpoint=False,
              dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init)
    if variant == "sdxl":
        kw.update(context_dim=2048, use_linear_in_transformer=True, num_classes="sequential", adm_in_channels=2816)
    elif variant != "sd1":
        raise ValueError(variant)
    torch.manual_seed(0)
    unet = ComfyUNetModel(**kw)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # disable_weight_init leaves torch.empty weights
        for name, p in unet.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            elif p.dim() == 1:  # norm scales
                p.copy_(1 + torch.randn(p.shape, generator=gen) * 0.1)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / max(1, p[0].numel()) ** 0.5)
    _COMFY_CACHE[variant] = unet.eval()
    return _COMFY_CACHE[variant]
