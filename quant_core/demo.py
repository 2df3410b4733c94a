"""``python -m quant_core demo``: the whole method on the bundled proxy model, float vs naive vs ours.

The proxy (bench/proxy) is a small text-to-image pixel diffusion UNet with SD structure, trained in
this repo on a synthetic captioned-shapes dataset. Calibration uses training-style captions; the
comparison uses held-out prompts and seeds, image for image against the float model.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from . import metrics
from .config import preset
from .quantize import quantize

REPO = Path(__file__).resolve().parents[1]
CFG = 3.0  # the proxy's guidance scale (bench/proxy/sample.py default)


def load_proxy_module():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import proxy  # bench/proxy, shipped with the repo
    except ImportError as exc:
        raise SystemExit(f"the bundled proxy model (bench/proxy) could not be imported: {exc}") from exc
    finally:
        sys.path.pop(0)
    return proxy


def load_default_model(proxy, seed: int):
    """The trained proxy when its weights are present, else the same architecture with seeded random weights."""
    trained = Path(proxy.WEIGHTS).is_file()
    if not trained:
        print(f"NOTE: trained proxy weights not found at {proxy.WEIGHTS}; using the same architecture with "
              "seeded random weights. The method runs end to end, but fidelity on random weights says "
              "little about a trained model (train with bench/proxy/train.py).")
    return proxy.load_proxy(trained=trained, seed=seed), trained


class ProxyRunner:
    """Calibration runner: samples ``prompts`` with whatever UNet it is given (the real sampler loop)."""

    def __init__(self, proxy, text_encoder, prompts: list, steps: int, cfg: float, seed: int) -> None:
        self.proxy, self.text_encoder, self.prompts = proxy, text_encoder, prompts
        self.steps, self.cfg, self.seed = steps, cfg, seed
        self.total_unet_calls = steps  # one batched CFG call per step for the whole prompt batch

    def __call__(self, unet):
        return self.images(unet)

    def images(self, unet, prompts=None, seed=None) -> torch.Tensor:
        return self.proxy.sample(unet, self.text_encoder, self.proxy.tokenize, prompts or self.prompts,
                                 seed=self.seed if seed is None else seed, steps=self.steps, cfg=self.cfg)


def calibration_prompts(proxy, count: int, seed: int) -> list:
    gen = torch.Generator().manual_seed(seed)
    _, captions, _ = proxy.make_batch(count, gen)
    return list(captions)


def compare(float_images: torch.Tensor, images: torch.Tensor) -> dict:
    return {"psnr": float(metrics.psnr(images, float_images).clamp(max=99).mean()),
            "ssim": float(metrics.ssim(images, float_images).mean()),
            "image_mse": float(metrics.mse(images, float_images).mean())}


def save_side_by_side(path: Path, columns: list) -> None:
    """One row per prompt: float | baseline | ours | 4x |ours - float|."""
    from PIL import Image

    rows = torch.cat([torch.cat(list(col_images), dim=2) for col_images in zip(*columns)], dim=1)
    array = (rows.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    image = Image.fromarray(array)
    image = image.resize((image.width * 4, image.height * 4), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def run_demo(args) -> int:
    from .__main__ import _progress_bar

    proxy = load_proxy_module()
    bundle, trained = load_default_model(proxy, args.seed)
    unet, text_encoder = bundle["unet"], bundle["text_encoder"]
    calib = ProxyRunner(proxy, text_encoder, calibration_prompts(proxy, args.calib_prompts, args.seed), args.steps, CFG, args.seed)
    held_out = [proxy.caption(*combo) for combo in proxy.HELD_OUT][: args.images]
    held_out += calibration_prompts(proxy, args.images, args.seed + 1)[: max(0, args.images - len(held_out))]
    evaluate = ProxyRunner(proxy, text_encoder, held_out, args.steps, CFG, args.seed + 1000)

    float_images = evaluate.images(unet)
    baseline = args.baseline or ("naive-W4A8" if "W4" in args.preset else "naive-W8A8")
    rows, columns = [], [float_images]
    for name in (baseline, args.preset):
        bar, update = _progress_bar(f"calibrating {name}")
        start = time.perf_counter()
        try:
            result = quantize(unet, calib, preset(name), progress=update)
        finally:
            bar.close()
        images = evaluate.images(result.apply(unet))
        columns.append(images)
        rows.append({"name": name, **compare(float_images, images), "calib_s": time.perf_counter() - start,
                     "weight_mib": result.weight_bytes() / 2**20,
                     "unet_err": result.report["fidelity"]["unet_rel_error_mean"]})
        print(result.summary())
    columns.append((columns[-1] - float_images).abs() * 4)
    out = Path(args.out)
    save_side_by_side(out / "side_by_side.png", columns)

    model_name = "trained proxy" if trained else "proxy architecture, seeded random weights"
    print(f"\nFidelity vs the float model ({model_name}) on {len(held_out)} held-out prompts "
          f"({args.steps} steps, same seeds):")
    print(f"{'variant':<14}{'PSNR dB':>9}{'SSIM':>8}{'img MSE':>11}{'UNet err':>10}{'calib s':>9}{'MiB':>7}")
    for r in rows:
        print(f"{r['name']:<14}{r['psnr']:>9.2f}{r['ssim']:>8.4f}{r['image_mse']:>11.2e}{r['unet_err']:>10.4f}"
              f"{r['calib_s']:>9.1f}{r['weight_mib']:>7.2f}")
    print(f"side-by-side (float | {baseline} | {args.preset} | 4x difference): {out / 'side_by_side.png'}")
    (out / "report.json").write_text(json.dumps({"model": model_name, "variants": rows}, indent=2))
    return 0
