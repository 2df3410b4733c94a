"""Proxy model: an SD-structured pixel-space UNet2DConditionModel plus a tiny word-level CLIP text encoder.

Everything is defined in code (no tokenizer or config files, no downloads). Weights live in
``bench/proxy/weights/proxy.safetensors`` (UNet under ``unet.``, text encoder under ``text_encoder.``).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
WEIGHTS = HERE / "weights" / "proxy.safetensors"

# ---------------------------------------------------------------- vocabulary / tokenizer
PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
WORDS = [
    "a", "an", "the", "in", "on", "of",
    "small", "large",
    "red", "green", "blue", "yellow", "purple", "cyan",
    "circle", "square", "triangle",
    "top", "bottom", "left", "right",
    "black", "gray", "white", "background",
]
VOCAB = [PAD, BOS, EOS, UNK] + WORDS
WORD_TO_ID = {w: i for i, w in enumerate(VOCAB)}
MAX_LEN = 16  # bos + up to 14 words + eos, padded


def tokenize(prompts, max_len: int = MAX_LEN) -> torch.LongTensor:
    """Word-level tokenizer: lower-case, split on whitespace, ``<bos> words <eos> <pad>...``.

    Unknown words map to ``<unk>``; prompts longer than ``max_len - 2`` words are truncated.
    The empty prompt "" is the unconditional (classifier-free guidance) prompt.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    ids = torch.full((len(prompts), max_len), WORD_TO_ID[PAD], dtype=torch.long)
    for row, prompt in enumerate(prompts):
        words = prompt.lower().replace(",", " ").split()[: max_len - 2]
        toks = [WORD_TO_ID[BOS]] + [WORD_TO_ID.get(w, WORD_TO_ID[UNK]) for w in words] + [WORD_TO_ID[EOS]]
        ids[row, : len(toks)] = torch.tensor(toks)
    return ids


# ---------------------------------------------------------------- configs
TEXT_CONFIG = dict(
    vocab_size=len(VOCAB), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
    num_attention_heads=4, max_position_embeddings=MAX_LEN, projection_dim=64,
    pad_token_id=WORD_TO_ID[PAD], bos_token_id=WORD_TO_ID[BOS], eos_token_id=WORD_TO_ID[EOS],
    hidden_act="quick_gelu",
)

UNET_CONFIG = dict(
    sample_size=32, in_channels=3, out_channels=3,
    # SD puts cross-attention on the three high-resolution levels; at 32x32 pixels self-attention over
    # 1024 tokens is too slow to train on 2 CPU cores, so here the 32x32 level is ResNet-only and the
    # 16x16 and 8x8 levels (and the mid block) carry the transformer blocks.
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64, 128), layers_per_block=1, norm_num_groups=32,
    cross_attention_dim=64, attention_head_dim=4,  # diffusers' SD1 naming: 4 heads (head dims 16 and 32)
)

# DDPM's linear schedule (1e-4 -> 0.02, 1000 steps, epsilon prediction). Not SD's scaled_linear: in pixel
# space at 32x32 its terminal SNR (0.0047) leaves the image mean and the object's quadrant readable in x_T,
# so a model trained with it copies layout and background colour from the initial noise instead of the
# caption (measured: that run placed shapes at random). clip_sample=True (clamp the predicted x0 to
# [-1, 1] at sampling, as DDPM does in pixel space) only affects sampling, not training.
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                        prediction_type="epsilon", clip_sample=True)


def train_alphas_cumprod(config: dict | None = None) -> torch.Tensor:
    """alphas_cumprod exactly as diffusers' DDPM/DDIM schedulers compute it for ``config``."""
    c = config or SCHEDULER_CONFIG
    n = c["num_train_timesteps"]
    if c["beta_schedule"] == "linear":
        betas = torch.linspace(c["beta_start"], c["beta_end"], n, dtype=torch.float32)
    elif c["beta_schedule"] == "scaled_linear":
        betas = torch.linspace(c["beta_start"] ** 0.5, c["beta_end"] ** 0.5, n, dtype=torch.float32) ** 2
    else:
        raise ValueError(c["beta_schedule"])
    return torch.cumprod(1.0 - betas, dim=0)


def build_scheduler_config() -> dict:
    return dict(SCHEDULER_CONFIG)


def build_unet(seed: int | None = 0, **overrides):
    from diffusers import UNet2DConditionModel

    if seed is not None:
        torch.manual_seed(seed)
    return UNet2DConditionModel(**{**UNET_CONFIG, **overrides})


def build_text_encoder(seed: int | None = 0, **overrides):
    from transformers import CLIPTextConfig, CLIPTextModel

    if seed is not None:
        torch.manual_seed(seed)
    config = CLIPTextConfig(**{**TEXT_CONFIG, **overrides})
    config._attn_implementation = "eager"  # deterministic, hookable, same on every machine
    return CLIPTextModel(config)


# ---------------------------------------------------------------- save / load
def save_proxy(unet, text_encoder, path=WEIGHTS, dtype=torch.float32, extra_meta: dict | None = None):
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for prefix, module in (("unet.", unet), ("text_encoder.", text_encoder)):
        for name, value in module.state_dict().items():
            tensors[prefix + name] = value.detach().to(dtype).contiguous().clone()
    meta = {"unet_config": json.dumps(UNET_CONFIG), "text_config": json.dumps(TEXT_CONFIG),
            "scheduler_config": json.dumps(SCHEDULER_CONFIG), "vocab": json.dumps(VOCAB)}
    meta.update({k: str(v) for k, v in (extra_meta or {}).items()})
    save_file(tensors, str(path), metadata=meta)
    return path


def load_proxy(path=WEIGHTS, device="cpu", dtype=torch.float32, trained: bool = True, seed: int = 0):
    """Return ``dict(unet, text_encoder, tokenize, scheduler_config, vocab)`` ready for :func:`sample`.

    ``trained=False`` gives the same architecture randomly initialised with ``seed`` (the baseline).
    The stored weights (fp32) are cast to ``dtype`` (fp32 by default).
    """
    unet = build_unet(seed)
    text_encoder = build_text_encoder(seed + 1)
    if trained:
        from safetensors.torch import load_file

        state = load_file(str(path))
        for prefix, module in (("unet.", unet), ("text_encoder.", text_encoder)):
            sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            missing, unexpected = module.load_state_dict(sub, strict=False)
            # position_ids is a non-persistent buffer in recent transformers; anything else is an error
            missing = [k for k in missing if not k.endswith("position_ids")]
            unexpected = [k for k in unexpected if not k.endswith("position_ids")]
            if missing or unexpected:
                raise RuntimeError(f"{prefix} state mismatch: missing={missing} unexpected={unexpected}")
    for module in (unet, text_encoder):
        module.to(device)
        if dtype != torch.float32:
            module.to(dtype)
        module.eval().requires_grad_(False)
    return dict(unet=unet, text_encoder=text_encoder, tokenize=tokenize,
                scheduler_config=build_scheduler_config(), vocab=list(VOCAB))


def count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())

