"""What a FidelityQuant file must hold, checked before anything is built from it.

A file may be damaged (caught by the digest, ``integrity.py``), written by an older version without a
digest, or crafted. These checks make every such file either load correctly or fail with one
``QuantFileError`` that names the problem: metadata types, layer specs against the stored tensors'
shapes and dtypes, missing or extra tensors, non-finite or non-positive scales, the time tables'
shapes. Layers are first built on the meta device, so a spec claiming a huge layer allocates nothing.
"""
from __future__ import annotations

import json
import math

import torch

from .config import QuantConfig
from .runtime.layers import layer_from_spec

LAYOUTS = ("ldm", "diffusers")
SD_VERSIONS = ("sd1", "sd2", "sdxl")
JSON_KEYS = ("fingerprint", "config", "layers", "groups", "plan", "report")
AGAIN = "Copy the file again from where it was saved, or calibrate again."


class QuantFileError(ValueError):
    """A file that is not a readable FidelityQuant result."""


def _fail(path, problem: str):
    raise QuantFileError(f"{path}: {problem}. {AGAIN}")


def parse_metadata(path, metadata: dict) -> dict:
    """The metadata's JSON values decoded and type-checked, plus the built config."""
    for key in ("family", "variant") + JSON_KEYS:
        if key not in metadata:
            _fail(path, f"metadata entry '{key}' is missing")
    if metadata["family"] not in LAYOUTS:
        _fail(path, f"unknown module layout {metadata['family']!r} (this version reads {', '.join(LAYOUTS)})")
    if metadata["variant"] not in SD_VERSIONS:
        raise QuantFileError(f"{path} was made for a {metadata['variant']!r} UNet; this version supports "
                             f"{', '.join(SD_VERSIONS)}. Use a FidelityQuant version that supports it.")
    parsed = {}
    for key in JSON_KEYS:
        try:
            parsed[key] = json.loads(metadata[key])
        except (ValueError, RecursionError):
            _fail(path, f"metadata entry '{key}' is not valid JSON")
    kinds = {"fingerprint": dict, "config": dict, "layers": dict, "groups": list, "plan": dict, "report": dict}
    for key, kind in kinds.items():
        if not isinstance(parsed[key], kind):
            _fail(path, f"metadata entry '{key}' should be a JSON {kind.__name__}, not {type(parsed[key]).__name__}")
    if not all(isinstance(v, str) for v in parsed["fingerprint"].values()):
        _fail(path, "metadata entry 'fingerprint' holds non-text values")
    groups = parsed["groups"]
    if not groups or not all(isinstance(g, list) and g and all(_finite_number(t) for t in g) for g in groups):
        _fail(path, "metadata entry 'groups' should be a non-empty list of non-empty lists of timesteps")
    if not all(v in (4, 8, 16) and not isinstance(v, bool) for v in parsed["plan"].values()):
        _fail(path, "metadata entry 'plan' should map layer names to 4, 8 or 16 bits")
    if not all(isinstance(spec, dict) for spec in parsed["layers"].values()):
        _fail(path, "metadata entry 'layers' should map layer names to specs")
    try:
        parsed["config"] = QuantConfig.from_dict(parsed["config"])
    except (TypeError, ValueError) as exc:
        _fail(path, f"metadata entry 'config' is invalid ({exc})")
    return parsed


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def expected_tensors(path, specs: dict) -> tuple[dict, dict]:
    """(meta layer per name, {file key: (shape, dtype)}) from the specs, allocating nothing."""
    layers, expected = {}, {}
    for name, spec in specs.items():
        problem = _spec_problem(spec)
        if problem:
            _fail(path, f"layer {name}: its spec is invalid ({problem})")
        try:
            layer = layer_from_spec(spec, device="meta")
        except Exception as exc:  # any malformed spec: wrong kind, types or sizes
            _fail(path, f"layer {name}: its spec is invalid ({type(exc).__name__}: {exc})")
        layers[name] = layer
        for key, tensor in layer.state_dict().items():
            expected[f"layer.{name}.{key}"] = (tuple(tensor.shape), tensor.dtype)
    return layers, expected


_SIZES = ("in_features", "out_features", "in_channels", "out_channels", "weight_bits", "group_size", "act_groups")
_PAIRS = {"kernel_size": 1, "stride": 1, "dilation": 1, "padding": 0}  # field -> smallest allowed value


def _spec_problem(spec: dict) -> str | None:
    """What is wrong with a spec's field types (the layer classes trust theirs), or None."""
    def count(value, least):
        return isinstance(value, int) and not isinstance(value, bool) and value >= least

    for key in _SIZES:
        if key in spec and not count(spec[key], 0):
            return f"{key} should be a whole number, got {spec[key]!r}"
    for key, least in _PAIRS.items():
        value = spec.get(key, least)
        pair = value if isinstance(value, list) else [value]
        if len(pair) not in (1, 2) or not all(count(v, least) for v in pair):
            return f"{key} should be one or two whole numbers >= {least}, got {value!r}"
    if not isinstance(spec.get("bias", True), bool):
        return f"bias should be true or false, got {spec['bias']!r}"
    return None


def check_keys(path, keys: set, expected: dict) -> None:
    missing = sorted(set(expected) - keys)
    if missing:
        _fail(path, f"{len(missing)} tensor(s) are missing, e.g. {missing[0]!r}")
    extra = sorted(k for k in keys - set(expected) if not (k.startswith("time.") or k == "time_keys"))
    if extra:
        _fail(path, f"{len(extra)} unexpected tensor(s), e.g. {extra[0]!r}")


def check_tensor(path, key: str, tensor: torch.Tensor, expected: dict) -> None:
    shape, dtype = expected[key]
    if tuple(tensor.shape) != shape or tensor.dtype != dtype:
        _fail(path, f"tensor {key!r} is {tensor.dtype} {tuple(tensor.shape)}, its layer spec needs {dtype} {shape}")


def check_layer_values(path, name: str, tensors: dict, groups: int) -> None:
    """Scales finite and positive, bias finite, int4 group scales in [1, 16], one activation scale per group."""
    for key in ("weight_scale", "act_scale"):
        t = tensors[key]
        if not (torch.isfinite(t).all() and (t > 0).all()):
            _fail(path, f"layer {name}: {key} holds NaN, Inf, zero or negative values")
    if tensors["act_scale"].numel() not in (0, groups):
        _fail(path, f"layer {name}: {tensors['act_scale'].numel()} activation scales for {groups} timestep groups")
    if "bias" in tensors and not torch.isfinite(tensors["bias"]).all():
        _fail(path, f"layer {name}: bias holds NaN or Inf")
    if "weight_group_scale" in tensors:
        g = tensors["weight_group_scale"]
        if g.numel() and not ((g >= 1) & (g <= 16)).all():
            _fail(path, f"layer {name}: int4 group scales outside [1, 16]")


def check_time_tables(path, time_keys, tables: dict) -> None:
    if time_keys is None:
        if tables:
            _fail(path, "time tables without 'time_keys'")
        return
    if time_keys.dim() != 1 or time_keys.dtype != torch.float32 or not torch.isfinite(time_keys).all():
        _fail(path, "'time_keys' should be a finite float32 vector")
    for name, table in tables.items():
        if table.dim() != 2 or table.shape[0] != time_keys.numel() or table.dtype != torch.float32:
            _fail(path, f"time table {name!r} has shape {tuple(table.shape)}; it needs ({time_keys.numel()}, D) float32")
        if not torch.isfinite(table).all():
            _fail(path, f"time table {name!r} holds NaN or Inf")


def check_against_model(path, calibration, adapter, unet) -> None:
    """Every stored layer exists in the model with the stored shape; every time table's module exists."""
    modules = adapter.quantizable_layers(unet)
    for name, layer_state in calibration.layers.items():
        module = modules.get(name)
        if module is None:
            _fail(path, f"layer {name} is not a quantizable layer of the model given")
        layer = layer_from_spec(layer_state.spec, device="meta")
        stored, found = _geometry(layer), _geometry(module)
        if stored != found:
            _fail(path, f"layer {name} is {stored} in the file but {found} in the model")
    names = dict(unet.named_modules())
    for name in calibration.time_tables:
        if name not in names:
            _fail(path, f"time table {name!r} names no module of the model given")


def _geometry(module) -> dict:
    """Weight shape and, for convs, how they slide: what a stored layer must share with the model's."""
    shape = getattr(module, "weight_shape", None) or tuple(module.weight.shape)
    geometry = {"weight shape": tuple(shape)}
    for key in ("stride", "padding", "dilation"):
        if hasattr(module, key):
            geometry[key] = tuple(getattr(module, key))
    return geometry
