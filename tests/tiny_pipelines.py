"""Tiny but real diffusers pipelines (SD1 / SD2 / SDXL layout) with seeded random weights, built offline.

Everything is built from configs; nothing is downloaded. The CLIP tokenizer is a genuine
``transformers.CLIPTokenizer`` loaded with ``from_pretrained`` from a ``vocab.json`` + ``merges.txt``
written into a temporary directory at runtime: a byte-level BPE vocabulary with the 256 byte symbols
(each also with the ``</w>`` end-of-word suffix, as in OpenAI CLIP), whole-word merges for a few common
prompt words, and the special tokens ``<|startoftext|>`` / ``<|endoftext|>``. Any text therefore
tokenizes (unknown words fall back to single bytes), so prompts are real prompts, not embeddings.

Sizes: text encoders 2 layers, hidden 32 / 64; UNet block_out_channels (32, 64), one layer per block;
VAE block_out_channels (8, 16) (scale factor 2), so the default image is 32x32 and latents are 4x16x16.

Weights are deterministic given ``seed``: each module is built under ``torch.manual_seed(seed + k)``
inside ``torch.random.fork_rng`` so the caller's global RNG state is left untouched.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from bench.tiny_models import tiny_unet as build_tiny_unet

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_TOKENS = 77  # CLIP's context length; the text encoders have 77 positions

# Whole-word BPE merges for these (every other word is spelled out in byte symbols).
WORDS = ("a", "an", "the", "of", "in", "on", "with", "and", "at", "photo", "painting", "portrait", "picture",
         "cat", "dog", "bird", "horse", "car", "house", "tree", "city", "mountain", "lake", "river", "sea",
         "beach", "forest", "sky", "sunset", "night", "street", "man", "woman", "child", "red", "blue",
         "green", "yellow", "white", "black", "old", "small", "big", "beautiful", "detailed", "high",
         "quality", "style", "oil", "digital", "art", "landscape", "close", "up", "view", "light")

# Default Stable Diffusion noise schedule (scheduler_config.json of SD 1.x / 2.x / XL).
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   steps_offset=1, prediction_type="epsilon")


def _bytes_to_unicode() -> dict:
    """GPT-2 / CLIP byte -> printable unicode character table (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clip_vocab(words=WORDS) -> tuple[dict, list]:
    """(vocab, merges) of a small byte-level CLIP BPE: 512 byte symbols, whole-word merges, BOS / EOS last."""
    alphabet = list(_bytes_to_unicode().values())
    vocab = {}
    for symbol in alphabet + [c + "</w>" for c in alphabet]:
        vocab[symbol] = len(vocab)
    ranks = {}  # (left, right) -> merge priority, as in merges.txt order
    for word in words:
        # Add merges until the word is one token under *all* merges so far (an earlier word's merge such as
        # "a t</w>" from "at" would otherwise split "cat"); a new merge has the lowest priority, so words
        # already whole stay whole.
        while len(pieces := _bpe(word, ranks)) > 1:
            ranks[(pieces[0], pieces[1])] = len(ranks)
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
    merges = [f"{left} {right}" for (left, right), _ in sorted(ranks.items(), key=lambda item: item[1])]
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return vocab, merges


def _bpe(word: str, ranks: dict) -> list:
    """CLIP BPE of one lowercase word (symbols, last one with the end-of-word suffix) under ``ranks``."""
    pieces = list(word)
    pieces[-1] += "</w>"
    while len(pieces) > 1:
        rank, i = min((ranks.get((a, b), float("inf")), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:])))
        if rank == float("inf"):
            break
        pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def make_tiny_tokenizer(pad_token: str = EOS, max_length: int = MAX_TOKENS):
    """A ``transformers.CLIPTokenizer`` from vocab.json + merges.txt written to a temporary directory."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab()
    with tempfile.TemporaryDirectory(prefix="tiny_clip_tok_") as folder:
        Path(folder, "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        Path(folder, "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=max_length, pad_token=pad_token,
                                                  local_files_only=True)
    return tokenizer


def _seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _text_encoder(tokenizer, hidden: int, seed: int, projection_dim: int | None = None, act: str = "quick_gelu"):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_TOKENS,
                            hidden_act=act, projection_dim=projection_dim or hidden,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    cls = CLIPTextModelWithProjection if projection_dim else CLIPTextModel
    return _seeded(seed, lambda: cls(config).eval())


def _vae(seed: int, scaling_factor: float = 0.18215):
    from diffusers import AutoencoderKL

    return _seeded(seed, lambda: AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=32, scaling_factor=scaling_factor).eval())


def _scheduler(name: str):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    if name == "ddim":
        return DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **SD_SCHEDULE)
    if name == "euler":
        return EulerDiscreteScheduler(timestep_spacing="leading", **SD_SCHEDULE)
    raise ValueError(f"unknown scheduler {name!r} (expected 'ddim' or 'euler')")


def make_tiny_unet(variant: str = "sd1", seed: int = 0, cross_attention_dim: int | None = None,
                   pooled_dim: int = 32):
    """The pipelines' UNet2DConditionModel alone (sd1: context 32; sd2: 64, linear proj; sdxl: 64, SDXL block
    layout, text_time), from the shared builder (bench/tiny_models.py), leaving the global RNG untouched."""
    return build_tiny_unet(variant, seed, context=cross_attention_dim or {"sd1": 32, "sd2": 64, "sdxl": 64}.get(variant),
                           pooled=pooled_dim, norm_groups=16)


def make_tiny_sd_pipeline(seed: int = 0, variant: str = "sd1", scheduler: str = "ddim"):
    """A ``diffusers.StableDiffusionPipeline`` (SD 1.x or 2.x layout), tiny, seeded, float32 on CPU.

    sd1: text encoder hidden 32 (quick_gelu), UNet cross_attention_dim 32, conv proj_in/proj_out.
    sd2: text encoder hidden 64 (gelu), UNet cross_attention_dim 64, use_linear_projection=True.
    """
    from diffusers import StableDiffusionPipeline

    if variant not in ("sd1", "sd2"):
        raise ValueError(f"unknown variant {variant!r} (expected 'sd1' or 'sd2'; SDXL: make_tiny_sdxl_pipeline)")
    hidden = 32 if variant == "sd1" else 64
    tokenizer = make_tiny_tokenizer()
    pipe = StableDiffusionPipeline(
        vae=_vae(seed + 1),
        text_encoder=_text_encoder(tokenizer, hidden, seed + 2, act="quick_gelu" if variant == "sd1" else "gelu"),
        tokenizer=tokenizer,
        unet=make_tiny_unet(variant, seed + 3, cross_attention_dim=hidden),
        scheduler=_scheduler(scheduler),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_tiny_sdxl_pipeline(seed: int = 0, scheduler: str = "euler"):
    """A ``diffusers.StableDiffusionXLPipeline``, tiny, seeded, float32 on CPU.

    text_encoder: CLIPTextModel hidden 32; text_encoder_2: CLIPTextModelWithProjection hidden 32, projection 32
    (tokenizer_2 pads with "!", as SDXL's does). UNet context = 32 + 32 = 64 (penultimate hidden states of
    both encoders concatenated); added conditioning = pooled projection (32) + 6 time ids x 8 = 80.
    """
    from diffusers import StableDiffusionXLPipeline

    tokenizer, tokenizer_2 = make_tiny_tokenizer(), make_tiny_tokenizer(pad_token="!")
    text_encoder = _text_encoder(tokenizer, 32, seed + 2)
    text_encoder_2 = _text_encoder(tokenizer_2, 32, seed + 4, projection_dim=32, act="gelu")
    pipe = StableDiffusionXLPipeline(
        vae=_vae(seed + 1, scaling_factor=0.13025), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=tokenizer, tokenizer_2=tokenizer_2,
        unet=make_tiny_unet("sdxl", seed + 3, cross_attention_dim=32 + 32, pooled_dim=32),
        scheduler=_scheduler(scheduler), force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
