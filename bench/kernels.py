#!/usr/bin/env python
"""Kernel benchmark: speed, error and weight bytes of FidelityQuant layers vs float layers.

    python bench/kernels.py [--device cpu|cuda] [--json PATH] [--quick] [--shapes NAME,...]

For every shape (SD1.5 / SDXL UNet linear and 3x3-conv layer shapes) it times the float layer
(fp32, and bf16 on CPU / fp16 on CUDA) and ``QuantLinear`` / ``QuantConv2d`` in W8A8 and W4A8
(group 64; W4A8 twice: unpacking int4 on every call, and with ``keep_unpacked=True``). Modes of one
shape are interleaved rep by rep (rotating the order), so background load hits all of them alike;
``ms`` is the median over reps. Each record also carries the relative L2 error against a float64
computation of the unquantized layer on the same input and the weight bytes (codes + scales) over
fp16 weight bytes. See bench/README.md for the JSON schema. This is a benchmark, not a test: it
prints PASS/FAIL lines for the performance targets but always exits 0 unless it crashes.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import math
import os
import platform
try:
    import resource
except ImportError:  # not on Windows
    resource = None
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from quant_core import QuantConv2d, QuantLinear  # noqa: E402
from quant_core.runtime import formats, kernels  # noqa: E402

GROUP_SIZE = 64
WEIGHT_STD = 0.03
BIAS_STD = 0.02


# ----------------------------------------------------------------------------- shapes

@dataclass(frozen=True)
class Shape:
    name: str
    kind: str          # "linear" or "conv"
    dims: tuple        # linear: (M, K, N); conv: (B, C, H, W, N, kernel)
    bias: bool
    note: str
    full_only: bool = False  # skipped by --quick

    def shape_dict(self) -> dict:
        if self.kind == "linear":
            m, k, n = self.dims
            return {"M": m, "K": k, "N": n}
        b, c, h, w, n, ks = self.dims
        return {"input": [b, c, h, w], "out_channels": n, "kernel": ks, "stride": 1, "padding": ks // 2}

    def shape_str(self) -> str:
        if self.kind == "linear":
            m, k, n = self.dims
            return f"M={m} K={k} N={n}"
        b, c, h, w, n, ks = self.dims
        return f"({b},{c},{h},{w})->{n} k{ks}"


def _lin(m, k, n, bias, note, full_only=False):
    return Shape(f"linear_m{m}_k{k}_n{n}", "linear", (m, k, n), bias, note, full_only)


def _conv(b, c, h, w, n, note, full_only=False, ks=3):
    return Shape(f"conv{ks}x{ks}_{b}x{c}x{h}x{w}_n{n}", "conv", (b, c, h, w, n, ks), True, note, full_only)


# CFG batch 2. Latent side = image side / 8; SD1.5 / SDXL stages at 320, 640, 1280 channels halve
# the latent side each time. M (tokens) = 2 * side^2.
SHAPES = [
    _lin(2048, 320, 1280, True, "32x32-latent tokens (SD1.5 256px stage 1), 320->1280"),
    _lin(512, 1280, 5120, True, "16x16 tokens at 1280 ch (SD1.5 512px stage 3), FF 1280->5120"),
    _lin(8192, 320, 320, False, "64x64 tokens at 320 ch (SD1.5 512px stage-1 attn q/k/v)"),
    _lin(154, 768, 320, False, "SD1.5 cross-attn K/V on 2x77 CLIP tokens"),
    _conv(2, 320, 32, 32, 320, "SD1.5 256px stage-1 resnet conv"),
    _conv(2, 640, 16, 16, 640, "SD1.5 256px stage-2 resnet conv"),
    _conv(2, 1280, 8, 8, 1280, "SD1.5 256px stage-3 resnet conv"),
    _lin(2048, 640, 640, True, "32x32 tokens at 640 ch (SD1.5/SDXL 512px stage-2 attn out)", True),
    _lin(512, 5120, 1280, True, "16x16 tokens, FF down-projection 5120->1280", True),
    _lin(154, 2048, 640, False, "SDXL cross-attn K/V on 2x77 tokens (stage 2)", True),
    _conv(2, 320, 64, 64, 320, "SD1.5 512px stage-1 resnet conv", True),
]
SHAPES_BY_NAME = {s.name: s for s in SHAPES}


def select_shapes(spec: str | None, quick: bool) -> list[Shape]:
    """``spec``: comma-separated shape names or unique substrings; None = default set."""
    if not spec:
        return [s for s in SHAPES if not (quick and s.full_only)]
    chosen = []
    for token in (t.strip() for t in spec.split(",")):
        if not token:
            continue
        if token in SHAPES_BY_NAME:
            matches = [SHAPES_BY_NAME[token]]
        else:
            matches = [s for s in SHAPES if token in s.name]
        if not matches:
            raise SystemExit(f"--shapes: no shape matches {token!r}; known: {', '.join(SHAPES_BY_NAME)}")
        chosen.extend(m for m in matches if m not in chosen)
    return chosen


# ----------------------------------------------------------------------------- timing

class Timer:
    """Mean milliseconds of ``n`` back-to-back calls; CUDA-synchronized on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn, n: int) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(n):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / n
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) * 1e3 / n


@dataclass
class Case:
    mode: str
    keep_unpacked: bool
    fn: object
    backend: str
    in_dtype: str
    rel_err: float
    weight_bytes: int | None
    inner: int = 1
    samples: list = None
    faults: list = None  # minor page faults per call, one entry per sample

    @property
    def label(self) -> str:
        return self.mode + ("+cached" if self.keep_unpacked else "")


def rel_err(actual: torch.Tensor, ref64: torch.Tensor) -> float:
    return float((actual.detach().to(torch.float64) - ref64).norm() / ref64.norm())


def quant_weight_bytes(layer) -> int:
    """Bytes the GEMM weight needs at rest: int8/int4 codes + group scales + channel scales."""
    names = ("weight", "weight_group_scale", "weight_scale")
    return sum(t.numel() * t.element_size() for n, t in layer.named_buffers() if n in names)


def build_cases(shape: Shape, device: torch.device, modes: list[str], half: torch.dtype,
                seed: int, log) -> tuple[list[Case], list[dict], int]:
    """Float and quantized layers for one shape; returns (cases, skipped, fp16 weight bytes)."""
    gen = torch.Generator().manual_seed(seed)
    if shape.kind == "linear":
        m, k, n = shape.dims
        ref_layer = nn.Linear(k, n, bias=shape.bias)
        x = torch.randn(m, k, generator=gen)
    else:
        b, c, h, w, n, ks = shape.dims
        ref_layer = nn.Conv2d(c, n, ks, padding=ks // 2, bias=shape.bias)
        x = torch.randn(b, c, h, w, generator=gen)
    with torch.no_grad():
        ref_layer.weight.copy_(torch.randn(ref_layer.weight.shape, generator=gen) * WEIGHT_STD)
        if shape.bias:
            ref_layer.bias.copy_(torch.randn(n, generator=gen) * BIAS_STD)
    ref_layer = ref_layer.to(device)
    x = x.to(device)
    fp16_bytes = ref_layer.weight.numel() * 2

    with torch.no_grad():
        w64 = ref_layer.weight.to(torch.float64)
        b64 = None if ref_layer.bias is None else ref_layer.bias.to(torch.float64)
        if shape.kind == "linear":
            ref64 = F.linear(x.to(torch.float64), w64, b64)
        else:
            ref64 = F.conv2d(x.to(torch.float64), w64, b64, padding=ref_layer.padding)
    # Quantized layers take the activations the model would feed them: fp32 on CPU, fp16 on CUDA.
    q_dtype = half if device.type == "cuda" else torch.float32
    xq = x.to(q_dtype)
    act_scale = float(xq.float().abs().amax()) / kernels.ACT_QMAX

    cases, skipped = [], []
    for mode in modes:
        variants = [False, True] if mode == "w4a8" else [False]
        for keep in variants:
            label = mode + ("+cached" if keep else "")
            try:
                if mode in ("fp32", "bf16", "fp16"):
                    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]
                    layer = copy.deepcopy(ref_layer).to(dtype)
                    xin = x.to(dtype)
                    backend, wbytes, in_dtype = "torch", None, mode
                else:
                    bits = 8 if mode == "w8a8" else 4
                    cls = QuantLinear if shape.kind == "linear" else QuantConv2d
                    with torch.no_grad():
                        layer = cls.from_float(ref_layer, weight_bits=bits, group_size=GROUP_SIZE,
                                               act_scales=[act_scale])
                    layer.keep_unpacked = keep
                    xin = xq
                    if shape.kind == "linear":
                        backend = layer.backend_for(device)
                    else:
                        out_h, out_w = layer.out_hw(x.shape[2], x.shape[3])
                        backend = layer.backend_for(device, out_h * out_w)
                    wbytes = quant_weight_bytes(layer)
                    in_dtype = str(q_dtype).replace("torch.", "")
                layer.eval()

                def fn(layer=layer, xin=xin):
                    return layer(xin)
                with torch.inference_mode():
                    y = fn()  # first call also builds caches (oneDNN prepack, keep_unpacked copy)
                    err = rel_err(y, ref64)
                cases.append(Case(mode, keep, fn, backend, in_dtype, err, wbytes))
            except Exception as exc:  # noqa: BLE001 - a benchmark reports and moves on
                msg = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                log(f"  SKIP {shape.name} {label}: {msg}")
                skipped.append({"name": shape.name, "mode": label, "error": msg})
    return cases, skipped, fp16_bytes


def measure(cases: list[Case], timer: Timer, reps: int, warmup: int, target_ms: float) -> None:
    """Fill ``case.samples`` with ``reps`` per-call times, modes interleaved in rotating order."""
    with torch.inference_mode():
        for case in cases:
            for _ in range(warmup):
                case.fn()
            once = timer(case.fn, 1)
            case.inner = max(1, min(1000, math.ceil(target_ms / max(once, 1e-3))))
            case.samples, case.faults = [], []
        gc.collect()
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            for rep in range(reps):
                for i in range(len(cases)):
                    case = cases[(rep + i) % len(cases)]
                    f0 = _minor_faults()
                    case.samples.append(timer(case.fn, case.inner))
                    case.faults.append((_minor_faults() - f0) / case.inner)
        finally:
            if gc_was_enabled:
                gc.enable()


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else 0


def shape_records(shape: Shape, cases: list[Case], fp16_bytes: int) -> list[dict]:
    by_label = {c.label: c for c in cases}
    fp32 = by_label.get("fp32")
    w8 = by_label.get("w8a8")
    records = []
    for case in cases:
        ms = statistics.median(case.samples)
        rec = {
            "name": shape.name, "kind": shape.kind, "shape": shape.shape_dict(),
            "mode": case.mode, "keep_unpacked": case.keep_unpacked, "backend": case.backend,
            "in_dtype": case.in_dtype, "ms": ms, "ms_min": min(case.samples),
            "ms_p25": _quantile(case.samples, 0.25), "ms_p75": _quantile(case.samples, 0.75),
            "reps": len(case.samples), "inner": case.inner,
            "minor_faults_per_call": statistics.median(case.faults),
            "ratio_vs_fp32": None, "ratio_vs_fp32_paired": None,
            "rel_err": case.rel_err,
            "bytes_ratio_vs_fp16": None if case.weight_bytes is None else case.weight_bytes / fp16_bytes,
            "weight_bytes": case.weight_bytes, "time_vs_w8a8": None, "note": shape.note,
        }
        if fp32 is not None:
            rec["ratio_vs_fp32"] = statistics.median(fp32.samples) / ms
            rec["ratio_vs_fp32_paired"] = statistics.median(
                a / b for a, b in zip(fp32.samples, case.samples))
        if case.mode == "w4a8" and w8 is not None:
            rec["time_vs_w8a8"] = ms / statistics.median(w8.samples)
        records.append(rec)
    return records


def _quantile(values, q: float) -> float:
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


# ----------------------------------------------------------------------------- W4A8 breakdown

def w4_breakdown(shape: Shape, device: torch.device, timer: Timer, reps: int, seed: int) -> dict:
    """Split a W4A8 / W8A8 linear forward into its eager steps and time each one (interleaved)."""
    m, k, n = shape.dims
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n, bias=shape.bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen) * WEIGHT_STD)
        if shape.bias:
            lin.bias.copy_(torch.randn(n, generator=gen) * BIAS_STD)
    lin = lin.to(device)
    x = torch.randn(m, k, generator=gen).to(device)
    scale = float(x.abs().amax()) / kernels.ACT_QMAX
    with torch.no_grad():
        q4 = QuantLinear.from_float(lin, 4, GROUP_SIZE, [scale])
        q8 = QuantLinear.from_float(lin, 8, GROUP_SIZE, [scale])
    backend = q8.backend_for(device)
    s = q4.current_act_scale()
    qx = kernels.quantize_static(x, s)
    w8 = q4.int8_weight_2d().contiguous()
    acc = kernels.int8_matmul(qx, w8, backend)
    col = q4.weight_scale * s
    bias = q4.bias
    signed = q4.weight.view(torch.int8)
    codes = formats.unpack_int4(q4.weight)
    steps = {
        "w4a8 forward (unpack per call)": lambda: q4(x),
        "w8a8 forward": lambda: q8(x),
        "quantize_static (x -> int8)": lambda: kernels.quantize_static(x, s),
        "int4_to_int8 (whole unpack)": lambda: formats.int4_to_int8(q4.weight, q4.weight_group_scale, k),
        "  unpack_int4 (shifts + stack)": lambda: formats.unpack_int4(q4.weight),
        "  nibble shifts only": lambda: ((signed << 4) >> 4, signed >> 4),
        "  codes * group_scale": lambda: codes.view(n, -1, GROUP_SIZE)
        * q4.weight_group_scale.view(torch.int8).unsqueeze(2),
        f"int8_matmul ({backend})": lambda: kernels.int8_matmul(qx, w8, backend),
        "rescale (int32 -> fp32 + bias)": lambda: kernels.rescale(acc, col, bias),
    }
    cases = [Case(label, False, fn, backend, "", 0.0, None) for label, fn in steps.items()]
    measure(cases, timer, reps, warmup=2, target_ms=5.0)
    return {c.mode: statistics.median(c.samples) for c in cases}


# ----------------------------------------------------------------------------- targets

def check_targets(records: list[dict]) -> list[dict]:
    def find(name, mode, keep=False):
        for r in records:
            if r["name"] == name and r["mode"] == mode and r["keep_unpacked"] == keep:
                return r
        return None

    out = []

    def add(label, ok, detail):
        out.append({"target": label, "status": "SKIP" if ok is None else ("PASS" if ok else "FAIL"),
                    "detail": detail})

    for name in ("linear_m2048_k320_n1280", "linear_m512_k1280_n5120"):
        r = find(name, "w8a8")
        add(f"W8A8 {name} ratio_vs_fp32 >= 3.0",
            None if r is None or r["ratio_vs_fp32"] is None else r["ratio_vs_fp32"] >= 3.0,
            "not run" if r is None else f"{r['ratio_vs_fp32']:.2f}x")
    for name in ("linear_m2048_k320_n1280", "linear_m512_k1280_n5120"):
        for keep in (False, True):
            r = find(name, "w4a8", keep)
            variant = "keep_unpacked" if keep else "unpack per call"
            add(f"W4A8 ({variant}) {name} time <= 1.25x W8A8",
                None if r is None or r["time_vs_w8a8"] is None else r["time_vs_w8a8"] <= 1.25,
                "not run" if r is None or r["time_vs_w8a8"] is None else f"{r['time_vs_w8a8']:.2f}x W8A8")
    r = find("conv3x3_2x320x32x32_n320", "w8a8")
    add("W8A8 conv3x3_2x320x32x32_n320 ratio_vs_fp32 >= 2.5",
        None if r is None or r["ratio_vs_fp32"] is None else r["ratio_vs_fp32"] >= 2.5,
        "not run" if r is None else f"{r['ratio_vs_fp32']:.2f}x")
    for mode, field, limit in (("w8a8", "rel_err", 0.02), ("w4a8", "rel_err", 0.12),
                               ("w8a8", "bytes_ratio_vs_fp16", 0.52), ("w4a8", "bytes_ratio_vs_fp16", 0.30)):
        rs = [r for r in records if r["mode"] == mode and not r["keep_unpacked"]]
        if not rs:
            add(f"{mode.upper()} {field} <= {limit} (all shapes)", None, "not run")
            continue
        worst = max(rs, key=lambda r: r[field])
        add(f"{mode.upper()} {field} <= {limit} (all shapes)", worst[field] <= limit,
            f"max {worst[field]:.4f} at {worst['name']}")
    return out


# ----------------------------------------------------------------------------- output

def markdown_table(records: list[dict]) -> str:
    head = ("| shape | kind | mode | backend | ms (median) | x fp32 | w4/w8 time | rel_err | bytes/fp16 "
            "| faults/call |\n|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    rows = [head]
    for r in records:
        shape = SHAPES_BY_NAME[r["name"]].shape_str() if r["name"] in SHAPES_BY_NAME else r["name"]
        mode = r["mode"] + ("+cached" if r["keep_unpacked"] else "")
        rows.append("| {} | {} | {} | {} | {:.3f} | {} | {} | {:.2e} | {} | {:.0f} |".format(
            shape, r["kind"], mode, r["backend"], r["ms"],
            "-" if r["ratio_vs_fp32"] is None else f"{r['ratio_vs_fp32']:.2f}",
            "-" if r["time_vs_w8a8"] is None else f"{r['time_vs_w8a8']:.2f}",
            r["rel_err"],
            "-" if r["bytes_ratio_vs_fp16"] is None else f"{r['bytes_ratio_vs_fp16']:.3f}",
            r["minor_faults_per_call"]))
    return "\n".join(rows)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    """The CPU flags that decide int8 / bf16 kernel choice (read once, by the engine)."""
    return sorted(f for f in kernels.cpu_flags() if "vnni" in f or "amx" in f or f in ("avx512f", "avx512_bf16"))


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def metadata(device: torch.device, args, reps: int) -> dict:
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], REPO) if sys.argv else "bench/kernels.py"]
                                        + list(args.argv)),
        "device": device.type, "torch": torch.__version__, "python": platform.python_version(),
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(), "cpu_flags": cpu_flags(),
        "cpu_fast_int8": kernels.cpu_has_fast_int8(), "onednn_conv": kernels.onednn_conv_available(),
        "cpu_linear_choice": list(kernels.cpu_linear_choice()) if kernels.cpu_has_fast_int8() else None,
        "forced_backend": os.environ.get("FIDELITYQUANT_BACKEND") or None,
        "quick": args.quick, "reps": reps, "sample_ms": args.sample_ms if args.sample_ms is not None
        else (2.0 if args.quick else 10.0), "seed": args.seed, "group_size": GROUP_SIZE,
        "weight_std": WEIGHT_STD, "git_commit": git_commit(),
        "libc": "-".join(platform.libc_ver()) or None,
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "GLIBC_TUNABLES"))
                       or k == "LD_PRELOAD"},
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        meta.update({
            "gpu": torch.cuda.get_device_name(device), "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        })
    return meta


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--json", default=None, help="output path (default bench/out/kernels-<device>.json)")
    p.add_argument("--quick", action="store_true", help="few reps, default shapes only: a smoke test")
    p.add_argument("--shapes", default=None,
                   help="comma-separated shape names or substrings (e.g. 'linear_m154,conv3x3_2x1280')")
    p.add_argument("--reps", type=int, default=None, help="timed reps per mode (default 25, quick 3)")
    p.add_argument("--sample-ms", type=float, default=None,
                   help="back-to-back calls per timed sample are chosen to last about this long "
                        "(default 10, quick 2); 0 = one call per sample (colder caches)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--breakdown", action="store_true",
                   help="also time the steps of the W4A8/W8A8 linear forward at M=512 K=1280 N=5120")
    p.add_argument("--list", action="store_true", help="list shapes and exit")
    args = p.parse_args(argv)
    args.argv = list(argv)
    return args


def main(argv=None, log=print) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.list:
        for s in SHAPES:
            log(f"{s.name:32s} {s.shape_str():28s} {'full only ' if s.full_only else ''}{s.note}")
        return {}
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    if args.threads:
        torch.set_num_threads(args.threads)
    half = torch.float16 if device.type == "cuda" else torch.bfloat16
    modes = ["fp32", "fp16" if device.type == "cuda" else "bf16", "w8a8", "w4a8"]
    reps = args.reps or (3 if args.quick else 25)
    warmup = 1 if args.quick else 3
    target_ms = args.sample_ms if args.sample_ms is not None else (2.0 if args.quick else 10.0)
    shapes = select_shapes(args.shapes, args.quick)
    timer = Timer(device)
    meta = metadata(device, args, reps)
    log(f"# {meta['cpu_model']} | {meta['threads']} threads | torch {meta['torch']} | device {device.type}"
        + (f" ({meta['gpu']})" if device.type == "cuda" else "") + f" | reps {reps}")

    records, skipped = [], []
    for idx, shape in enumerate(shapes):
        log(f"- {shape.name} [{shape.shape_str()}]")
        cases, skip, fp16_bytes = build_cases(shape, device, modes, half, args.seed + idx, log)
        skipped += skip
        if not cases:
            continue
        try:
            measure(cases, timer, reps, warmup, target_ms)
        except Exception as exc:  # noqa: BLE001
            msg = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            log(f"  SKIP {shape.name}: timing failed: {msg}")
            skipped.append({"name": shape.name, "mode": "*", "error": msg})
            continue
        recs = shape_records(shape, cases, fp16_bytes)
        for r in recs:
            log("  {:14s} {:7s} {:9.3f} ms  x{:5.2f}  err {:.2e}".format(
                r["mode"] + ("+cached" if r["keep_unpacked"] else ""), r["backend"], r["ms"],
                r["ratio_vs_fp32"] or float("nan"), r["rel_err"]))
        records += recs
        del cases
        if device.type == "cuda":
            torch.cuda.empty_cache()

    breakdown = None
    if args.breakdown:
        shape = SHAPES_BY_NAME["linear_m512_k1280_n5120"]
        breakdown = w4_breakdown(shape, device, timer, reps, args.seed)
        log("\nW4A8 / W8A8 step breakdown at " + shape.shape_str() + " (median ms):")
        for label, ms in breakdown.items():
            log(f"  {label:36s} {ms:8.3f}")

    meta["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    meta["skipped"] = skipped
    targets = check_targets(records)
    result = {"meta": meta, "records": records, "targets": targets}
    if breakdown is not None:
        result["w4a8_breakdown_ms"] = {"shape": SHAPES_BY_NAME["linear_m512_k1280_n5120"].shape_dict(),
                                       "steps": breakdown}

    log("")
    log(markdown_table(records))
    log("")
    for t in targets:
        log(f"{t['status']}: {t['target']} ({t['detail']})")
    path = Path(args.json) if args.json else REPO / "bench" / "out" / f"kernels-{device.type}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    log(f"\nwrote {path}")
    return result


if __name__ == "__main__":
    main()
