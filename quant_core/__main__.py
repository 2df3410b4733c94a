"""Command line: ``fidelityquant quantize`` (after ``pip install .``) or ``python -m quant_core quantize``.

quantize  calibrates a user's model (a diffusers folder, or a single-file SD1.x/SD2.x/SDXL .safetensors
          checkpoint) on a prompt file and writes one safetensors file.

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
    from .validate import clean_prompts

    file = Path(path)
    if not file.is_file():
        raise SystemExit(f"prompt file not found: {path}" + (" (it is a folder)" if file.is_dir() else ""))
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SystemExit(f"cannot read the prompt file {path} ({exc}); save it as UTF-8 text, one prompt per line")
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise SystemExit(f"{path} has no prompts (one per line; lines starting with # are comments)")
    try:
        return clean_prompts(lines)
    except ValueError as exc:
        raise SystemExit(f"{path}: {exc}")


def _is_single_file(path: str) -> bool:
    return Path(path).suffix.lower() in (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".pkl")


def _load_model(path: str, device: str, config=None):
    """The diffusers pipeline, or one line that says why not (diffusers' own errors run to many lines and
    can mislead, e.g. 'Unable to locate the file' for a weights file that exists but is truncated)."""
    from .models.runners import load_diffusers_pipeline
    from .models.single_file import load_single_file_pipeline

    single = _is_single_file(path)
    if config is not None and not single:
        raise SystemExit("--config is for single-file checkpoints; a diffusers folder brings its own configs")
    try:
        if single:
            return load_single_file_pipeline(path, config=config, device=device)
        return load_diffusers_pipeline(path, device=device)
    except (FileNotFoundError, ValueError):
        raise  # already one clear line (missing file/folder, family, config, unsupported pipeline)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        what = "checkpoint" if single else "diffusers model in"
        raise SystemExit(f"could not load the {what} {path} ({type(exc).__name__}: {first}). A weights "
                         "file may be incomplete or corrupt: re-download or re-convert the model.") from None


def cmd_quantize(args) -> int:
    from . import quantize
    from .artifact import check_output_path, save_result
    from .models.runners import DiffusersRunner
    from .validate import check_config, check_sampling

    # Everything that can be checked without the model is checked before loading and calibrating it,
    # so that a bad --out or setting never costs a calibration.
    out = Path(check_output_path(args.out, args.overwrite))
    if out.suffix != ".safetensors":
        raise SystemExit(f"--out {out}: the file name must end in .safetensors")
    prompts = _read_prompts(args.prompts)
    check_sampling(args.steps, args.width, args.height)
    options = dict(timestep_groups=args.groups, consistency_pass=not args.no_consistency, memory_limit_mb=args.memory_mb)
    if args.bits_budget is not None:
        if not PRESETS[args.preset].get("mixed_precision"):
            raise SystemExit(f"--bits-budget applies to W4A8-mixed only (preset {args.preset} has fixed weight bits)")
        options["bits_budget"] = args.bits_budget
    cfg = preset(args.preset, **options)  # ValueError (one line) for a budget outside (4, 16]
    check_config(cfg)
    pipe = _load_model(args.model, args.device, args.config)
    runner = DiffusersRunner(pipe, prompts, negative_prompt=args.negative, steps=args.steps,
                             guidance_scale=args.cfg, height=args.height, width=args.width, seed=args.seed)
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


def _run(args) -> int:
    """One line for the errors a user can act on (SystemExit: printed on stderr, exit status 1), instead of
    a traceback."""
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted; no output file was written", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as exc:
        if isinstance(exc, MemoryError) or "can't allocate" in str(exc) or "out of memory" in str(exc):
            raise SystemExit(f"error: out of memory ({str(exc)[:200]}); lower --memory-mb, the image size or "
                             "the number of prompts") from None
        raise
    except (ValueError, OSError) as exc:  # ours name the problem (settings, files, model)
        raise SystemExit(f"error: {exc}") from None


def main(argv=None, prog=None) -> int:
    parser = argparse.ArgumentParser(prog=prog or "python -m quant_core", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="calibrate a model (diffusers folder or .safetensors checkpoint) and save it")
    q.add_argument("--model", required=True,
                   help="diffusers pipeline folder (model_index.json), or a single-file SD1.x/SD2.x/SDXL .safetensors")
    q.add_argument("--config", default=None,
                   help="single-file checkpoints: a local diffusers folder of the same family whose configs and "
                        "tokenizer build the pipeline (default: the Hugging Face cache's copy; nothing is downloaded)")
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
    q.add_argument("--bits-budget", type=float, default=None,
                   help="W4A8-mixed: average weight bits, above 4 and at most 16 (default 4.5)")
    q.add_argument("--device", default="cpu")
    q.set_defaults(func=cmd_quantize)

    args = parser.parse_args(argv)
    return _run(args)


def console_main() -> int:
    """Entry point of the ``fidelityquant`` console script (pyproject.toml [project.scripts])."""
    return main(prog="fidelityquant")


if __name__ == "__main__":
    sys.exit(main())
