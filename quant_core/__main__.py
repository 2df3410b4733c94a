"""Command line: ``python -m quant_core quantize``.

quantize  calibrates a user's diffusers model folder on a prompt file and writes one safetensors file.

The demo on the bundled proxy model is not part of the engine: ``python bench/demo.py``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .config import PRESETS, preset



def progress_bar(desc: str):
    from tqdm import tqdm

    bar = tqdm(desc=desc, unit="step", dynamic_ncols=True)

    def update(done: int, total: int) -> None:
        if total and bar.total != total:
            bar.total = total
        bar.n = done
        bar.refresh()
    return bar, update


def _read_prompts(path: str) -> list:
    file = Path(path)
    if not file.is_file():
        raise SystemExit(f"prompt file not found: {path}")
    prompts = [line.strip() for line in file.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if not prompts:
        raise SystemExit(f"{path} has no prompts (one per line)")
    return prompts


def cmd_quantize(args) -> int:
    from .artifact import save_result
    from .calibrate.pipeline import quantize
    from .models.runners import DiffusersRunner, load_diffusers_pipeline

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise SystemExit(f"{out} exists; pass --overwrite or choose another --out")
    pipe = load_diffusers_pipeline(args.model, device=args.device)
    runner = DiffusersRunner(pipe, _read_prompts(args.prompts), negative_prompt=args.negative, steps=args.steps,
                             guidance_scale=args.cfg, height=args.height, width=args.width, seed=args.seed)
    cfg = preset(args.preset, timestep_groups=args.groups, consistency_pass=not args.no_consistency,
                 memory_limit_mb=args.memory_mb)
    bar, update = progress_bar(f"calibrating ({args.preset})")
    start = time.perf_counter()
    try:
        result = quantize(pipe.unet, runner, cfg, progress=update)
    finally:
        bar.close()
    save_result(result, out, overwrite=args.overwrite)
    print(result.summary())
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - start:.0f}s")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quant_core", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="calibrate a diffusers model folder and save the result")
    q.add_argument("--model", required=True, help="diffusers pipeline folder (model_index.json)")
    q.add_argument("--prompts", required=True, help="text file, one calibration prompt per line")
    q.add_argument("--preset", default="W8A8", choices=sorted(PRESETS))
    q.add_argument("--out", required=True, help="output .safetensors file")
    q.add_argument("--overwrite", action="store_true")
    q.add_argument("--negative", default="")
    q.add_argument("--steps", type=int, default=20)
    q.add_argument("--cfg", type=float, default=7.5)
    q.add_argument("--height", type=int, default=None)
    q.add_argument("--width", type=int, default=None)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--groups", type=int, default=4, help="timestep groups (1 = one activation scale)")
    q.add_argument("--no-consistency", action="store_true", help="skip the consistency pass")
    q.add_argument("--memory-mb", type=int, default=256, help="capture memory limit")
    q.add_argument("--device", default="cpu")
    q.set_defaults(func=cmd_quantize)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
