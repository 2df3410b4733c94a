"""Two checkouts' quantized layers in ONE process: same float layers and inputs, outputs compared with
torch.equal, calls interleaved and timed (paired ratios, so background load hits both alike).

    .venv/bin/python bench/ab_engines.py --before /path/to/old/checkout --after . --json bench/out/ab.json

Each checkout's ``quant_core`` is loaded under its own package name (it imports itself relatively).
"""
import argparse
import importlib.util
import json
import statistics
import sys
import time

import torch

def load(name, root):
    spec = importlib.util.spec_from_file_location(name, f"{root}/quant_core/__init__.py",
                                                  submodule_search_locations=[f"{root}/quant_core"])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--before", required=True)
ap.add_argument("--after", required=True)
ap.add_argument("--json", default="bench/out/ab_engines.json")
ap.add_argument("--threads", type=int, default=2)
args = ap.parse_args()
torch.set_num_threads(args.threads)
old, new = load("qc_before", args.before), load("qc_after", args.after)
cases = [("linear M=2048 K=320 N=1280", lambda: torch.nn.Linear(320, 1280), (2048, 320)),
         ("linear M=512 K=1280 N=5120", lambda: torch.nn.Linear(1280, 5120), (512, 1280)),
         ("linear M=8192 K=320 N=320", lambda: torch.nn.Linear(320, 320), (8192, 320)),
         ("conv3x3 2x320x32x32", lambda: torch.nn.Conv2d(320, 320, 3, padding=1), (2, 320, 32, 32)),
         ("conv3x3 2x640x16x16", lambda: torch.nn.Conv2d(640, 640, 3, padding=1), (2, 640, 16, 16))]
rows = []
for label, make, shape in cases:
    torch.manual_seed(0)
    flt = make()
    x = torch.randn(shape)
    scale = [float(x.abs().amax()) / 127]
    for bits in (8, 4):
        cls = "QuantConv2d" if isinstance(flt, torch.nn.Conv2d) else "QuantLinear"
        a = getattr(old, cls).from_float(flt, weight_bits=bits, group_size=64, act_scales=scale)
        b = getattr(new, cls).from_float(flt, weight_bits=bits, group_size=64, act_scales=scale)
        with torch.no_grad():
            assert torch.equal(a(x), b(x)), label  # same codes, same kernels: identical outputs
            for _ in range(3):
                a(x)
                b(x)
            ta, tb = [], []
            for rep in range(30):
                for layer, store in ((a, ta), (b, tb)) if rep % 2 == 0 else ((b, tb), (a, ta)):
                    t0 = time.perf_counter()
                    layer(x)
                    store.append(time.perf_counter() - t0)
        ratios = [y / x_ for x_, y in zip(ta, tb)]
        rows.append({"case": label, "bits": bits, "before_ms": statistics.median(ta) * 1e3,
                     "after_ms": statistics.median(tb) * 1e3, "after_over_before_paired": statistics.median(ratios),
                     "backend": b.backend})
        r = rows[-1]
        print(f"{label:30s} W{bits}A8 {r['backend']:7s} before {r['before_ms']:8.3f} ms  after {r['after_ms']:8.3f} ms"
              f"  after/before (paired median) {r['after_over_before_paired']:.3f}", flush=True)
cpu = open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(": \t")
with open(args.json, "w") as f:
    json.dump({"cpu": cpu, "torch": torch.__version__, "threads": args.threads, "rows": rows}, f, indent=1)
print(f"CPU {cpu}; JSON {args.json}")
