"""Fidelity of each preset / ablation on the bundled proxy model vs its float images (a quick precursor
of bench/fidelity.py): same held-out prompts and seeds, PSNR / SSIM / image MSE, UNet error, calib time.

    python bench/proxy_ablation.py [--steps 10] [--images 12] [--calib-prompts 16] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from quant_core.config import preset  # noqa: E402
from quant_core.demo import ProxyRunner, calibration_prompts, compare, load_default_model, load_proxy_module  # noqa: E402
from quant_core.quantize import quantize  # noqa: E402

VARIANTS = [
    ("naive-W8A8", "naive-W8A8", {}),
    ("ours-W8A8", "W8A8", {}),
    ("naive-W4A8", "naive-W4A8", {}),
    ("qdiff-W4A8", "qdiff-W4A8", {}),
    ("ours-W4A8", "W4A8", {}),
    ("ours-W4A8 G=1", "W4A8", {"timestep_groups": 1}),
    ("ours-W4A8 no consistency", "W4A8", {"consistency_pass": False}),
    ("ours-W4A8 no precalc", "W4A8", {"time_precalc": False}),
    ("ours-W4A8 no clip search", "W4A8", {"weight_clip_search": False, "act_clip_search": False}),
    ("ours-W4A8-mixed", "W4A8-mixed", {}),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--calib-prompts", type=int, default=16)
    parser.add_argument("--only", default="", help="comma-separated variant names")
    parser.add_argument("--json", default=str(REPO / "bench" / "out" / "proxy_ablation.json"))
    args = parser.parse_args()
    proxy = load_proxy_module()
    bundle, trained = load_default_model(proxy, 0)
    unet, text_encoder = bundle["unet"], bundle["text_encoder"]
    calib = ProxyRunner(proxy, text_encoder, calibration_prompts(proxy, args.calib_prompts, 0), args.steps, 3.0, 0)
    held = [proxy.caption(*c) for c in proxy.HELD_OUT]
    held += calibration_prompts(proxy, args.images, 1)[: max(0, args.images - len(held))]
    held = held[: args.images]
    evaluate = ProxyRunner(proxy, text_encoder, held, args.steps, 3.0, 1000)
    float_images = evaluate.images(unet)
    rows = []
    only = set(filter(None, args.only.split(",")))
    print(f"model: {'trained proxy' if trained else 'proxy architecture, random weights'}; "
          f"{len(held)} held-out prompts, {args.steps} steps")
    print(f"{'variant':<28}{'PSNR':>8}{'SSIM':>8}{'img MSE':>11}{'UNet err':>10}{'calib s':>9}")
    for label, name, overrides in VARIANTS:
        if only and label not in only:
            continue
        start = time.perf_counter()
        result = quantize(unet, calib, preset(name, **overrides))
        calib_s = time.perf_counter() - start
        row = {"name": label, **compare(float_images, evaluate.images(result.apply(unet))), "calib_s": calib_s,
               "unet_err": result.report["fidelity"]["unet_rel_error_mean"], "weight_bytes": result.weight_bytes(),
               "avg_bits": result.report["average_weight_bits"]}
        rows.append(row)
        print(f"{label:<28}{row['psnr']:>8.2f}{row['ssim']:>8.4f}{row['image_mse']:>11.2e}{row['unet_err']:>10.4f}"
              f"{calib_s:>9.1f}", flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"trained": trained, "steps": args.steps, "images": len(held),
                                           "variants": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
