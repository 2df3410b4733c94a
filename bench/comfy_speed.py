"""Per-step sampling speed inside a headless ComfyUI: the float MODEL vs the quantized MODEL, over HTTP.

    python bench/comfy_speed.py [--comfyui PATH] [--sizes test,sd15] [--checkpoint FILE.safetensors]
                                [--res 256,512] [--steps 2,6] [--rounds 3] [--preset W8A8] [--json PATH]
    python bench/comfy_speed.py --quick          # smoke run: test-size checkpoint, 64 px, 1 round

Starts ComfyUI (COMFYUI_PATH or --comfyui) as ``main.py --cpu`` on a free loopback port with a temporary
base directory and this pack in custom_nodes/ (tests/comfyui_server.py), writes seeded SD1.5-layout
checkpoints into it (or links a user's single-file SD1.5 checkpoint, --checkpoint) and POSTs API graphs:

- ``float``: CheckpointLoaderSimple -> KSampler (euler, CFG 7, batch 1) -> SaveLatent (no VAE decode);
- ``calibrated``: the same with the MODEL straight out of Calibrate & Quantize;
- ``loaded``: the same with the MODEL out of Load Quantized UNet, on the file Save Quantized UNet wrote
  from that calibration (calibrated once per checkpoint before any timing).

Every graph carries all three MODEL sources (the unused ones dangle and do not run), so ComfyUI's classic
cache keeps the checkpoint, the calibration and the loaded file between prompts, as it does for a user
who switches the KSampler's input; the KSampler gets a new seed each run so it always runs. Time is
ComfyUI's own: execution_success minus execution_start timestamps from /history (ms), so HTTP polling
does not count. Per round and MODEL source: a run at the low step count right after switching from
another source (``first``), a warm run at the low and one at the high step count; per-step time =
(high - low) / (steps difference), so checkpoint loading and fixed per-graph work drop out;
``switch_s`` = first - warm low run: the one-time cost of switching MODELs (unpatch/patch, prepacking,
first-call checks). Sources rotate from round to round; ratios are paired within a round, then the
median is reported with the range. Warm-up runs (one per source and resolution) are excluded.

Calibration is short by default (1 prompt x 2 steps at 256 px, 1 timestep group, no consistency pass):
the step time does not depend on the scale values, only on the layer formats and kernels.

Checkpoints (``--sizes``): ``test`` = the headless-server test's SD1.5 layout (tests/comfy_checkpoints.py:
model_channels 320, one level); ``sd15`` = the full SD1.5 UNet shape (channel_mult 1,2,4,4, two ResBlocks
per level, 860M parameters), seeded random fp16 weights; both with a TAESD and a random CLIP-L. --work DIR
keeps them (and reuses them in later runs) instead of a temporary folder.

Full-size runs (quiet machine; ~20-30 min each on 2 cores, mostly the 512 px float steps and the calibration):

    .venv/bin/python bench/comfy_speed.py --comfyui /work/hosts/comfyui-0.3.64 --sizes test,sd15 --res 256,512 \\
        --steps 2,6 --rounds 3 --work /tmp/fq_speed --json bench/out/comfy-speed-0.3.64.json
    .venv/bin/python bench/comfy_speed.py --comfyui /work/hosts/comfyui-0.8.0 --sizes sd15 --res 256,512 \\
        --rounds 3 --work /tmp/fq_speed --json bench/out/comfy-speed-0.8.0.json

JSON: ``meta`` (machine: CPU model and int8/bf16 flags, threads, ComfyUI version, settings, command),
``checkpoints`` (label, file, UNet parameters, calibration seconds, saved file) and ``records``: one per
checkpoint x resolution x source with ``s_per_step`` (median) and its ``_runs``, ``switch_s`` and its runs,
``speedup_vs_float`` (median of paired per-round ratios) and its runs, ``switch_vs_float_step``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for extra in (REPO, REPO / "tests"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

import torch  # noqa: E402

from bench.kernels import cpu_flags, cpu_model  # noqa: E402

SOURCES = ("float", "calibrated", "loaded")
KSAMPLER = "7"
SAVE_PREFIX = "fq_speed"
POSITIVE = "a photograph of a lighthouse on a rocky coast at sunset"
NEGATIVE = "blurry, low quality"
# ComfyUI's own SD1.5 UNet config (comfy/model_detection.py, the diffusers-conversion table's SD15 entry)
FULL_SD15 = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
                 channel_mult=(1, 2, 4, 4), transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                 transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1,
                 use_spatial_transformer=True, context_dim=768, num_heads=8, use_linear_in_transformer=False,
                 legacy=False)


def machine() -> dict:
    """The CPU and its int8/bf16 flags (what decides the kernels), as bench/calibrate.py records them."""
    return {"cpu": cpu_model(), "isa": cpu_flags(), "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


# --- checkpoints --------------------------------------------------------------------------------------------

def write_full_sd15(comfy_dir: Path, path: Path, seed: int = 0) -> None:
    """The full SD1.5 UNet shape with seeded fp16 weights + TAESD + CLIP-L as one file."""
    import comfy.ldm.modules.diffusionmodules.openaimodel as oam
    import comfy.ops
    import comfy_checkpoints as ck
    from safetensors.torch import save_file

    unet = ck.random_state(oam.UNetModel(**FULL_SD15, device="meta", operations=comfy.ops.disable_weight_init), seed)
    checkpoint = {**{"model.diffusion_model." + k: v for k, v in unet.items()},
                  **ck.taesd_state(seed + 2, ck.VAE_SCALE["sd15"]), **ck.text_encoder_state("sd15", comfy_dir, seed + 1)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(checkpoint, str(path) + ".partial")
    os.replace(str(path) + ".partial", path)


def unet_params(path: Path) -> int:
    """UNet parameters of a single-file checkpoint, from its header (no tensor is read)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith("model.diffusion_model."))


def prepare_checkpoints(comfy_dir: Path, models: Path, sizes: list, user_file: str) -> list:
    """-> [(label, checkpoint file name, UNet parameters)]; built files already there are reused."""
    from comfyui_env import import_comfyui

    import_comfyui("bench/comfy_speed.py", "comfy.clip_model", "comfy.ops", "comfy.taesd.taesd")
    import comfy_checkpoints as ck

    folder = models / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for label in sizes:
        path = folder / f"{SAVE_PREFIX}_{label}.safetensors"
        start = time.monotonic()
        reused = path.exists()
        if not reused and label == "test":
            ck.write_checkpoint("sd15", comfy_dir, path)
        elif not reused:
            write_full_sd15(comfy_dir, path)
        print(f"checkpoint {label}: {path.name}, {unet_params(path) / 1e6:.0f}M UNet parameters "
              f"({'reused' if reused else f'built in {time.monotonic() - start:.1f} s'})", flush=True)
        out.append((label, path.name, unet_params(path)))
    if user_file:
        link = folder / ("user_" + Path(user_file).name)
        if not link.exists():
            os.symlink(Path(user_file).resolve(), link)
        out.append(("user", link.name, unet_params(link)))
    return out


# --- graphs and runs ----------------------------------------------------------------------------------------

def node(kind: str, **inputs) -> dict:
    return {"class_type": kind, "inputs": inputs, "_meta": {"title": kind}}


def graph(ckpt: str, source: str, steps: int, res: int, seed: int, calib: dict, quant_file: str | None,
          save_as: str | None = None) -> dict:
    """One API prompt: every MODEL source present (unused ones dangle), the KSampler fed from ``source``."""
    g = {"1": node("CheckpointLoaderSimple", ckpt_name=ckpt),
         "2": node("CLIPTextEncode", text=POSITIVE, clip=["1", 1]),
         "3": node("CLIPTextEncode", text=NEGATIVE, clip=["1", 1]),
         "4": node("EmptyLatentImage", width=res, height=res, batch_size=1),
         "5": node("FidelityQuantCalibrate", model=["1", 0], clip=["1", 1], **calib)}
    if quant_file:
        g["6"] = node("FidelityQuantLoad", model=["1", 0], file=quant_file)
    if save_as:
        g["9"] = node("FidelityQuantSave", quant_result=["5", 1], filename=save_as)
        return g
    model = {"float": ["1", 0], "calibrated": ["5", 0], "loaded": ["6", 0]}[source]
    g[KSAMPLER] = node("KSampler", model=model, positive=["2", 0], negative=["3", 0], latent_image=["4", 0], seed=seed,
                       steps=steps, cfg=7.0, sampler_name="euler", scheduler="normal", denoise=1.0)
    g["8"] = node("SaveLatent", samples=[KSAMPLER, 0], filename_prefix=f"{SAVE_PREFIX}/latent")
    return g


def execute(srv, prompt: dict, timeout: float, must_run: str | None = KSAMPLER) -> float:
    """Run ``prompt``; -> ComfyUI's execution seconds (its own start / success timestamps)."""
    from comfyui_server import messages, succeeded

    entry, _ = srv.run(prompt, timeout)
    succeeded(entry, srv)
    cached = messages(entry, "execution_cached")[0]["nodes"]
    if must_run and must_run in cached:
        raise AssertionError(f"node {must_run} was served from the cache; the run timed nothing")
    start = messages(entry, "execution_start")[0]["timestamp"]
    return (messages(entry, "execution_success")[0]["timestamp"] - start) / 1e3


class Runner:
    def __init__(self, srv, ckpt: str, calib: dict, timeout: float):
        self.srv, self.ckpt, self.calib, self.timeout = srv, ckpt, calib, timeout
        self.quant_file, self.seed = None, 1000

    def calibrate_and_save(self) -> tuple[float, str]:
        folder = self.srv.base / "models" / "fidelity_quant"
        before = set(os.listdir(folder)) if folder.is_dir() else set()
        name = f"{Path(self.ckpt).stem}_{self.calib['preset']}"
        seconds = execute(self.srv, graph(self.ckpt, "", 0, 0, 0, self.calib, None, save_as=name), self.timeout,
                          must_run=None)
        made = sorted(set(os.listdir(folder)) - before)
        if len(made) != 1:
            raise AssertionError(f"expected one saved file in {folder}, found new {made}")
        self.quant_file = made[0]
        return seconds, made[0]

    def run(self, source: str, steps: int, res: int) -> float:
        self.seed += 1  # a new seed: the KSampler is never served from ComfyUI's cache
        return execute(self.srv, graph(self.ckpt, source, steps, res, self.seed, self.calib, self.quant_file),
                       self.timeout)


def measure(runner: Runner, res: int, lo: int, hi: int, rounds: int) -> dict:
    """-> {source: {"first", "lo", "hi", "warmup"}: [seconds per round]} at ``res``."""
    times = {s: {"first": [], "lo": [], "hi": [], "warmup": []} for s in SOURCES}
    for source in SOURCES:
        times[source]["warmup"].append(runner.run(source, lo, res))
    for r in range(rounds):
        order = SOURCES[r % len(SOURCES):] + SOURCES[:r % len(SOURCES)]
        for source in order:
            t = times[source]
            t["first"].append(runner.run(source, lo, res))  # right after another source ran
            t["lo"].append(runner.run(source, lo, res))
            t["hi"].append(runner.run(source, hi, res))
        print(f"  {res} px round {r + 1}/{rounds}: " + ", ".join(
            f"{s} {(times[s]['hi'][-1] - times[s]['lo'][-1]) / (hi - lo):.3f} s/step" for s in SOURCES), flush=True)
    return times


def _median(values: list) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else float("nan")


def records_for(label: str, res: int, times: dict, lo: int, hi: int) -> list:
    per_step = {s: [(h - l) / (hi - lo) for h, l in zip(times[s]["hi"], times[s]["lo"])] for s in SOURCES}
    out = []
    for s in SOURCES:
        switch = [f - l for f, l in zip(times[s]["first"], times[s]["lo"])]
        # paired within a round; a non-positive difference (noise swamping a tiny model) gives no ratio
        ratios = [a / b if a > 0 and b > 0 else float("nan") for a, b in zip(per_step["float"], per_step[s])]
        float_step = _median(per_step["float"])
        out.append({"checkpoint": label, "res": res, "model": s, "s_per_step": _median(per_step[s]),
                    "s_per_step_runs": per_step[s], "switch_s": _median(switch), "switch_s_runs": switch,
                    "speedup_vs_float": _median(ratios), "speedup_vs_float_runs": ratios,
                    "switch_vs_float_step": _median(switch) / float_step if float_step > 0 else float("nan"),
                    "graph_s": {k: v for k, v in times[s].items()}})
    return out


def table(records: list) -> str:
    def span(values, fmt):
        return f"{min(values):{fmt}}-{max(values):{fmt}}" if values else "-"

    header = (f"{'checkpoint':<11}{'res':>5} {'model':<11}{'s/step':>8}{'range':>17}{'x float':>9}{'range':>13}"
              f"{'switch s':>10}{'/float step':>12}")
    rows = [header]
    for r in records:
        steps, ratios = r["s_per_step_runs"], [v for v in r["speedup_vs_float_runs"] if math.isfinite(v)]
        rows.append(f"{r['checkpoint']:<11}{r['res']:>5} {r['model']:<11}{r['s_per_step']:>8.3f}{span(steps, '.3f'):>17}"
                    f"{r['speedup_vs_float']:>9.2f}{span(ratios, '.2f'):>13}{r['switch_s']:>10.2f}"
                    f"{r['switch_vs_float_step']:>12.2f}")
    return "\n".join(rows)


# --- main ---------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", ""), help="ComfyUI checkout (default $COMFYUI_PATH)")
    parser.add_argument("--sizes", default="test,sd15", help="built checkpoints: test, sd15 (comma-separated; '' for none)")
    parser.add_argument("--checkpoint", default="", help="also time a user's single-file SD1.5 .safetensors")
    parser.add_argument("--res", default="256,512", help="comma-separated image sizes (px)")
    parser.add_argument("--steps", default="2,6", help="low,high step counts (per-step = difference)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--preset", default="W8A8", choices=("W8A8", "W4A8", "W4A8-mixed"))
    parser.add_argument("--calib", default="1,2,256", help="calibration prompts,steps,px (short: speed only)")
    parser.add_argument("--work", default="", help="keep checkpoints and ComfyUI's base folder here (reused)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per prompt")
    parser.add_argument("--json", default="")
    parser.add_argument("--quick", action="store_true", help="smoke run: test size, 64 px, steps 2,8, 1 round, 1x1 calibration")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.res, args.steps, args.rounds, args.calib = "test", "64", "2,8", 1, "1,1,64"
    comfy_dir = Path(args.comfyui) if args.comfyui else None
    if comfy_dir is None or not (comfy_dir / "main.py").is_file():
        parser.error(f"--comfyui / COMFYUI_PATH must name a ComfyUI checkout (got {args.comfyui!r})")
    os.environ["COMFYUI_PATH"] = str(comfy_dir)  # what tests/comfyui_env.py imports ComfyUI from
    sizes = [s for s in args.sizes.split(",") if s]
    if set(sizes) - {"test", "sd15"} or not (sizes or args.checkpoint):
        parser.error(f"--sizes takes test and/or sd15 (got {args.sizes!r}), or give --checkpoint")
    resolutions = [int(v) for v in args.res.split(",")]
    lo, hi = (int(v) for v in args.steps.split(","))
    n_prompts, calib_steps, calib_px = (int(v) for v in args.calib.split(","))
    if not 0 < lo < hi:
        parser.error("--steps LOW,HIGH with 0 < LOW < HIGH")
    calib = {"prompts": "\n".join(["a red house on a hill", "a blue boat on a lake", "a cat on a sofa"][:n_prompts]),
             "negative": NEGATIVE, "steps": calib_steps, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
             "width": calib_px, "height": calib_px, "seed": 0, "preset": args.preset, "timestep_groups": 1,
             "bits_budget": 4.5, "consistency_pass": False, "memory_limit_mb": 256}

    from comfyui_server import comfyui_version, running_server

    base = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="fq_comfy_speed_"))
    records, checkpoints = [], []
    try:
        ckpts = prepare_checkpoints(comfy_dir, base / "models", sizes, args.checkpoint)
        with running_server(comfy_dir, base) as srv:
            for label, ckpt, params in ckpts:
                runner = Runner(srv, ckpt, calib, args.timeout)
                calib_s, saved = runner.calibrate_and_save()
                print(f"{label}: calibrated ({args.preset}, {args.calib}) and saved {saved} in {calib_s:.1f} s", flush=True)
                checkpoints.append({"label": label, "file": ckpt, "unet_params": params, "calibration_s": calib_s,
                                    "quantized_file": saved})
                for res in resolutions:
                    records += records_for(label, res, measure(runner, res, lo, hi, args.rounds), lo, hi)
                (base / "models" / "fidelity_quant" / saved).unlink()  # remade by every run; do not pile up in --work
    finally:
        if not args.work:
            shutil.rmtree(base, ignore_errors=True)

    print(f"\nper-step sampling time inside ComfyUI (steps {lo} vs {hi}, median of {args.rounds} rounds; "
          f"{args.preset}; x float = paired float/quantized step time)")
    print(table(records))
    meta = {"machine": machine(), "comfyui": str(comfy_dir), "comfyui_version": ".".join(map(str, comfyui_version(comfy_dir))),
            "preset": args.preset, "calibration": {"prompts": n_prompts, "steps": calib_steps, "px": calib_px,
                                                   "timestep_groups": 1, "consistency_pass": False},
            "steps": [lo, hi], "res": resolutions, "rounds": args.rounds, "sampler": "euler/normal, CFG 7, batch 1",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": "python bench/comfy_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    json_path = Path(args.json or REPO / "bench" / "out" / "comfy-speed.json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({"meta": meta, "checkpoints": checkpoints, "records": records}, indent=2))
    print(f"JSON: {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
