"""Whole-UNet speed and memory: fp32, bf16 (fp16 on CUDA), W8A8 and W4A8 side by side in one run.

    python bench/unet.py [--arch sd15|sdxl] [--res 256|512|1024] [--device cpu|cuda] [--json PATH]
                         [--checkpoint DIFFUSERS_FOLDER] [--rounds 5] [--compile [--compile-backend inductor]]

Builds the full-size UNet from its diffusers config with seeded random weights (or loads the UNet of
a user's diffusers folder with --checkpoint), quantizes it (calibration on a few random-input steps:
enough for speed, says nothing about fidelity; see bench/fidelity.py), then times one UNet step with
a CFG batch of 2 for every mode, round-robin over --rounds rounds (median), so background load hits
every mode alike. Ratios are computed pair by pair within the run.

Quantized modes run twice on CPU: with fp32 activations between the quantized layers (`w8a8`) and
with bf16 activations (`w8a8-bf16act`: the float parts -- norms, attention, SiLU -- in bf16, the
quantized layers take bf16 in and give bf16 out). On CUDA they run with fp16 activations.

Memory: `weight_mb` = bytes of every UNet tensor as held at run time (for quantized modes: codes +
scales + the remaining float tensors; the CPU oneDNN conv path also keeps a prepacked int8 copy,
counted separately as `prepacked_mb`). `step_peak_mb`: CUDA: torch.cuda.max_memory_allocated during
the step minus before; CPU: peak RSS growth during the step, sampled every millisecond (approximate).
Compiled rows (`--compile`): `fp32-compiled`, `bf16-compiled` (`fp16-compiled` on CUDA), `w8a8-compiled`
and `w4a8-compiled` are ``torch.compile`` (Inductor by default; it needs a C++ compiler on CPU) of the same
module objects as the eager `fp32`, `bf16`, `w8a8`, `w4a8` rows (no second copy of the weights), timed in the
same round-robin. The first call compiles: `first_call_s` is its wall time and `compile_s` = first call - the
second (warm) call, so compile time stays out of `s_per_step`. `speedup_vs_eager` pairs each compiled mode
with its eager mode round by round, and compiled rows also get `speedup_vs_bf16-compiled` (CUDA: fp16).
`graphs`, `graph_breaks` (+ `graph_break_reasons`), `recompiles` are torch._dynamo's counters while that mode
ran (graphs > 1 or any break means the model was split; recompiles should stay 0); the counters are
process-wide, so a break in code shared with a mode compiled earlier (the runtime's per-call hooks) shows
under that earlier mode only. Inductor's compile of even the tiny arch took 20-190 s per mode on the shared
2-core machine (its kernel cache in /tmp/torchinductor_$USER makes reruns faster). Full-size runs (quiet
machine; expect minutes of compiling per mode):

    .venv/bin/python bench/unet.py --arch sd15 --res 256 --compile --rounds 5 --json bench/out/unet-sd15-256-compile.json
    .venv/bin/python bench/unet.py --arch sd15 --res 512 --compile --rounds 3 --json bench/out/unet-sd15-512-compile.json

`faults_per_step`: minor page faults per step (glibc handing large buffers back to the OS makes some
steps re-fault every call; this script re-executes itself with MALLOC_MMAP_THRESHOLD_ /
MALLOC_TRIM_THRESHOLD_ set unless --no-malloc-tuning).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from quant_core.config import preset  # noqa: E402
from quant_core import quantize  # noqa: E402

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "4000000000"}

# diffusers configs of the public checkpoints (runwayml SD1.5 / stabilityai SDXL base), written out here
ARCHS = {
    "sd15": dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
    "sdxl": dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
                 transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
    # smoke-test size (tests/test_bench_models.py), not a real architecture
    "tiny": dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                 cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
}
TOKENS = 77


def build_unet(arch: str, checkpoint: str | None, seed: int):
    from diffusers import UNet2DConditionModel

    if checkpoint:
        return UNet2DConditionModel.from_pretrained(checkpoint, subfolder="unet", torch_dtype=torch.float32).eval()
    torch.manual_seed(seed)
    return UNet2DConditionModel(**ARCHS[arch]).eval()


def unet_inputs(unet, res: int, device, dtype, seed: int, t: float = 500.0):
    """One CFG step's inputs: batch 2 (uncond + cond), latent res/8, 77 context tokens."""
    gen = torch.Generator().manual_seed(seed)
    side = res // 8
    x = torch.randn(2, unet.config.in_channels, side, side, generator=gen)
    ctx = torch.randn(2, TOKENS, unet.config.cross_attention_dim, generator=gen)
    kwargs = {"encoder_hidden_states": ctx.to(device, dtype)}
    if unet.config.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, 1280, generator=gen).to(device, dtype),
            "time_ids": torch.tensor([[res, res, 0, 0, res, res]] * 2, dtype=torch.float32).to(device, dtype)}
    return x.to(device, dtype), torch.tensor(t, device=device), kwargs


class RandomStepRunner:
    """Calibration runner for speed only: a few UNet calls on random inputs at spread-out timesteps."""

    def __init__(self, res: int, device, steps: int = 3, seed: int = 0):
        self.res, self.device, self.seed = res, device, seed
        self.steps = steps
        self.total_unet_calls = steps

    @torch.no_grad()
    def __call__(self, unet):
        for i in range(self.steps):
            x, _, kwargs = unet_inputs(unet, self.res, self.device, torch.float32, self.seed + i)
            t = torch.tensor(999.0 * (self.steps - i) / self.steps, device=self.device)
            unet(x, t, **kwargs)


def tensor_bytes(module) -> tuple[int, int]:
    """(bytes of parameters + buffers, bytes of prepacked oneDNN weights cached by quantized convs)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    prepacked = 0
    for m in module.modules():
        derived = getattr(m, "_derived", {}).get("onednn")  # (key..., value): the value is the last item
        if derived is not None:
            packed = derived[-1]
            try:
                prepacked += packed.numel() * packed.element_size()
            except RuntimeError:  # an opaque oneDNN tensor: it holds the int8 weight, one byte per element
                prepacked += m.weight_shape[0] * m.reduce_dim
    return total, prepacked


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident-set growth while the block runs (sampled every millisecond)."""

    def __enter__(self):
        self.base = self.peak = _rss_bytes()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, _rss_bytes())
        self.growth = self.peak - self.base


def time_step(model, inputs, device) -> dict:
    x, t, kwargs = inputs
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with torch.no_grad():
            model(x, t, **kwargs)
        end.record()
        torch.cuda.synchronize()
        return {"s": start.elapsed_time(end) / 1e3, "peak": torch.cuda.max_memory_allocated() - base, "faults": 0}
    with torch.no_grad(), PeakRSS() as rss:
        start = time.perf_counter()
        model(x, t, **kwargs)
        elapsed = time.perf_counter() - start
    return {"s": elapsed, "peak": rss.growth, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults}


def paired(ref: list, mode: list) -> float:
    """Median over rounds of ref's step time / mode's step time (both timed in the same round)."""
    return statistics.median(a["s"] / b["s"] for a, b in zip(ref, mode))


class DynamoCounts:
    """Accumulates torch._dynamo's graph / graph-break / recompile counters over the blocks it wraps, and the
    graph-break reasons (first line of each, with counts). The counters are process-wide and Dynamo traces a
    piece of code once per guard set: a break in code shared with a mode compiled earlier (e.g. the runtime's
    per-call hooks) is counted under that earlier mode only."""

    def __init__(self):
        self.totals = {"graphs": 0, "graph_breaks": 0, "recompiles": 0, "graph_break_reasons": {}}

    @staticmethod
    def _read() -> dict:
        from torch._dynamo.utils import counters

        return {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": dict(counters["graph_break"]),
                "recompiles": sum(counters["recompiles"].values())}

    def __enter__(self):
        self.before = self._read()
        return self

    def __exit__(self, *exc):
        after = self._read()
        self.totals["graphs"] += after["graphs"] - self.before["graphs"]
        self.totals["recompiles"] += after["recompiles"] - self.before["recompiles"]
        reasons = self.totals["graph_break_reasons"]
        for reason, count in after["graph_breaks"].items():
            new = count - self.before["graph_breaks"].get(reason, 0)
            if new:
                key = reason.strip().splitlines()[0][:200]
                reasons[key] = reasons.get(key, 0) + new
                self.totals["graph_breaks"] += new


def compile_targets(by: dict, half_name: str) -> list:
    """Issue 12 item 6 (CPU, SD1.5 256 px): compiled W8A8 >= 1.15x eager W8A8 and >= 1.5x compiled bf16;
    compiled W4A8 step time within 10% of compiled W8A8."""
    out = []
    w8, w4, half = by.get("w8a8-compiled"), by.get("w4a8-compiled"), f"{half_name}-compiled"
    if w8 and "speedup_vs_eager" in w8:
        v = w8["speedup_vs_eager"]
        out.append(("PASS" if v >= 1.15 else "FAIL", f"w8a8-compiled {v:.2f}x eager w8a8 (target >= 1.15)"))
    if w8 and f"speedup_vs_{half}" in w8:
        v = w8[f"speedup_vs_{half}"]
        out.append(("PASS" if v >= 1.5 else "FAIL", f"w8a8-compiled {v:.2f}x {half} (target >= 1.5)"))
    if w8 and w4:
        v = w4["s_per_step"] / w8["s_per_step"]
        out.append(("PASS" if v <= 1.10 else "FAIL", f"w4a8-compiled step time {v:.2f}x w8a8-compiled (target <= 1.10)"))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(ARCHS), default="sd15")
    parser.add_argument("--res", type=int, default=256, choices=(64, 256, 512, 768, 1024))
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--checkpoint", default="", help="a diffusers folder whose unet/ to load instead of random weights")
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per mode (round-robin)")
    parser.add_argument("--modes", default="", help="comma-separated subset of modes")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="")
    parser.add_argument("--no-malloc-tuning", action="store_true")
    parser.add_argument("--compile", action="store_true", help="add torch.compile rows (MODE-compiled) for fp32, "
                                                               "bf16/fp16, w8a8, w4a8")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager: a cheap "
                                                                        "trace-only check)")
    args = parser.parse_args(argv)
    if args.device == "cpu" and not args.no_malloc_tuning and any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable, __file__] + (argv if argv is not None else sys.argv[1:]),
                  {**os.environ, **MALLOC_ENV})
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device on this machine")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    half = torch.float16 if device.type == "cuda" else torch.bfloat16
    half_name = "fp16" if device.type == "cuda" else "bf16"
    from bench.kernels import cpu_flags, cpu_model

    json_path = args.json or str(REPO / "bench" / "out" / f"unet-{args.arch}-{args.res}-{args.device}.json")

    print(f"building {args.arch} UNet ({'checkpoint ' + args.checkpoint if args.checkpoint else 'seeded random weights'})",
          flush=True)
    unet = build_unet(args.arch, args.checkpoint or None, args.seed).to(device)
    params = sum(p.numel() for p in unet.parameters())
    models, quant_info = {"fp32": unet}, {}
    import copy
    models[half_name] = copy.deepcopy(unet).to(half)
    act_dtype = {"fp32": torch.float32, half_name: half}
    runner = RandomStepRunner(args.res, device)
    for name, bits in (("w8a8", "W8A8"), ("w4a8", "W4A8")):
        start = time.perf_counter()
        # speed only: no clip searches, round-to-nearest, no consistency/evaluation passes
        cfg = preset(bits, consistency_pass=False, evaluate=False, weight_rounding="nearest",
                     weight_clip_search=False, act_clip_search=False, timestep_groups=1)
        result = quantize(unet, runner, cfg)
        quant_info[name] = {"calib_s": time.perf_counter() - start, "layers": len(result.layers)}
        if device.type == "cuda":  # fp16 activations between the quantized layers, as a GPU user runs it
            models[name], act_dtype[name] = result.apply(models[half_name]), half
        else:
            models[name], act_dtype[name] = result.apply(unet), torch.float32
            models[f"{name}-bf16act"], act_dtype[f"{name}-bf16act"] = result.apply(models[half_name]), half
        print(f"quantized {name}: {len(result.layers)} layers in {quant_info[name]['calib_s']:.1f} s", flush=True)
    if args.compile:
        for name in ("fp32", half_name, "w8a8", "w4a8"):  # the same modules: compile shares their weights
            models[f"{name}-compiled"] = torch.compile(models[name], backend=args.compile_backend)
            act_dtype[f"{name}-compiled"] = act_dtype[name]
    if args.modes:
        wanted = [m.strip() for m in args.modes.split(",")]
        unknown = set(wanted) - set(models)
        if unknown:
            parser.error(f"unknown modes {sorted(unknown)}; have {sorted(models)}")
        models = {m: models[m] for m in wanted}

    inputs = {name: unet_inputs(unet, args.res, device, act_dtype[name], args.seed + 100) for name in models}
    dynamo = {name: DynamoCounts() for name in models if name.endswith("-compiled")}
    compile_info = {}
    for name, model in models.items():  # warm-up: backend choice, oneDNN prepack, allocator; compiled: compile
        with dynamo.get(name, contextlib.nullcontext()):
            first, second = time_step(model, inputs[name], device), time_step(model, inputs[name], device)
        if name in dynamo:
            compile_info[name] = {"first_call_s": first["s"], "compile_s": first["s"] - second["s"]}
            print(f"compiled {name} ({args.compile_backend}): first call {first['s']:.1f} s, "
                  f"compile ~{compile_info[name]['compile_s']:.1f} s", flush=True)
    samples = {name: [] for name in models}
    for r in range(args.rounds):
        order = list(models) if r % 2 == 0 else list(reversed(models))
        for name in order:
            with dynamo.get(name, contextlib.nullcontext()):
                samples[name].append(time_step(models[name], inputs[name], device))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {samples[n][-1]['s']:.2f}s" for n in models), flush=True)

    fp16_bytes = params * 2
    records = []
    for name, model in models.items():
        weight, prepacked = tensor_bytes(model)
        times = [s["s"] for s in samples[name]]
        records.append({"mode": name, "s_per_step": statistics.median(times), "s_min": min(times),
                        "weight_mb": weight / 1e6, "weight_vs_fp16": weight / fp16_bytes, "prepacked_mb": prepacked / 1e6,
                        "step_peak_mb": max(s["peak"] for s in samples[name]) / 1e6,
                        "faults_per_step": statistics.median(s["faults"] for s in samples[name]),
                        **quant_info.get(name.replace("-bf16act", "").replace("-compiled", ""), {})})
        if name in dynamo:
            records[-1].update(compiled=True, compile_backend=args.compile_backend, **compile_info[name],
                               **dynamo[name].totals)
    by = {r["mode"]: r for r in records}
    for r in records:
        # paired ratios: per round, this mode's step against fp32's / the half-precision model's, then the median
        refs = ["fp32", half_name] + ([f"{half_name}-compiled"] if r["mode"].endswith("-compiled") else [])
        for ref in refs:
            if ref in samples and r["mode"] in samples:
                r[f"speedup_vs_{ref}"] = paired(samples[ref], samples[r["mode"]])
        eager = r["mode"].replace("-compiled", "")
        if eager != r["mode"] and eager in samples:
            r["speedup_vs_eager"] = paired(samples[eager], samples[r["mode"]])
    targets = []
    if args.device == "cpu" and args.arch == "sd15" and args.res == 256:
        for mode in ("w8a8", "w8a8-bf16act"):
            if mode in by and "fp32" in by and "bf16" in by:
                targets.append(("PASS" if by[mode]["speedup_vs_fp32"] >= 2.5 else "FAIL",
                                f"{mode} step {by[mode]['speedup_vs_fp32']:.2f}x faster than fp32 (target >= 2.5)"))
                targets.append(("PASS" if by[mode]["speedup_vs_bf16"] >= 1.2 else "FAIL",
                                f"{mode} step {by[mode]['speedup_vs_bf16']:.2f}x faster than bf16 (target >= 1.2)"))
        for w4, w8 in (("w4a8", "w8a8"), ("w4a8-bf16act", "w8a8-bf16act")):
            if w4 in by and w8 in by:
                ratio = by[w4]["s_per_step"] / by[w8]["s_per_step"]
                targets.append(("PASS" if ratio <= 1.15 else "FAIL", f"{w4} step time {ratio:.2f}x {w8} (target <= 1.15)"))
        targets += compile_targets(by, half_name)
    for mode, limit in (("w8a8", 0.52), ("w4a8", 0.30)):
        # against fp16 bytes, count the UNet as deployed at 16-bit: on CPU that is the -bf16act model
        # (its float remainder -- norms, conv_in/out, time MLP -- is bf16; the fp32-activation model keeps it fp32)
        mode = f"{mode}-bf16act" if f"{mode}-bf16act" in by else mode
        if mode in by:
            v = by[mode]["weight_vs_fp16"]
            targets.append(("PASS" if v <= limit else "FAIL", f"{mode} UNet weight bytes {v:.3f}x fp16 (target <= {limit})"))

    print(f"\n{args.arch} {args.res}px, CFG batch 2, {args.device}, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} rounds")
    print(f"{'mode':<15}{'s/step':>8}{'x fp32':>8}{'x ' + half_name:>8}{'weight MB':>11}{'x fp16 B':>9}"
          f"{'prepack MB':>11}{'step peak MB':>13}{'faults':>8}")
    for r in records:
        print(f"{r['mode']:<15}{r['s_per_step']:>8.3f}{r.get('speedup_vs_fp32', float('nan')):>8.2f}"
              f"{r.get('speedup_vs_' + half_name, float('nan')):>8.2f}{r['weight_mb']:>11.1f}{r['weight_vs_fp16']:>9.3f}"
              f"{r['prepacked_mb']:>11.1f}{r['step_peak_mb']:>13.1f}{r['faults_per_step']:>8.0f}")
    for r in records:
        if r.get("compiled"):
            print(f"{r['mode']}: compile {r['compile_s']:.1f} s (first call {r['first_call_s']:.1f} s), "
                  f"{r.get('speedup_vs_eager', float('nan')):.2f}x eager, graphs {r['graphs']}, "
                  f"breaks {r['graph_breaks']}, recompiles {r['recompiles']}")
    for status, text in targets:
        print(f"{status}: {text}")
    meta = {"arch": args.arch, "res": args.res, "device": args.device, "checkpoint": args.checkpoint or None,
            "params": params, "rounds": args.rounds, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.processor() or platform.machine(),
            "cpu_model": cpu_model(), "cpu_flags": cpu_flags(), "compile": args.compile,
            "compile_backend": args.compile_backend if args.compile else None,
            "malloc_env": {k: os.environ.get(k) for k in MALLOC_ENV},
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": "python bench/unet.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name()
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).write_text(json.dumps({"meta": meta, "records": records,
                                           "targets": [{"status": s, "text": t} for s, t in targets]}, indent=2))
    print(f"JSON: {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
