#!/usr/bin/env python
"""Build a small seeded single-file SD1.5-layout checkpoint (and a kohya-style LoRA for it)
that AUTOMATIC1111 v1.10 and Forge both load, for headless host tests.

Run it with A1111's venv Python (it needs torch, safetensors, omegaconf, transformers and
A1111's `repositories/stable-diffusion-stability-ai` for ldm's own classes):

    $A1111_PYTHON tests/hosts/make_sd15_checkpoint.py --out /work/hosts/models/fq-sd15-tiny.safetensors \
        --seed 0 --small --lora /work/hosts/models/fq-tiny-lora.safetensors

Layout (the standard single-file SD1.x key set):
  model.diffusion_model.*                   ldm UNetModel built from A1111's configs/v1-inference.yaml
                                            (or the --small variant), zero-initialised output layers
                                            (ResBlock out_layers, SpatialTransformer proj_out, out.2)
                                            re-randomised, otherwise the UNet output and any LoRA do nothing
  cond_stage_model.transformer.text_model.* transformers CLIPTextModel with the CLIP-L config (12 layers)
  first_stage_model.*                       ldm Encoder/Decoder + quant convs = AutoencoderKL (248 keys)
Tensors are stored as fp16 (--fp32 to keep fp32); position_ids stay int64.

--small: UNet with model_channels 320 (both UIs' SD1 detection needs 320 and context 768),
channel_mult [1, 2], num_res_blocks 1, attention at both levels. Forge derives the UNet config
from the state dict (huggingface_guess), so it loads as is. A1111 builds the model from a yaml
config: for a file FOO.safetensors it uses FOO.yaml when present
(modules/sd_models_config.py find_checkpoint_config_near_filename), so --small also writes that
sidecar yaml next to the checkpoint. Without it A1111 would build the full v1 UNet and load the
small state dict non-strictly (mostly random weights) -- keep the yaml with the file.

--lora FILE: a kohya-style LoRA (lora_unet_<ldm module path with _>.lora_down/.lora_up/.alpha)
on every Linear/Conv2d inside the UNet's SpatialTransformers (attn1/attn2 q/k/v/out, ff, proj_in,
proj_out). Keys use ldm module names, which both UIs accept for any UNet layout (A1111:
extensions-builtin/Lora/networks.py "lora_unet" -> "diffusion_model" fallback; Forge:
model_lora_keys_unet's "lora_unet_" + ldm key map). Each delta is scaled to --lora-strength
(default 0.3) of its layer's weight norm, so `<lora:NAME:1>` visibly changes the image.
"""
import argparse
import hashlib
import json
import os
import sys


def find_a1111(args):
    cands = [args.a1111, os.environ.get("A1111_PATH"), "/work/hosts/a1111/webui"]
    for c in cands:
        if c and os.path.isfile(os.path.join(c, "configs", "v1-inference.yaml")):
            return os.path.abspath(c)
    sys.exit("A1111 tree not found (give --a1111 or set A1111_PATH); it provides configs/v1-inference.yaml "
             "and repositories/stable-diffusion-stability-ai (ldm)")


SMALL_UNET = dict(model_channels=320, channel_mult=[1, 2], num_res_blocks=1,
                  attention_resolutions=[1, 2], num_heads=8, transformer_depth=1, context_dim=768)

# CLIP-L text encoder (openai/clip-vit-large-patch14 text tower, as SD1.x uses it)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768,
              num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
              hidden_act="quick_gelu", layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2, pad_token_id=1)


def rerandomise_zero_layers(module, torch):
    n = 0
    for m in module.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and not torch.any(m.weight != 0):
            m.reset_parameters()
            n += 1
    return n


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="checkpoint path (.safetensors)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--small", action="store_true", help="smaller UNet (+ sidecar .yaml for A1111)")
    ap.add_argument("--fp32", action="store_true", help="store fp32 instead of fp16")
    ap.add_argument("--a1111", help="A1111 tree (default: $A1111_PATH, then /work/hosts/a1111/webui)")
    ap.add_argument("--lora", help="also write a seeded kohya-style LoRA here")
    ap.add_argument("--lora-rank", type=int, default=4)
    ap.add_argument("--lora-strength", type=float, default=0.3,
                    help="||delta|| / ||W|| per layer at multiplier 1")
    args = ap.parse_args()

    a1111 = find_a1111(args)
    sys.path.insert(0, os.path.join(a1111, "repositories", "stable-diffusion-stability-ai"))
    import torch
    from omegaconf import OmegaConf
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    from ldm.modules.diffusionmodules.model import Encoder, Decoder

    cfg = OmegaConf.load(os.path.join(a1111, "configs", "v1-inference.yaml"))
    unet_params = OmegaConf.to_container(cfg.model.params.unet_config.params)
    if args.small:
        unet_params.update(SMALL_UNET)
    vae_dd = OmegaConf.to_container(cfg.model.params.first_stage_config.params.ddconfig)
    embed_dim = int(cfg.model.params.first_stage_config.params.embed_dim)

    dtype = torch.float32 if args.fp32 else torch.float16
    sd = {}

    def put(prefix, module):
        for k, v in module.state_dict().items():
            v = v.detach()
            sd[prefix + k] = (v.to(dtype) if v.is_floating_point() else v).contiguous().clone()

    with torch.no_grad():
        torch.manual_seed(args.seed)
        unet = UNetModel(**unet_params).eval()
        n_zero = rerandomise_zero_layers(unet, torch)
        put("model.diffusion_model.", unet)

        torch.manual_seed(args.seed + 1)
        te = CLIPTextModel(CLIPTextConfig(**CLIP_L)).eval()
        put("cond_stage_model.transformer.", te)
        del te

        torch.manual_seed(args.seed + 2)
        vae = torch.nn.Module()
        vae.encoder = Encoder(**vae_dd)
        vae.decoder = Decoder(**vae_dd)
        vae.quant_conv = torch.nn.Conv2d(2 * vae_dd["z_channels"], 2 * embed_dim, 1)
        vae.post_quant_conv = torch.nn.Conv2d(embed_dim, vae_dd["z_channels"], 1)
        put("first_stage_model.", vae)
        del vae

    n_vae = sum(k.startswith("first_stage_model.") for k in sd)
    n_unet = sum(k.startswith("model.diffusion_model.") for k in sd)
    n_te = sum(k.startswith("cond_stage_model.") for k in sd)
    assert n_vae == 248, n_vae
    unet_count = sum(v.numel() for k, v in sd.items() if k.startswith("model.diffusion_model."))

    os.makedirs(os.path.dirname(os.path.abspath(args.out)) or ".", exist_ok=True)
    meta = {"fidelityquant_test_checkpoint": json.dumps(
        {"seed": args.seed, "small": args.small, "unet": unet_params, "dtype": str(dtype)})}
    save_file(sd, args.out, metadata=meta)
    yaml_path = os.path.splitext(args.out)[0] + ".yaml"
    if args.small:
        cfg.model.params.unet_config.params = OmegaConf.create(unet_params)
        OmegaConf.save(cfg, yaml_path)
    elif os.path.exists(yaml_path):
        os.remove(yaml_path)  # a stale sidecar would make A1111 build the wrong UNet

    h = hashlib.sha256(open(args.out, "rb").read()).hexdigest()
    print(json.dumps({"out": args.out, "bytes": os.path.getsize(args.out), "sha256": h,
                      "keys": {"unet": n_unet, "text_encoder": n_te, "vae": n_vae},
                      "unet_params": unet_count, "unet_config": unet_params,
                      "zero_layers_rerandomised": n_zero,
                      "sidecar_yaml": yaml_path if args.small else None}, indent=1))

    if args.lora:
        write_lora(args, unet, torch, save_file)


def write_lora(args, unet, torch, save_file):
    g = torch.Generator().manual_seed(args.seed + 100)
    r = args.lora_rank
    out = {}
    n = 0
    for name, m in unet.named_modules():
        if ".transformer_blocks." not in name and not name.endswith((".proj_in", ".proj_out")):
            continue
        if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1):
            continue
        w = m.weight.detach().float()
        o, i = w.shape[0], w.shape[1]
        down = torch.randn(r, i, generator=g) / i ** 0.5
        up = torch.randn(o, r, generator=g)
        delta = up @ down  # alpha == rank, so scale 1
        up *= args.lora_strength * w.norm() / delta.norm()
        if w.dim() == 4:
            down, up = down[:, :, None, None], up[:, :, None, None]
        key = "lora_unet_" + name.replace(".", "_")
        out[key + ".lora_down.weight"] = down.half().contiguous()
        out[key + ".lora_up.weight"] = up.half().contiguous()
        out[key + ".alpha"] = torch.tensor(float(r)).half()
        n += 1
    # one metadata entry only: safetensors writes several in varying order, and the file bytes
    # (its sha256) should depend on the seed alone
    meta = {"fidelityquant_test_lora": json.dumps({"seed": args.seed, "rank": r, "alpha": r,
                                                   "strength": args.lora_strength, "base": "sd_v1"})}
    save_file(out, args.lora, metadata=meta)
    print(json.dumps({"lora": args.lora, "bytes": os.path.getsize(args.lora), "layers": n, "rank": r}))


if __name__ == "__main__":
    main()
