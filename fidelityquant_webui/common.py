"""Host-free parts of the AUTOMATIC1111 / Forge glue: the file folder, file choice, the layer swap for one
job, the calibration settings. No A1111 / Forge import here (unit-tested without either host).

The layer swap replaces individual layers of the live UNet (never the UNet object itself), so an extension
that replaces the UNet's ``forward`` on the instance (sd-webui-controlnet) still runs, and a forward
pre-hook on the UNet hands each call's timestep to the runtime for group routing. ``restore`` puts the
very same float modules back, so "None" afterwards runs exactly the float model.
"""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import torch

from quant_core.config import PRESETS, preset
from quant_core.validate import MAX_PROMPT_CHARS, check_sampling, clean_prompts

NONE = "None"
FOLDER_NAME = "fidelity_quant"          # models/fidelity_quant, the same folder name as in ComfyUI
INFOTEXT_KEY = "FidelityQuant"          # "FidelityQuant: file.safetensors" in the generation parameters
UI_PRESETS = ["W8A8", "W4A8", "W4A8-mixed"]
DEFAULT_PROMPTS_FILE = Path(__file__).resolve().parent.parent / "nodes" / "default_prompts.txt"


def default_prompts() -> str:
    return DEFAULT_PROMPTS_FILE.read_text().strip()


def list_files(folder: str) -> list[str]:
    """``NONE`` then the ``.safetensors`` files in ``folder`` (sub-folders with "/"), sorted."""
    found = []
    if os.path.isdir(folder):
        for root, _dirs, files in os.walk(folder):
            for name in files:
                if name.endswith(".safetensors") and not name.startswith("."):
                    found.append(os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/"))
    return [NONE] + sorted(found, key=str.lower)


def is_none(choice) -> bool:
    return choice is None or str(choice).strip() in ("", NONE, "none")


def resolve_file(folder: str, choice: str) -> str:
    """The path of ``choice`` (a name from ``list_files``) inside ``folder``; clear errors otherwise."""
    name = str(choice).strip()
    if not name.endswith(".safetensors"):
        raise ValueError(f"FidelityQuant: {name!r} is not a .safetensors file; only safetensors files are loaded")
    root = os.path.realpath(folder)
    path = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([root, path]) != root:
        raise ValueError(f"FidelityQuant: {name!r} is outside {folder}")
    if not os.path.isfile(path):
        available = ", ".join(list_files(folder)[1:]) or "none"
        raise FileNotFoundError(f"FidelityQuant: no file {name!r} in {folder} (available: {available})")
    return path


def output_path(folder: str, filename: str) -> str:
    """``folder/<filename>.safetensors``; an existing name gets ``_00001`` and so on (never overwritten)."""
    name = str(filename).strip()
    stem = name[:-len(".safetensors")] if name.endswith(".safetensors") else name
    if not stem or stem.startswith(".") or Path(stem).name != stem or re.search(r"[\\/:*?\"<>|]", stem):
        raise ValueError(f"FidelityQuant: {filename!r} must be a plain file name (no folders)")
    path = Path(folder) / f"{stem}.safetensors"
    counter = 1
    while path.exists():
        path = Path(folder) / f"{stem}_{counter:05d}.safetensors"
        counter += 1
    return str(path)


def prompt_lines(prompts: str) -> list[str]:
    try:
        return clean_prompts(str(prompts or ""))
    except ValueError as exc:
        raise ValueError(f"FidelityQuant: {exc}") from None


def whole_number(name: str, value) -> int:
    """``value`` as an int when it is a whole number (the UI's sliders and JSON may give 20.0); else ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or int(value) != value:
        raise ValueError(f"FidelityQuant: {name} {value!r} must be a whole number")
    return int(value)


def check_calibration_inputs(prompts, negative, steps, cfg, width, height, seed) -> tuple:
    """The sampling inputs of a calibration, checked before any work starts (the API takes any JSON);
    -> (prompt lines, steps, width, height, seed) with the numbers as ints."""
    lines = prompt_lines(prompts)
    if not isinstance(negative, str) or len(negative) > MAX_PROMPT_CHARS:
        raise ValueError(f"FidelityQuant: the negative prompt must be text of at most {MAX_PROMPT_CHARS} characters")
    steps, width, height, seed = (whole_number(n, v) for n, v in
                                  (("steps", steps), ("width", width), ("height", height), ("seed", seed)))
    try:
        check_sampling(steps, width, height)
    except ValueError as exc:
        raise ValueError(f"FidelityQuant: {exc}") from None
    if isinstance(cfg, bool) or not isinstance(cfg, (int, float)) or not 0 <= cfg <= 100:
        raise ValueError(f"FidelityQuant: cfg {cfg!r} must be a number from 0 to 100")
    if not 0 <= seed <= 0xFFFFFFFF:
        raise ValueError(f"FidelityQuant: seed {seed} must be from 0 to {0xFFFFFFFF} (prompt i uses seed + i)")
    return lines, steps, width, height, seed


def make_config(preset_name: str, timestep_groups: int = 4, bits_budget: float = 4.5, consistency_pass: bool = True,
                memory_limit_mb: int = 256):
    """The engine config for the tab's settings (bits_budget only matters for W4A8-mixed)."""
    if preset_name not in UI_PRESETS or preset_name not in PRESETS:
        raise ValueError(f"FidelityQuant: unknown preset {preset_name!r}; choose one of {', '.join(UI_PRESETS)}")
    options = {"timestep_groups": whole_number("timestep_groups", timestep_groups),
               "consistency_pass": bool(consistency_pass),
               "memory_limit_mb": whole_number("memory_limit_mb", memory_limit_mb)}
    if preset_name == "W4A8-mixed":
        options["bits_budget"] = float(bits_budget)
    return preset(preset_name, **options)


class LayerSwap:
    """A runtime's quantized layers (and time lookups) put into a live UNet for one job; ``restore`` undoes it.

    ``runtime``: a :class:`quant_core.runtime.model.QuantizedModel`; ``timesteps_from_call`` reads the
    timestep of a UNet call (the adapter's). ``before_swap(name, original, replacement)`` lets host glue
    copy host attributes (e.g. A1111's ``network_layer_name``) onto the replacement; ``on_call()`` runs at the
    start of every UNet call, before the routing (e.g. to tell the runtime that a LoRA set changed).
    """

    def __init__(self, unet, runtime, timesteps_from_call, before_swap=None, on_call=None) -> None:
        self.unet, self.runtime = unet, runtime
        self.originals: dict = {}
        self.handles: list = []
        replacements = runtime.replacements(unet)  # time lookups wrap the UNet's own modules: before swapping
        try:
            for name, module in replacements.items():
                parent_name, _, child = name.rpartition(".")
                parent = unet.get_submodule(parent_name) if parent_name else unet
                if child not in parent._modules:
                    raise KeyError(f"FidelityQuant: the UNet has no layer {name}")
                original = parent._modules[child]
                if before_swap is not None:
                    before_swap(name, original, module)
                self.originals[name] = (parent, child, original)
                parent._modules[child] = module

            def route(_module, args, kwargs):
                if on_call is not None:
                    on_call()
                runtime.set_timesteps(timesteps_from_call(args, kwargs))

            def finish(_module, _args, _output):
                runtime.finish_call()

            self.handles = [unet.register_forward_pre_hook(route, with_kwargs=True),
                            unet.register_forward_hook(finish)]
        except BaseException:
            self.restore()
            raise

    @property
    def active(self) -> bool:
        return bool(self.originals)

    def restore(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        for parent, child, original in self.originals.values():
            parent._modules[child] = original
        self.originals = {}


class Refusal:
    """A job refused by the glue: ``error`` is raised at the UNet's first call, so the job fails with that message.

    A1111 and Forge catch and only log exceptions from a script's ``process`` / ``process_before_every_sampling``
    (the job would silently run the float model); an exception from the UNet's forward ends the job and reaches
    the UI and the API's error response. ``restore`` removes the hook (the next job's ``before_process`` does).
    """

    def __init__(self, unet, error: BaseException) -> None:
        self.error = error

        def refuse(_module, _args, _kwargs):
            raise self.error

        self.handles = [unet.register_forward_pre_hook(refuse, with_kwargs=True)]

    @property
    def active(self) -> bool:
        return bool(self.handles)

    def restore(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


@contextlib.contextmanager
def unet_outside_inference_mode(unet):
    """While active, ``unet``'s forward runs outside ``torch.inference_mode()`` (still without autograd).

    Forge samples under ``torch.inference_mode()``; tensors made there are inference tensors, which the
    calibration's hooks (state built during sampling, updated in place afterwards) cannot use. The forward is
    wrapped on the instance and the previous instance attribute (e.g. ControlNet's) is put back afterwards."""
    previous = unet.__dict__.get("forward", _MISSING)
    inner = unet.forward

    def forward(*args, **kwargs):
        with torch.inference_mode(False), torch.no_grad():
            return inner(*args, **kwargs)

    unet.forward = forward
    try:
        yield unet
    finally:
        if previous is _MISSING:
            unet.__dict__.pop("forward", None)
        else:
            unet.forward = previous


_MISSING = object()
