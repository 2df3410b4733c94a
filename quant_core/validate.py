"""Checks on what a user gives, run before any work starts, so that a bad input fails at once with a
message that names the problem and what to do, instead of deep inside calibration (or after it).

Host-free: the library's ``quantize`` (``quant_core/__init__.py``), the CLI and the ComfyUI node call
these. Every failure is an ``InputError`` (a ValueError).
"""
from __future__ import annotations

import itertools
import math

import torch

MIN_SIDE, MAX_SIDE = 64, 4096   # pixels; the ComfyUI node offers the same range
MAX_STEPS = 1000                # a diffusion schedule has 1000 training timesteps
MAX_PROMPTS = 10000
MAX_PROMPT_CHARS = 4000         # CLIP reads 77 tokens; longer text is truncated anyway


class InputError(ValueError):
    """A user input that cannot work; the message says which and what to do."""


class NonFiniteWeightsError(InputError):
    """The float model itself holds NaN or Inf weights."""


def check_finite_weights(model: torch.nn.Module) -> None:
    """Refuse a model whose float weights hold NaN/Inf, naming the first such tensor: calibrating it would
    fail later with an unrelated error (or save a file whose report says 'nan')."""
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        if tensor.is_meta or not tensor.is_floating_point() or tensor.dtype.itemsize == 1:
            continue  # meta: no data; 1-byte floats (fp8) have no isfinite kernel everywhere
        finite = torch.isfinite(tensor.detach())
        if not bool(finite.all()):
            bad = int((~finite).sum())
            layer = name.rpartition(".")[0] or name
            raise NonFiniteWeightsError(
                f"the model's layer {layer} holds {bad} NaN/Inf value(s) in {name}: the float model itself is "
                "broken (it would sample NaN too), so it cannot be calibrated. Re-download or re-convert the "
                "checkpoint, or remove the merge/LoRA that produced it.")


def check_uniform_dtype(model: torch.nn.Module) -> None:
    """Refuse a plain torch model whose float weights mix dtypes (it cannot run: a float32 input meets a
    float16 weight). Hosts that cast weights per layer (ComfyUI's ops) do not call this."""
    seen: dict = {}
    for name, tensor in model.named_parameters():
        if tensor.is_floating_point():
            seen.setdefault(tensor.dtype, name)
    if len(seen) > 1:
        parts = ", ".join(f"{str(dtype).replace('torch.', '')} (e.g. {name})" for dtype, name in seen.items())
        raise InputError(f"the model mixes weight dtypes: {parts}. Convert it to one dtype first, e.g. "
                         "unet.float() or unet.half().")


def check_config(config) -> None:
    """Ranges that QuantConfig's own checks leave open."""
    limit = config.memory_limit_mb
    if not isinstance(limit, (int, float)) or isinstance(limit, bool) or not limit > 0 or not math.isfinite(limit):
        raise InputError(f"memory limit {limit!r} MB: give a positive number of megabytes for the captured "
                         "layer inputs (default 256)")
    if config.workers < 1 or config.fit_rows < 1:
        raise InputError(f"workers ({config.workers}) and fit_rows ({config.fit_rows}) must be at least 1")


def check_sampling(steps: int, width: int | None = None, height: int | None = None) -> None:
    """Steps and image size of the calibration samples (None: the model's default size)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise InputError(f"steps {steps!r}: give a whole number of sampling steps from 1 to {MAX_STEPS}, "
                         "ideally the number you will generate with")
    for side, value in (("width", width), ("height", height)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{side} {value!r}: give a whole number of pixels")
        if not MIN_SIDE <= value <= MAX_SIDE:
            raise InputError(f"{side} {value} is outside {MIN_SIDE}..{MAX_SIDE} pixels; calibrate at the size "
                             "you will generate, within that range")
        if value % 8:
            raise InputError(f"{side} {value} is not a multiple of 8 (the latent is 1/8 of the image); use "
                             f"{value // 8 * 8} or {value // 8 * 8 + 8}")


def clean_prompts(prompts) -> list[str]:
    """The non-blank prompts, stripped; refuses none, too many, or one that is too long."""
    if isinstance(prompts, str):
        prompts = prompts.splitlines()
    if not all(isinstance(p, str) for p in prompts):
        raise InputError("prompts must be text, one prompt per entry")
    lines = [p.strip() for p in prompts if p.strip()]
    if not lines:
        raise InputError("no calibration prompts: give at least one non-blank prompt (one per line)")
    if len(lines) > MAX_PROMPTS:
        raise InputError(f"{len(lines)} calibration prompts; at most {MAX_PROMPTS} (a few dozen varied ones suffice)")
    for i, line in enumerate(lines, 1):
        if len(line) > MAX_PROMPT_CHARS:
            raise InputError(f"prompt {i} is {len(line)} characters long; at most {MAX_PROMPT_CHARS} "
                             "(one prompt per line: was a whole text pasted?)")
    return lines
