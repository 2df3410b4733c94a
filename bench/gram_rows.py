"""Few rows: does damped error-compensated rounding beat round-to-nearest when a Gram block has seen fewer
rows than it has inputs? (issue 11: "dampening vs fallback", decided by measurement)

    python bench/gram_rows.py [--ratios 0.125,0.25,0.5,1,2] [--bits 4] [--json OUT]

On the trained proxy (bench/proxy), the calibration prompts are sampled once with large row reservoirs.
For every layer with at least 128 inputs, the captured rows are split at random into a fitting part of
``ratio x K`` rows and a held-out part (the rest, at least K rows). Each layer's weight is rounded on the
same W4 grid (clip 1.0) by: round-to-nearest, and error-compensated rounding driven by the Gram matrix of the
fitting rows (damped as the pipeline does). Both are scored on the held-out rows' Gram matrix: relative
output error ``||X (W - Q)^T|| / ||X W^T||``. Prints, per ratio, in how many layers the damped rounding wins
and the median error ratio (damped / nearest). A benchmark: no PASS/FAIL.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from quant_core.calibrate import capture, rounding  # noqa: E402
from quant_core.models.adapters import detect_adapter  # noqa: E402
from quant_core.runtime import formats  # noqa: E402


def held_out_error(w: torch.Tensor, q: torch.Tensor, rows: torch.Tensor) -> float:
    return float((rows @ (w - q).t()).norm() / (rows @ w.t()).norm().clamp_min(1e-12))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", default="0.125,0.25,0.5,1,2")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--calib-prompts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", default=str(REPO / "bench" / "out" / "gram_rows.json"))
    args = parser.parse_args(argv)
    from bench.demo import ProxyRunner, calibration_prompts, load_default_model, load_proxy_module

    proxy = load_proxy_module()
    bundle, trained = load_default_model(proxy, 0)
    unet = bundle["unet"]
    runner = ProxyRunner(proxy, bundle["text_encoder"], calibration_prompts(proxy, args.calib_prompts, 0),
                         args.steps, 3.0, 0)
    layers = detect_adapter(unet).quantizable_layers(unet)
    result = capture.capture(unet, layers, runner, detect_adapter(unet).timesteps_from_call, args.steps, 2**31)
    gen = torch.Generator().manual_seed(0)
    ratios = [float(r) for r in args.ratios.split(",")]
    table = {r: [] for r in ratios}
    for name, module in layers.items():
        rows = result.layers[name].rows()
        w = module.weight.detach().float().reshape(module.weight.shape[0], -1)
        k = w.shape[1]
        if k < 128:
            continue
        rows = rows[torch.randperm(rows.shape[0], generator=gen)]
        grid = formats.quantize_weight(w, args.bits, 64)
        step = grid.grid_step()
        nearest = torch.clamp(torch.round(w / step), grid.qmin, grid.qmax) * step
        for ratio in ratios:
            n_fit = int(ratio * k)
            if rows.shape[0] - n_fit < k:
                continue  # not enough rows left to score on
            fit, test = rows[:n_fit], rows[n_fit:]
            codes = rounding.round_with_error_feedback(w, step, grid.qmin, grid.qmax, rounding.input_gram(fit))
            table[ratio].append((name, held_out_error(w, codes * step, test), held_out_error(w, nearest, test)))
    out = {"trained": trained, "bits": args.bits, "command": "python bench/gram_rows.py " + " ".join(argv or sys.argv[1:]),
           "per_ratio": {}}
    print(f"{'rows / K':>9} {'layers':>7} {'damped wins':>12} {'median err ratio (damped / nearest)':>36}")
    for ratio, items in table.items():
        if not items:
            continue
        wins = sum(d < n for _, d, n in items)
        median = statistics.median(d / n for _, d, n in items)
        out["per_ratio"][str(ratio)] = {"layers": len(items), "damped_wins": wins, "median_ratio": median,
                                        "worst_ratio": max(d / n for _, d, n in items)}
        print(f"{ratio:>9} {len(items):>7} {wins:>12} {median:>36.3f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
