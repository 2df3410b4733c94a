"""LoRA on a quantized MODEL inside real ComfyUI: per-step sampling time with 0, 1 and 3 LoRAs, and patch time.

    python bench/lora.py [--comfyui PATH] [--json bench/out/lora.json] [--repeats 3] [--steps 3]
                         [--latent 32] [--levels 2] [--rank 32] [--threads 1]

Model: an SD1.5-layout UNet (model_channels 320, context 768, ``--levels`` levels with one ResBlock
and one transformer each, seeded random weights) loaded by ComfyUI's own loader, sampled with
ComfyUI's euler sampler (CFG batch of 2) on a ``--latent`` x ``--latent`` latent. ``--preset`` (W8A8)
calibration by the Calibrate & Quantize node (2 prompts, 2 steps: enough for timing; the final-latent
errors reported are indicative only, the fidelity claims are tested in tests/test_comfyui_lora.py).

LoRAs: seeded kohya-style rank ``--rank`` factors on every attention projection (attn1/attn2 to_q,
to_k, to_v, to_out.0) and every transformer proj_in / proj_out, loaded with comfy.sd.load_lora_for_models;
the 3-LoRA case stacks three different ones (strengths 1.0, 0.7, -0.5).

Two ways to run a LoRA on the quantized layers, both measured:
- ``merge``: what the pack does. ComfyUI merges each patch once per load through the layers'
  convert_weight / set_weight (dequantize, add, requantize: W8 on the calibrated scales, grown for
  rows that would saturate; W4 layers hold the merged weight as int8 codes); steps then run the same
  int8 kernels as without LoRA.
- ``branch``: a low-rank float side branch, built here for comparison: each LoRA'd quantized layer
  is object-patched with a wrapper computing ``layer(x) + sum_i s_i * up_i(down_i(x))`` in float32
  every step; nothing is merged (patch time ~ 0) and the int8 weights never change.
The float model with the same LoRAs (``float``) is the reference for speed and for the final-latent
error of both ways (same seed).

Timing: every configuration is loaded (``patch_s``: ComfyUI's load_models_gpu after another model was
loaded, i.e. unpatch + object patches + LoRA merge), then sampled with a step callback timestamping
every step. ``per_step_s``: median step time excluding the first step (steady state; with 2 timestep
groups one more step per load does a one-shot check, which the median absorbs); ``first_step_s``:
the first step (includes one-time work after a load: oneDNN weight prepacking, time-table
verification, the activation-range check); ``mean_step_s``: sampling time / steps. Configurations
run round-robin for ``--repeats`` rounds; medians over rounds.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.tiny_models import FakeClip, comfy_sd15_unet  # noqa: E402


def setup_comfy(path: str):
    for extra in (path, os.path.join(path, "_shims")):  # _shims: a pure-Python torchvision, if needed
        if os.path.isdir(extra) and extra not in sys.path:
            sys.path.append(extra)
    import comfy.cli_args
    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401
    import comfy.sample  # noqa: F401
    import comfy.sd  # noqa: F401
    import importlib.util
    spec = importlib.util.spec_from_file_location("fidelityquant_pack", REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["fidelityquant_pack"] = pack
    spec.loader.exec_module(pack)
    return comfy, pack


def build_model(comfy, levels: int, latent: int, seed: int = 0):
    """(ModelPatcher, parameter count) of the seeded SD1.5-layout UNet (bench/tiny_models.py), loaded by ComfyUI."""
    unet = comfy_sd15_unet(levels, image_size=latent, seed=seed)
    state = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    return comfy.sd.load_diffusion_model_state_dict(state), sum(p.numel() for p in unet.parameters())


TARGET_SUFFIXES = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                   "attn2.to_v", "attn2.to_out.0", "proj_in", "proj_out")


def lora_targets(unet) -> dict:
    return {name: m for name, m in unet.named_modules() if name.endswith(TARGET_SUFFIXES)}


def make_lora(targets: dict, rank: int, seed: int, size: float = 0.2) -> dict:
    """Kohya-style state dict (ldm names: ``lora_unet_<module with _>``), product norm = size x weight norm."""
    gen = torch.Generator().manual_seed(seed)
    lora = {}
    for name, module in targets.items():
        w = module.weight.detach().float()
        down = torch.randn(rank, *w.shape[1:], generator=gen) / math.sqrt(w[0].numel())
        up = torch.randn(w.shape[0], rank, *([1] * (w.dim() - 2)), generator=gen)
        up *= size * float(w.norm()) / float((up.flatten(1) @ down.flatten(1)).norm())
        key = "lora_unet_" + name.replace(".", "_")
        lora.update({f"{key}.lora_up.weight": up, f"{key}.lora_down.weight": down,
                     f"{key}.alpha": torch.tensor(float(rank))})
    return lora


class LoRABranch(nn.Module):
    """A quantized layer plus low-rank float side branches: ``base(x) + sum s * up(down(x))``."""

    def __init__(self, base: nn.Module, factors: list) -> None:
        super().__init__()
        self.base = base
        self.downs = nn.ParameterList([nn.Parameter(d.float(), requires_grad=False) for d, _, _ in factors])
        self.ups = nn.ParameterList([nn.Parameter(u.float(), requires_grad=False) for _, u, _ in factors])
        self.scales = [float(s) for _, _, s in factors]
        self.conv = isinstance(base, nn.Conv2d) or hasattr(base, "kernel_size")

    def forward(self, x):
        out = self.base(x)
        xf = x.float()
        for down, up, s in zip(self.downs, self.ups, self.scales):
            if self.conv:
                b = self.base
                h = F.conv2d(xf, down, None, b.stride, b.padding, b.dilation)
                out = out + (s * F.conv2d(h, up)).to(out.dtype)
            else:
                out = out + (s * F.linear(F.linear(xf, down), up)).to(out.dtype)
        return out


def branch_model(pack, qmodel, result, loras: list):
    """qmodel with every LoRA'd quantized layer replaced by a LoRABranch (nothing merged)."""
    m = qmodel.clone()
    per_layer: dict = {}
    for lora, strength in loras:
        for key in lora:
            if key.endswith(".lora_up.weight"):
                stem = key[:-len(".lora_up.weight")]
                name = stem[len("lora_unet_"):]
                up, down = lora[key], lora[stem + ".lora_down.weight"]
                alpha = float(lora[stem + ".alpha"]) if stem + ".alpha" in lora else down.shape[0]
                per_layer.setdefault(name, []).append((down, up, strength * alpha / down.shape[0]))
    layers = pack.nodes.patching.runtime_for(result, qmodel.model).layers  # the quantized MODEL's layer modules
    by_flat = {n.replace(".", "_"): n for n in layers}
    for flat, factors in per_layer.items():
        name = by_flat.get(flat)
        if name is not None:
            m.add_object_patch(f"diffusion_model.{name}", LoRABranch(layers[name], factors))
    pack.nodes.patching.fresh_weight_state(m)
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"))
    ap.add_argument("--json", default=str(REPO / "bench" / "out" / "lora.json"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--latent", type=int, default=32)
    ap.add_argument("--levels", type=int, default=2)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--preset", default="W8A8", choices=["W8A8", "W4A8"])
    args = ap.parse_args()
    if not args.comfyui:
        sys.exit("bench/lora.py needs ComfyUI: pass --comfyui PATH or set COMFYUI_PATH")
    torch.set_num_threads(args.threads)
    comfy, pack = setup_comfy(args.comfyui)
    import comfy.model_management as mm

    model, params = build_model(comfy, args.levels, args.latent)
    clip = FakeClip()
    t0 = time.perf_counter()
    qmodel, result, _ = pack.nodes.fidelity_nodes.CalibrateAndQuantize().run(
        model=model, clip=clip, prompts="a red house\na blue boat", negative="", steps=2, cfg=5.0,
        sampler_name="euler", scheduler="normal", width=args.latent * 8, height=args.latent * 8, seed=0,
        preset=args.preset, timestep_groups=2, bits_budget=4.5, consistency_pass=False, memory_limit_mb=256)["result"]
    calib_s = time.perf_counter() - t0
    mm.unload_all_models()
    targets = lora_targets(model.model.diffusion_model)
    quantized_targets = [n for n in targets if n in result.layers]
    loras = [(make_lora(targets, args.rank, seed), strength) for seed, strength in ((1, 1.0), (2, 0.7), (3, -0.5))]

    def with_loras(m, count):
        for lora, strength in loras[:count]:
            m = comfy.sd.load_lora_for_models(m, None, lora, strength, 0)[0]
        return m

    configs = {"float-0": model, "float-1": with_loras(model, 1), "float-3": with_loras(model, 3),
               "merge-0": qmodel, "merge-1": with_loras(qmodel, 1), "merge-3": with_loras(qmodel, 3),
               "branch-1": branch_model(pack, qmodel, result, loras[:1]),
               "branch-3": branch_model(pack, qmodel, result, loras[:3])}
    pos, neg = clip.encode_from_tokens_scheduled("a red house"), clip.encode_from_tokens_scheduled("")
    latent = torch.zeros(1, 4, args.latent, args.latent)
    noise = comfy.sample.prepare_noise(latent, 3)
    times = {k: {"per_step_s": [], "first_step_s": [], "mean_step_s": [], "patch_s": []} for k in configs}
    outputs = {}
    for round_index in range(args.repeats):
        for name, m in configs.items():
            t0 = time.perf_counter()
            mm.load_models_gpu([m])
            patch = time.perf_counter() - t0
            stamps = []
            t0 = time.perf_counter()
            out = comfy.sample.sample(m, noise, args.steps, 5.0, "euler", "normal", pos, neg, latent,
                                      disable_pbar=True, seed=3,
                                      callback=lambda *a: stamps.append(time.perf_counter()))
            sample_s = time.perf_counter() - t0
            steps = [b - a for a, b in zip([t0] + stamps[:-1], stamps)]
            steady = statistics.median(steps[1:]) if len(steps) > 1 else steps[0]
            times[name]["patch_s"].append(patch)
            times[name]["per_step_s"].append(steady)
            times[name]["first_step_s"].append(steps[0])
            times[name]["mean_step_s"].append(sample_s / args.steps)
            outputs.setdefault(name, out.float())
            print(f"round {round_index + 1}/{args.repeats} {name:9s} load {patch:6.3f}s  first step {steps[0]:6.3f}s  "
                  f"steady step {steady:6.3f}s", flush=True)
    mm.unload_all_models()

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    summary = {}
    for name, t in times.items():
        kind, count = name.split("-")
        entry = {key: statistics.median(values) for key, values in t.items()}
        entry["all"] = t
        reference = outputs[f"float-{count}"]
        if kind != "float":
            entry["rel_err_vs_float_same_loras"] = rel(outputs[name], reference)
        summary[name] = entry
    base_q = summary["merge-0"]["per_step_s"]
    for name, entry in summary.items():
        kind, count = name.split("-")
        base = summary["float-0"]["per_step_s"] if kind == "float" else base_q
        entry["step_overhead_pct"] = 100 * (entry["per_step_s"] / base - 1)

    record = {
        "command": " ".join(["python", "bench/lora.py"] + sys.argv[1:]),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                    "threads": args.threads, "cuda": torch.cuda.is_available(),
                    "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None},
        "model": {"layout": "SD1.5 ldm", "model_channels": 320, "levels": args.levels, "params": params,
                  "latent": args.latent, "steps": args.steps, "cfg_batch": 2},
        "quantization": {"preset": args.preset, "quantized_layers": len(result.layers), "calibration_s": calib_s},
        "lora": {"rank": args.rank, "targets": len(targets), "quantized_targets": len(quantized_targets),
                 "strengths": [s for _, s in loras], "size": "up@down norm = 0.2 x weight norm"},
        "repeats": args.repeats, "results": summary,
    }
    out_path = Path(args.json)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(record, indent=2))

    print(f"\nSD1.5-layout UNet, {params / 1e6:.1f}M params, {args.levels} levels, latent {args.latent}x{args.latent}, "
          f"CFG batch 2, {args.steps} euler steps, {args.threads} thread(s); {args.preset} ({len(result.layers)} quantized "
          f"layers); LoRA rank {args.rank} on {len(targets)} layers; median of {args.repeats} interleaved rounds")
    print("| config | LoRAs | steady step s | vs same kind, 0 LoRA | first step s | mean step s | load/patch s "
          "| rel err vs float+same LoRAs |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, e in summary.items():
        kind, count = name.split("-")
        err = e.get("rel_err_vs_float_same_loras")
        print(f"| {kind} | {count} | {e['per_step_s']:.3f} | {e['step_overhead_pct']:+.1f}% | {e['first_step_s']:.3f} | "
              f"{e['mean_step_s']:.3f} | {e['patch_s']:.3f} | {'-' if err is None else f'{err:.4f}'} |")
    print(f"\nwrote {out_path}")


if __name__ == "__main__":
    main()
