"""CPU A/B of issue 12 items 2 and 3, side by side in one process (alternating, CPU time per call).

    python bench/cpu_ab.py [--reps 7] [--json PATH]

linear: one quantized linear layer's full forward (quantize + GEMM + epilogue) on each CPU backend the
machine runs (``onednn`` prepacked, ``int_mm``, ``float`` emulation), W8 and W4, next to nn.Linear in fp32
and bf16, at the issue's three shapes. denormals: the quantized layer's forward on inputs where a share of
the elements are denormal floats, with and without flushing (runtime/denormals.py), next to fp32.
CPU time (time.process_time) of single-thread calls is less disturbed by other processes than wall time
on a shared machine; every figure is the median over --reps alternating rounds.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from quant_core import QuantLinear  # noqa: E402
from quant_core.runtime import kernels, onednn_ops  # noqa: E402
from quant_core.runtime.denormals import FlushDenormals  # noqa: E402

SHAPES = [(2048, 320, 1280), (512, 1280, 5120), (8192, 320, 320)]


def cpu_ms(fn, calls: int) -> float:
    start = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - start) / calls * 1e3


def rounds(fns: dict, reps: int, calls: int) -> dict:
    for fn in fns.values():  # warm-up: prepack, allocator
        fn()
    samples = {name: [] for name in fns}
    for r in range(reps):
        for name in (list(fns) if r % 2 == 0 else list(reversed(fns))):
            samples[name].append(cpu_ms(fns[name], calls))
    return {name: statistics.median(v) for name, v in samples.items()}


def linear_rows(reps: int) -> list:
    backends = [b for b, ok in (("onednn", onednn_ops.available()), ("int_mm", kernels.cpu_int_mm_available()),
                                ("float", True)) if ok]
    rows = []
    for m, k, n in SHAPES:
        gen = torch.Generator().manual_seed(m + k + n)
        lin = torch.nn.Linear(k, n)
        x = torch.randn(m, k, generator=gen)
        lin_bf16, x_bf16 = torch.nn.Linear(k, n).to(torch.bfloat16), x.to(torch.bfloat16)
        scale = float(x.abs().max()) / 127
        fns = {"fp32": lambda: lin(x), "bf16": lambda: lin_bf16(x_bf16)}
        for bits in (8, 4):
            for backend in backends:
                layer = QuantLinear.from_float(lin, weight_bits=bits, act_scales=[scale])
                layer.use_backend(backend)
                fns[f"w{bits}-{backend}"] = (lambda layer=layer: layer(x))
        calls = max(1, int(3e8 / (m * k * n)))
        with torch.no_grad():
            times = rounds(fns, reps, calls)
        rows.append({"shape": f"M={m} K={k} N={n}", "ms": times})
    return rows


def denormal_rows(reps: int) -> list:
    m, k, n = 2048, 320, 1280
    gen = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(k, n)
    rows = []
    for share in (0.0, 0.25, 0.5):
        x = torch.randn(m, k, generator=gen)
        mask = torch.rand(m, k, generator=gen) < share
        tiny = torch.full((m, k), 0x000A0000, dtype=torch.int32).view(torch.float32)  # a denormal, made from bits
        x = torch.where(mask, tiny, x)
        layer = QuantLinear.from_float(lin, act_scales=[float(x.abs().max()) / 127])
        flush = FlushDenormals()

        def flushed(layer=layer, x=x):
            with flush:
                return layer(x)
        fns = {"fp32": lambda x=x: lin(x), "w8": lambda layer=layer, x=x: layer(x), "w8-flushed": flushed}
        with torch.no_grad():
            rows.append({"denormal_share": share, "backend": layer.backend, "ms": rounds(fns, reps, 5)})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--json", default=str(REPO / "bench" / "out" / "cpu_ab.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    meta = {"cpu": next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                        platform.processor()),
            "flags": sorted(kernels.cpu_flags() & (kernels.INT8_DOT_FLAGS | {"amx_bf16", "avx512_bf16", "avx512f"})),
            "cpu_linear_choice": list(kernels.cpu_linear_choice()), "torch": torch.__version__, "threads": 1,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "reps": args.reps,
            "command": "python bench/cpu_ab.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(f"{meta['cpu']}; {' '.join(meta['flags'])}; torch {meta['torch']}; 1 thread; CPU ms per call, "
          f"median of {args.reps} alternating rounds")
    linear = linear_rows(args.reps)
    for row in linear:
        print(row["shape"] + ": " + ", ".join(f"{k} {v:.2f}" for k, v in row["ms"].items()))
    denorm = denormal_rows(args.reps)
    for row in denorm:
        print(f"denormal share {row['denormal_share']:.2f} ({row['backend']}): "
              + ", ".join(f"{k} {v:.2f}" for k, v in row["ms"].items()))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "linear": linear, "denormals": denorm}, indent=2))
    print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
