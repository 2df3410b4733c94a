"""Server-side checks of node inputs (anyone who can reach a ComfyUI port can queue any graph) and the
file rules of models/fidelity_quant/. Host-free, so they are tested without ComfyUI.

Save names follow ComfyUI's convention for files it writes: never overwrite, number new files with a
five-digit counter (``name.safetensors``, then ``name_00001.safetensors``, ...). Files are only written
and read inside the folder: a name is a plain file name, and a file reached through a link that leads
out of the folder is refused.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from quant_core.artifact import save_result
from quant_core.config import QuantConfig
from quant_core.validate import MAX_PROMPT_CHARS, check_config, check_sampling, clean_prompts

SUFFIX = ".safetensors"
MAX_STEM_BYTES = 200          # + "_00001.safetensors" stays far below the usual 255-byte name limit
MAX_COPIES = 99999
RESERVED_CHARS = '<>:"/\\|?*'  # Windows forbids these; "/" and "\\" would also name folders
PRESETS = ("W8A8", "W4A8", "W4A8-mixed")
MAX_PROMPTS = 1000            # per node: each prompt is a full sampling run, three times over
MAX_GROUPS = 16
MAX_MEMORY_MB = 65536
RESERVED_NAMES = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}


def _refuse(problem: str):
    raise ValueError(f"FidelityQuant: {problem}")


def save_stem(filename) -> str:
    """The file name's stem, or ValueError naming what is wrong with it."""
    if not isinstance(filename, str):
        _refuse(f"the file name must be text, got {type(filename).__name__}")
    name = filename.strip()
    if name.lower().endswith(SUFFIX):
        name = name[: -len(SUFFIX)]
    if not name:
        _refuse("the file name is empty; type a name such as sd15-w8a8")
    if re.search(r"[\x00-\x1f\x7f]", name):
        _refuse("the file name contains a line break, tab or other control character (a pasted text?); "
                "type a short name on one line")
    if "/" in name or "\\" in name or os.path.isabs(name) or name in (".", ".."):
        _refuse(f"{name[:60]!r} must be a plain file name without folders; files are always saved in "
                "models/fidelity_quant/")
    bad = sorted({c for c in name if c in RESERVED_CHARS})
    if bad:
        _refuse(f"the file name contains {' '.join(bad)}, which file systems reserve; use letters, digits, - and _")
    if name.startswith(".") or name.endswith((".", " ")):
        _refuse("the file name may not start with a dot or end with a dot or space")
    if name.split(".")[0].upper() in RESERVED_NAMES:
        _refuse(f"{name!r} is a name Windows reserves for a device; choose another")
    size = len(name.encode("utf-8"))
    if size > MAX_STEM_BYTES:
        _refuse(f"the file name is {size} bytes long; at most {MAX_STEM_BYTES}")
    return name


def save_numbered(calibration, folder, filename) -> Path:
    """Write ``folder/<stem>.safetensors``, or the first free numbered copy; never overwrites. The name is
    taken atomically by save_result, so a concurrent save of the same name gets the next number."""
    stem = save_stem(filename)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for counter in range(MAX_COPIES + 1):
        path = folder / (f"{stem}{SUFFIX}" if counter == 0 else f"{stem}_{counter:05d}{SUFFIX}")
        if os.path.lexists(path):  # a link (even a dangling one) counts as taken
            continue
        try:
            return Path(save_result(calibration, path))
        except FileExistsError:
            continue
    _refuse(f"{stem}{SUFFIX} and all {MAX_COPIES} numbered copies exist; choose another name")


def inside(folder, path) -> bool:
    real_folder, real = os.path.realpath(folder), os.path.realpath(path)
    return os.path.commonpath([real_folder, real]) == real_folder


def resolve_load(folders, file) -> str:
    """The path of ``file`` in one of the fidelity_quant folders; refuses names with folders going up,
    other suffixes, and links out of the folder."""
    if not isinstance(file, str) or not file or len(file) > 1024 or "\x00" in file:
        _refuse("choose a file from the list (models/fidelity_quant/)")
    if os.path.isabs(file) or ".." in Path(file.replace("\\", "/")).parts:
        _refuse(f"{file[:80]!r} must be a file inside models/fidelity_quant/ (no absolute paths or '..')")
    if not file.lower().endswith(SUFFIX):
        _refuse(f"{file[:80]!r} is not a .safetensors file; only safetensors files are read")
    for folder in folders:
        path = os.path.join(folder, file)
        if os.path.isfile(path):
            if not inside(folder, path):
                _refuse(f"{file!r} is a link to a file outside models/fidelity_quant/; copy the file into the "
                        "folder instead")
            return path
    _refuse(f"{file!r} was not found in models/fidelity_quant/ (refresh the list, or save a result there first)")


def check_calibrate_inputs(prompts, negative, steps, cfg, width, height, seed, preset, timestep_groups,
                           bits_budget, memory_limit_mb) -> list[str]:
    """Every Calibrate & Quantize input in range (ComfyUI checks widget ranges for the UI, not every value
    an API client may send); -> the prompt lines. ValueError names the first input that is wrong."""
    try:
        lines = clean_prompts(prompts if isinstance(prompts, str) else [])
        if not isinstance(negative, str) or len(negative) > MAX_PROMPT_CHARS:
            raise ValueError(f"the negative prompt must be text of at most {MAX_PROMPT_CHARS} characters")
        if len(lines) > MAX_PROMPTS:
            raise ValueError(f"{len(lines)} calibration prompts; at most {MAX_PROMPTS} in one node "
                             "(a few dozen varied prompts suffice)")
        check_sampling(steps, width, height)
        if isinstance(cfg, bool) or not isinstance(cfg, (int, float)) or not 0 <= cfg <= 100:
            raise ValueError(f"cfg {cfg!r} must be a number from 0 to 100")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= 0xFFFFFFFF:
            raise ValueError(f"seed {seed!r} must be a whole number from 0 to {0xFFFFFFFF}")
        if preset not in PRESETS:
            raise ValueError(f"preset {str(preset)[:40]!r} is not one of {', '.join(PRESETS)}")
        groups_ok = isinstance(timestep_groups, int) and not isinstance(timestep_groups, bool)
        if not groups_ok or not 1 <= timestep_groups <= MAX_GROUPS:
            raise ValueError(f"timestep_groups {timestep_groups!r} must be a whole number from 1 to {MAX_GROUPS}")
        if preset == "W4A8-mixed" and (not isinstance(bits_budget, (int, float)) or not 4 < bits_budget <= 16):
            raise ValueError(f"bits_budget {bits_budget!r}: W4A8-mixed needs an average above 4 and at most 16 "
                             "weight bits (4.5 promotes about one layer in eight to int8)")
        check_config(QuantConfig(memory_limit_mb=memory_limit_mb))
        if memory_limit_mb > MAX_MEMORY_MB:
            raise ValueError(f"memory_limit_mb {memory_limit_mb} is above {MAX_MEMORY_MB} (64 GiB)")
    except ValueError as exc:
        text = str(exc)
        raise ValueError(text if text.startswith("FidelityQuant") else f"FidelityQuant: {text}") from None
    return lines
