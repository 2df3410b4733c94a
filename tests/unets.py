"""Small seeded UNets (diffusers layout) and a plain sampler loop used as a calibration runner."""
import torch


def tiny_unet(variant: str = "sd1", seed: int = 0):
    """A UNet2DConditionModel with SD structure (ResBlocks, cross-attention, skips), small channels."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    common = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                  block_out_channels=(32, 64), norm_num_groups=16,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    if variant == "sd1":
        unet = UNet2DConditionModel(cross_attention_dim=64, attention_head_dim=8, **common)
    elif variant == "sd2":
        unet = UNet2DConditionModel(cross_attention_dim=96, attention_head_dim=8, use_linear_projection=True, **common)
    elif variant == "sdxl":
        unet = UNet2DConditionModel(cross_attention_dim=64, attention_head_dim=8, use_linear_projection=True,
                                    addition_embed_type="text_time", addition_time_embed_dim=8,
                                    projection_class_embeddings_input_dim=64 + 6 * 8, **common)
    else:
        raise ValueError(variant)
    return unet.eval()


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
