"""Where calibration memory goes: resident memory vs live tensor bytes at each phase boundary.

    python bench/memory_census.py --arch sd15 --res 256 --prompts 1 --steps 4 --preset W4A8 --json OUT

Runs one calibration (the model and sampler of bench/calibrate.py) and, at the start and end of the weight
fit, before the consistency pass's refit and at the end, prints the process's resident memory next to the
bytes of every live tensor (found through the garbage collector, grouped by dtype), plus the peak resident
memory so far (sampled every 50 ms). A large gap between the two is memory the allocator holds but nothing
uses (what ``quant_core/calibrate/host_memory.py`` returns to the OS). Slow: a full calibration.
"""
from __future__ import annotations

import argparse
import collections
import gc
import json
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import quant_core.calibrate.pipeline as pipeline  # noqa: E402
from calibrate import EmbeddingRunner, _rss_mb, machine  # noqa: E402
from quant_core import quantize  # noqa: E402
from quant_core.config import preset  # noqa: E402
from unet import build_unet  # noqa: E402


def live_tensor_mb() -> tuple[float, dict]:
    """MiB of distinct tensor storages alive now (total, by dtype)."""
    gc.collect()
    warnings.filterwarnings("ignore", category=FutureWarning)  # isinstance() on torch.distributed's deprecated names
    seen, by_dtype = set(), collections.Counter()
    for obj in gc.get_objects():
        if not isinstance(obj, torch.Tensor) or obj.is_meta:
            continue
        try:
            storage = obj.untyped_storage()
        except RuntimeError:  # opaque tensors (e.g. oneDNN prepacked weights) have no storage to count
            continue
        if storage.data_ptr() in seen or storage.nbytes() == 0:
            continue
        seen.add(storage.data_ptr())
        by_dtype[str(obj.dtype).removeprefix("torch.")] += storage.nbytes()
    return sum(by_dtype.values()) / 2**20, {k: round(v / 2**20) for k, v in by_dtype.items()}


class Census:
    def __init__(self):
        self.peak, self.rows = _rss_mb(), []
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self):
        while True:
            self.peak = max(self.peak, _rss_mb())
            time.sleep(0.05)

    def mark(self, point: str) -> None:
        live, by_dtype = live_tensor_mb()
        row = {"point": point, "rss_mb": round(_rss_mb()), "live_tensor_mb": round(live), "by_dtype": by_dtype,
               "peak_rss_so_far_mb": round(self.peak)}
        self.rows.append(row)
        print(f"{point:>26}: RSS {row['rss_mb']} MB, live tensors {row['live_tensor_mb']} MB {by_dtype}, "
              f"peak so far {row['peak_rss_so_far_mb']} MB", flush=True)


def wrap(census: Census, name: str, before: str, after: str | None = None) -> None:
    original = getattr(pipeline, name)

    def wrapper(*args, **kwargs):
        census.mark(before)
        result = original(*args, **kwargs)
        if after:
            census.mark(after)
        return result
    setattr(pipeline, name, wrapper)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=("sd15", "sdxl", "tiny"), default="sd15")
    parser.add_argument("--res", type=int, default=256)
    parser.add_argument("--prompts", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--preset", default="W4A8")
    parser.add_argument("--checkpoint", default="", help="a diffusers folder whose unet/ to load instead")
    parser.add_argument("--json", default="")
    args = parser.parse_args()

    unet = build_unet(args.arch, args.checkpoint or None, 0)
    census = Census()
    census.mark("model built")
    wrap(census, "fit_all", "fit start", "fit end")
    wrap(census, "refit_act_scales", "consistency refit")
    runner = EmbeddingRunner(unet, args.prompts, args.steps, args.res, torch.device("cpu"))
    result = quantize(unet, runner, preset(args.preset))
    census.mark("calibration returned")
    out = {"args": vars(args), "machine": machine(), "points": census.rows, "peak_rss_mb": round(census.peak),
           "timings": result.report["timings"]}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
