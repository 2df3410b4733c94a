"""The demo (README's main command): the whole method on the bundled proxy model, float vs naive baseline vs ours.

    .venv/bin/python bench/demo.py [--preset W4A8] [--baseline naive-W4A8] [--images 6] [--steps 10]
                                   [--calib-prompts 16] [--memory-mb N] [--out out/demo] [--seed 0]

The proxy (bench/proxy) is a small text-to-image pixel diffusion UNet with SD structure, trained in
this repo on a synthetic captioned-shapes dataset (one coloured shape on a plain background, 32x32
pixels). Calibration uses training-style captions; the comparison uses held-out prompts and seeds,
image for image against the float model. Writes side_by_side.png and report.json to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from quant_core import metrics  # noqa: E402
from quant_core.__main__ import progress_bar  # noqa: E402
from quant_core.config import PRESETS, preset  # noqa: E402
from quant_core import quantize  # noqa: E402

CFG = 3.0  # the proxy's guidance scale (bench/proxy/sample.py default)
BASELINES = {  # what each baseline preset does, for the printed labels
    "naive-W8A8": "per-tensor min-max weights, one activation scale for all steps",
    "naive-W4A8": "per-tensor min-max weights, one activation scale for all steps",
    "qdiff-W4A8": "Q-Diffusion-style: float-trajectory calibration, per-channel clip search, one activation scale",
}
INTRO = """\
FidelityQuant demo on the bundled proxy model (bench/proxy). The proxy is a small text-to-image UNet with
Stable Diffusion's structure, trained in this repository to draw one coloured shape (circle, square or
triangle) on a plain background at 32x32 pixels: its images are not Stable Diffusion pictures, but its
activations are a trained network's, which is what quantization error depends on. The float model is the
reference; the baseline and ours are calibrated on the same prompts and compared on held-out prompts."""
COLUMNS_HELP = """\
Columns, each quantized model against the float model on the same prompts and seeds:
  PSNR dB, SSIM: how close the images are (higher is better; SSIM 1 = identical). img MSE: mean squared pixel
  error (lower is better). UNet err: mean relative error of the UNet's output, per sampling step, on the
  calibration prompts (lower is better). calib s: calibration time. MiB: stored size of the quantized weights."""


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


def save_side_by_side(path: Path, columns: list, labels: list, scale: int = 4) -> None:
    """One row per prompt, one column per entry of ``columns``; ``labels`` (one or two lines each) drawn above."""
    from PIL import Image, ImageDraw, ImageFont

    rows = torch.cat([torch.cat(list(col_images), dim=2) for col_images in zip(*columns)], dim=1)
    array = (rows.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    grid = Image.fromarray(array)
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    font = ImageFont.load_default()
    header = 6 + 14 * max(label.count("\n") + 1 for label in labels)
    image = Image.new("RGB", (grid.width, grid.height + header), (32, 32, 32))
    image.paste(grid, (0, header))
    draw = ImageDraw.Draw(image)
    column_width = grid.width // len(columns)
    for i, label in enumerate(labels):
        draw.multiline_text((i * column_width + 4, 3), label, fill=(255, 255, 255), font=font, spacing=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def run_demo(args) -> int:
    print(INTRO + "\n")
    proxy = load_proxy_module()
    bundle, trained = load_default_model(proxy, args.seed)
    unet, text_encoder = bundle["unet"], bundle["text_encoder"]
    calib = ProxyRunner(proxy, text_encoder, calibration_prompts(proxy, args.calib_prompts, args.seed), args.steps, CFG, args.seed)
    held_out = [proxy.caption(*combo) for combo in proxy.HELD_OUT][: args.images]
    held_out += calibration_prompts(proxy, args.images, args.seed + 1)[: max(0, args.images - len(held_out))]
    evaluate = ProxyRunner(proxy, text_encoder, held_out, args.steps, CFG, args.seed + 1000)

    float_images = evaluate.images(unet)
    baseline = args.baseline or ("naive-W4A8" if "W4" in args.preset else "naive-W8A8")
    overrides = {} if args.memory_mb is None else {"memory_limit_mb": args.memory_mb}
    rows, columns = [], [float_images]
    for role, name in (("baseline", baseline), ("ours", args.preset)):
        what = BASELINES.get(name, "") if role == "baseline" else "FidelityQuant, the method of docs/METHOD.md"
        print(f"\n=== {role.upper()}: {name}{f' ({what})' if what else ''} ===")
        cfg = preset(name, **overrides)
        bar, update = progress_bar(f"calibrating {name}")
        start = time.perf_counter()
        try:
            result = quantize(unet, calib, cfg, progress=update)
        finally:
            bar.close()
        images = evaluate.images(result.apply(unet))
        columns.append(images)
        rows.append({"name": name, "role": role, **compare(float_images, images),
                     "calib_s": time.perf_counter() - start, "weight_mib": result.weight_bytes() / 2**20,
                     "unet_err": result.report["fidelity"]["unet_rel_error_mean"]})
        summary = result.summary()
        print(f"calibration report, {role} ({name}):\n{summary}")
        if "capture memory limit" in summary:  # the report's advice, in this command's terms
            print(f"(in this demo the capture memory limit is --memory-mb, now {cfg.memory_limit_mb} MiB; a layer also "
                  "gets at most as many rows as the calibration run produces, so a small --calib-prompts or "
                  "--steps can be the limit instead)")
    columns.append((columns[-1] - float_images).abs() * 4)
    labels = ["float\n(reference)", f"{baseline}\n(baseline)", f"{args.preset}\n(ours)", "|ours - float|\nx4"]
    out = Path(args.out)
    save_side_by_side(out / "side_by_side.png", columns, labels)

    model_name = "trained proxy" if trained else "proxy architecture, seeded random weights"
    print(f"\nFidelity vs the float model ({model_name}) on {len(held_out)} held-out prompts "
          f"({args.steps} steps, same seeds):")
    print(f"{'variant':<24}{'PSNR dB':>9}{'SSIM':>8}{'img MSE':>11}{'UNet err':>10}{'calib s':>9}{'MiB':>7}")
    for r in rows:
        print(f"{r['name'] + ' (' + r['role'] + ')':<24}{r['psnr']:>9.2f}{r['ssim']:>8.4f}{r['image_mse']:>11.2e}"
              f"{r['unet_err']:>10.4f}{r['calib_s']:>9.1f}{r['weight_mib']:>7.2f}")
    print(COLUMNS_HELP)
    column_order = [label.replace("\n", " ") for label in labels]
    print(f"\nside-by-side image, one row per held-out prompt, columns left to right: {' | '.join(column_order)}\n"
          f"  {out / 'side_by_side.png'}")
    (out / "report.json").write_text(json.dumps({"model": model_name, "columns": column_order, "variants": rows},
                                                indent=2))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench/demo.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="W4A8", choices=sorted(PRESETS))
    parser.add_argument("--baseline", default=None, help="baseline preset (default: naive-<same bits>)")
    parser.add_argument("--images", type=int, default=6, help="held-out prompts to compare")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--calib-prompts", type=int, default=16, help="calibration prompts (training-style captions)")
    parser.add_argument("--memory-mb", type=int, default=None,
                        help="capture memory limit in MiB (default: the preset's)")
    parser.add_argument("--out", default="out/demo", help="folder for the side-by-side image and report")
    parser.add_argument("--seed", type=int, default=0)
    return run_demo(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
