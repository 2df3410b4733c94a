"""Calibration at full size: time per phase, memory, rounding coverage and UNet-output error vs float.

    python bench/calibrate.py --arch {sd15,sdxl} --res 256 --prompts 4 --steps 10 --preset W4A8 \
        [--baselines] [--checkpoint PATH] --json OUT [--device cpu|cuda]

Builds the full SD1.5 / SDXL UNet from its diffusers config with seeded random weights (or loads the UNet of
``--checkpoint``, a diffusers folder; ``--arch tiny`` is a smoke-test size). The calibration sampler is DDIM
with classifier-free guidance (batch 2 per call) over seeded random prompt embeddings, also with a checkpoint
(no text encoder is loaded: the benchmark measures the UNet's calibration, not prompt encoding).
Measured in one run: a plain sampling of the same prompts (the reference for "sampling passes"), then each
preset's calibration (phase times from its report, peak host memory of the process, GPU memory on CUDA,
Gram and reservoir bytes, rounding coverage), then the same uniform evaluation for every preset: the
calibrated model samples the prompts and each UNet call is compared with the float UNet on the same input.

JSON (top level, for other tools): ``rounding_coverage`` (0-1), ``phase_seconds`` ({capture, fit, ...}),
``plain_sampling_seconds``, ``sampling_passes``, ``peak_host_mb``, ``unet_rel_error`` (preset -> mean), all of
the main preset; ``presets`` holds every preset's full record, ``machine`` the CPU and torch.
This is a benchmark, not a test: it prints targets as PASS/FAIL lines and never fails on them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from quant_core import quantize  # noqa: E402
from quant_core.__main__ import progress_bar  # noqa: E402
from quant_core.calibrate.evaluate import evaluate_unet_error  # noqa: E402
from quant_core.config import preset  # noqa: E402
from quant_core.models.adapters import detect_adapter  # noqa: E402
from quant_core.report import format_report, rounding_coverage  # noqa: E402
from unet import build_unet  # noqa: E402

TOKENS = 77


class EmbeddingRunner:
    """DDIM + CFG sampling over seeded random prompt embeddings: the sampler a user runs, minus the text encoder."""

    def __init__(self, unet, prompts: int, steps: int, res: int, device, guidance: float = 7.5, seed: int = 0):
        from diffusers import DDIMScheduler

        self.steps, self.guidance, self.device = steps, guidance, device
        self.total_unet_calls = prompts * steps
        gen = torch.Generator().manual_seed(seed)
        ctx_dim, side = unet.config.cross_attention_dim, res // 8
        self.cond = [torch.randn(1, TOKENS, ctx_dim, generator=gen) for _ in range(prompts)]
        self.noise = [torch.randn(1, unet.config.in_channels, side, side, generator=gen) for _ in range(prompts)]
        self.pooled = [torch.randn(1, 1280, generator=gen) for _ in range(prompts)]
        self.sdxl = unet.config.addition_embed_type == "text_time"
        self.time_ids = torch.tensor([[res, res, 0, 0, res, res]] * 2, dtype=torch.float32)
        self.scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       clip_sample=False, set_alpha_to_one=False, steps_offset=1)

    @torch.no_grad()
    def __call__(self, unet):
        return [self.sample(unet, i) for i in range(len(self.cond))]

    def sample(self, unet, index: int):
        self.scheduler.set_timesteps(self.steps)
        dev = self.device
        x = self.noise[index].to(dev)
        context = torch.cat([torch.zeros_like(self.cond[index]), self.cond[index]]).to(dev)
        kwargs = {}
        if self.sdxl:
            pooled = torch.cat([torch.zeros_like(self.pooled[index]), self.pooled[index]])
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled.to(dev), "time_ids": self.time_ids.to(dev)}
        for t in self.scheduler.timesteps:
            eps = unet(torch.cat([x, x]), t.to(dev), encoder_hidden_states=context, **kwargs).sample
            uncond, cond = eps.chunk(2)
            x = self.scheduler.step(uncond + self.guidance * (cond - uncond), t, x).prev_sample
        return x


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakMemory:
    """Peak resident set of the process while the block runs (sampled every 50 ms), and peak CUDA memory."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        self.peak, self.running = _rss_mb(), True
        self.start, self.series = time.perf_counter(), []  # (seconds since start, RSS MB)
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        return self

    def _sample(self):
        while self.running:
            rss = _rss_mb()
            self.peak = max(self.peak, rss)
            self.series.append((time.perf_counter() - self.start, rss))
            time.sleep(0.05)

    def peak_between(self, begin: float, end: float) -> float:
        return max((rss for t, rss in self.series if begin <= t <= end), default=0.0)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, _rss_mb())
        self.gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if self.device.type == "cuda" else 0.0


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    return {"cpu": model, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "isa": [f for f in ("avx512_vnni", "amx_int8", "amx_bf16", "avx2") if f in flags]}


class HookProfile:
    """Wall time of the capture hooks' own work per layer kind and part (statistics/reservoir vs Gram update),
    by wrapping the Recorder's two per-call methods for the duration of the benchmark (CPU: synchronous)."""

    def __init__(self):
        self.seconds: dict = {}
        self.calls: dict = {}

    def __enter__(self):
        from quant_core.calibrate import capture

        self.originals = (capture.Recorder._record, capture.Recorder._add_gram)
        record, add_gram = self.originals
        profile = self

        def timed(part, fn):
            def wrapper(rec, *args):
                cap = args[0] if part == "stats" else args[1]
                start = time.perf_counter()
                fn(rec, *args)
                key = f"{cap.kind}/{part}"
                profile.seconds[key] = profile.seconds.get(key, 0.0) + time.perf_counter() - start
                profile.calls[key] = profile.calls.get(key, 0) + 1
            return wrapper
        capture.Recorder._record = timed("stats", record)
        capture.Recorder._add_gram = timed("gram", add_gram)
        return self

    def __exit__(self, *exc):
        from quant_core.calibrate import capture

        capture.Recorder._record, capture.Recorder._add_gram = self.originals


def calibrate_one(unet, runner, name: str, device, is_main: bool) -> tuple[dict, object]:
    bar, update = progress_bar(f"calibrate {name}")
    with PeakMemory(device) as mem, HookProfile() as hooks:
        start = time.perf_counter()
        # baselines skip their own evaluation pass: every preset gets the same evaluation below
        cfg = preset(name) if is_main else preset(name, evaluate=False)
        result = quantize(unet, runner, cfg, progress=update)
        total = time.perf_counter() - start
    bar.close()
    report = result.report
    phases = {k.removesuffix("_s"): round(v, 1) for k, v in report["timings"].items()}
    # Phases run in this order (with several Gram passes, capture and fit interleave: approximate)
    by_phase, edge = {}, 0.0
    for phase in ("capture", "fit", "consistency", "evaluate"):
        if phase in phases:
            by_phase[phase] = round(mem.peak_between(edge, edge + phases[phase]))
            edge += phases[phase]
    record = {"total_seconds": round(total, 1), "phase_seconds": phases,
              "sampling_passes": report["sampling_passes"], "peak_host_mb": round(mem.peak), "peak_host_mb_by_phase": by_phase,
              "host_mb_before": round(mem.series[0][1]) if mem.series else None,
              "peak_gpu_mb": round(mem.gpu_peak), "rounding_coverage": round(rounding_coverage(report), 4),
              "gram": report.get("gram"), "capture_bytes": report["capture_bytes"],
              "fallbacks": {n: v["fallback"] for n, v in report["layers"].items() if "fallback" in v},
              "in_calibration_error": report.get("fidelity", {}).get("unet_rel_error_mean"),
              "hook_seconds": {k: round(v, 1) for k, v in sorted(hooks.seconds.items())},
              "report": format_report(result)}
    print(f"capture hooks' own time (all passes): {record['hook_seconds']}; peak host MB by phase {by_phase} "
          f"(before: {record['host_mb_before']})", flush=True)
    print(record["report"], flush=True)
    return record, result


def write_json(path: Path, args, argv, info, plain: float, records: dict) -> None:
    """The JSON of the run so far (rewritten after each preset, atomically: a long run keeps what it measured)."""
    main_record = records[args.preset]
    out = {"arch": args.arch, "res": args.res, "prompts": args.prompts, "steps": args.steps, "preset": args.preset,
           "checkpoint": args.checkpoint or None, "device": args.device, "machine": info,
           "command": "python bench/calibrate.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "rounding_coverage": main_record["rounding_coverage"], "phase_seconds": main_record["phase_seconds"],
           "plain_sampling_seconds": round(plain, 1), "sampling_passes": main_record["sampling_passes"],
           "peak_host_mb": main_record["peak_host_mb"],
           "unet_rel_error": {n: r["unet_rel_error_mean"] for n, r in records.items()}, "presets": records}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=("sd15", "sdxl", "tiny"), default="sd15")
    parser.add_argument("--res", type=int, default=256)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--preset", default="W4A8")
    parser.add_argument("--baselines", action="store_true", help="also the naive and qdiff baselines at the same bits")
    parser.add_argument("--baseline-presets", default="",
                        help="comma-separated baselines instead of --baselines' set (e.g. qdiff-W4A8)")
    parser.add_argument("--checkpoint", default="", help="a diffusers folder whose unet/ to load instead of random weights")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    if args.res % 8:
        parser.error("--res must be a multiple of 8")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device on this machine")
    device = torch.device(args.device)
    json_path = Path(args.json or REPO / "bench" / "out" / f"calibrate-{args.arch}-{args.res}.json")
    info = machine()
    print(f"machine: {info}", flush=True)

    unet = build_unet(args.arch, args.checkpoint or None, args.seed).to(device)
    adapter = detect_adapter(unet)
    runner = EmbeddingRunner(unet, args.prompts, args.steps, args.res, device, seed=args.seed)
    print(f"{args.arch} UNet: {sum(p.numel() for p in unet.parameters()) / 1e6:.0f}M parameters, "
          f"{len(adapter.quantizable_layers(unet))} quantizable layers; {args.prompts} prompts x {args.steps} steps "
          f"at {args.res}px", flush=True)

    start = time.perf_counter()
    runner(unet)
    plain = time.perf_counter() - start
    print(f"plain sampling: {plain:.1f} s ({plain / runner.total_unet_calls:.2f} s per UNet call)", flush=True)

    bits = "W4A8" if "4" in args.preset else "W8A8"
    baselines = ([f"naive-{bits}"] + (["qdiff-W4A8"] if bits == "W4A8" else []) if args.baselines else [])
    if args.baseline_presets:
        baselines = [b.strip() for b in args.baseline_presets.split(",") if b.strip()]
    names = [args.preset] + baselines
    records = {}
    for name in names:
        record, result = calibrate_one(unet, runner, name, device, name == args.preset)
        record["calibration_over_plain"] = round(record["total_seconds"] / plain, 2)
        start = time.perf_counter()
        qmodel = result.apply(unet)
        bar, update = progress_bar(f"evaluate {name}")
        fidelity = evaluate_unet_error(unet, qmodel, runner, adapter.timesteps_from_call,
                                       lambda done, _: update(done, runner.total_unet_calls))
        bar.close()
        del qmodel, result
        record["unet_rel_error_mean"] = fidelity["unet_rel_error_mean"]
        record["unet_rel_error_per_step"] = list(fidelity["unet_rel_error_per_step"].values())
        record["evaluation_seconds"] = round(time.perf_counter() - start, 1)
        records[name] = record
        write_json(json_path, args, argv, info, plain, records)

    print("\n| preset | total s | capture s | fit s | consistency s | passes | capture/plain | peak host MB | "
          "coverage | UNet rel. error |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in records.items():
        p = r["phase_seconds"]
        print(f"| {name} | {r['total_seconds']} | {p.get('capture', 0)} | {p.get('fit', 0)} | "
              f"{p.get('consistency', '-')} | {r['sampling_passes']} | {p.get('capture', 0) / plain:.2f} | "
              f"{r['peak_host_mb']} | {r['rounding_coverage']:.2%} | {r['unet_rel_error_mean']:.4f} |")
    print(f"plain sampling {plain:.1f} s; JSON: {json_path}")
    main_record = records[args.preset]
    limit_gb = 8 if args.arch == "sd15" else 20
    checks = [("rounding coverage >= 95%", main_record["rounding_coverage"] >= 0.95),
              ("capture <= 2x plain sampling", main_record["phase_seconds"].get("capture", 0) <= 2 * plain),
              ("<= 3 sampling passes", main_record["sampling_passes"] <= 3),
              (f"peak host memory <= {limit_gb} GB", main_record["peak_host_mb"] <= limit_gb * 1024)]
    if args.arch == "sd15":
        checks.append(("fit <= 10 min", main_record["phase_seconds"].get("fit", 0) <= 600))
    if "qdiff-W4A8" in records and args.preset != "qdiff-W4A8":
        checks.append(("error below qdiff-W4A8", main_record["unet_rel_error_mean"]
                       < records["qdiff-W4A8"]["unet_rel_error_mean"]))
    for label, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}: {label}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
