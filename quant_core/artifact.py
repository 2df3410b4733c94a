"""One safetensors file per quantized model: quantized tensors, scale and time tables, JSON metadata.

Only safetensors is read or written (never pickle). Loading checks format, version, family and the
base model's fingerprint, and turns a corrupt or truncated file into a clear error.
"""
from __future__ import annotations

import json
import os
import tempfile

from safetensors import safe_open
from safetensors.torch import save_file

from .calibration import Calibration, LayerState
from .config import QuantConfig
from .runtime.layers import layer_from_spec

FORMAT_NAME = "fidelityquant"
FORMAT_VERSION = 1


class QuantFileError(ValueError):
    """A file that is not a readable FidelityQuant result."""


def save_result(calibration: Calibration, path: str, overwrite: bool = False) -> str:
    """Write ``calibration`` to ``path`` atomically; refuses to replace an existing file unless asked.

    A calibration is never changed by weight patches (they act on a runtime's layers), so what is
    written is always the calibrated model, even while a LoRA is merged for sampling.
    """
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another name or pass overwrite=True")
    tensors, specs = {}, {}
    for name, state in calibration.layers.items():
        specs[name] = state.spec
        for key, tensor in state.tensors.items():
            tensors[f"layer.{name}.{key}"] = tensor.detach().contiguous().cpu()
    for name, table in calibration.time_tables.items():
        tensors[f"time.{name}"] = table.detach().float().contiguous().cpu()
    if calibration.time_keys is not None:
        tensors["time_keys"] = calibration.time_keys.detach().float().contiguous().cpu()
    # Metadata keys keep their first names ("family" is the layout, "variant" the SD version, "groups"
    # the timestep groups), so files written by earlier versions load unchanged.
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "family": calibration.layout,
        "variant": calibration.sd_version,
        "fingerprint": json.dumps(calibration.base_fingerprint),
        "config": json.dumps(calibration.config.to_dict()),
        "layers": json.dumps(specs),
        "groups": json.dumps(calibration.step_groups),
        "plan": json.dumps(calibration.plan),
        "report": json.dumps(calibration.report, default=float),
    }
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".safetensors.tmp", dir=directory)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def read_metadata(path: str) -> dict:
    """Header of a FidelityQuant file, validated; raises QuantFileError with what is wrong."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no FidelityQuant file at {path}")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise QuantFileError(f"{path} is not a readable safetensors file (corrupt or truncated?): {exc}. "
                             "Re-save it from the Calibrate & Quantize result, or calibrate again.") from exc
    if metadata.get("format") != FORMAT_NAME:
        raise QuantFileError(f"{path} is a safetensors file but not a FidelityQuant result "
                             "(no 'fidelityquant' format tag); it may be a plain checkpoint.")
    version = int(metadata.get("format_version", "0"))
    if version > FORMAT_VERSION:
        raise QuantFileError(f"{path} was written by a newer FidelityQuant (format {version}); "
                             f"this version reads format {FORMAT_VERSION}. Update FidelityQuant.")
    return metadata


def load_result(path: str, unet=None, device=None) -> Calibration:
    """Read a calibration; if ``unet`` is given, refuse a file made for another model."""
    metadata = read_metadata(path)
    try:
        specs = json.loads(metadata["layers"])
        layers, time_tables, time_keys = {}, {}, None
        with safe_open(os.fspath(path), framework="pt", device=str(device or "cpu")) as f:
            keys = set(f.keys())
            for name, spec in specs.items():
                layer = layer_from_spec(spec, device=device)
                layer.load_state_dict({k: f.get_tensor(f"layer.{name}.{k}") for k in layer.state_dict()})
                layers[name] = LayerState.of(layer)
            for key in keys:
                if key.startswith("time."):
                    time_tables[key[len("time."):]] = f.get_tensor(key)
            if "time_keys" in keys:
                time_keys = f.get_tensor("time_keys")
        calibration = Calibration(
            layout=metadata["family"], sd_version=metadata["variant"],
            config=QuantConfig.from_dict(json.loads(metadata["config"])),
            base_fingerprint=json.loads(metadata["fingerprint"]), layers=layers,
            step_groups=json.loads(metadata["groups"]), time_keys=time_keys, time_tables=time_tables,
            plan=json.loads(metadata["plan"]), report=json.loads(metadata["report"]))
    except QuantFileError:
        raise
    except Exception as exc:
        raise QuantFileError(f"{path} could not be read as a FidelityQuant result ({type(exc).__name__}: {exc}); "
                             "the file is damaged or incomplete. Re-save it or calibrate again.") from exc
    if unet is not None:
        calibration.check_compatible(unet)
    return calibration
