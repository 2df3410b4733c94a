"""One safetensors file per quantized model: quantized tensors, scale and time tables, JSON metadata.

Only safetensors is read or written (never pickle). Saving is atomic and durable: a temporary file in
the same folder, flushed to disk, then renamed, so a crash, an interrupt or a full disk never leaves a
partial file under the final name. Loading checks format, version, the integrity digest
(``integrity.py``), the structure (``artifact_checks.py``) and, given a model, its fingerprint; every
problem is one ``QuantFileError`` that says what is wrong.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import warnings

from safetensors import safe_open
from safetensors.torch import save_file

from . import artifact_checks as checks
from .artifact_checks import QuantFileError
from .calibration import Calibration, LayerState
from .integrity import DIGEST_KEY, Digest, digest_of

FORMAT_NAME = "fidelityquant"
FORMAT_VERSION = 1  # the digest is an extra metadata entry: format-1 readers ignore it, so no bump

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "DiskFullError", "QuantFileError", "MissingDigestWarning",
           "check_output_path", "describe", "load_result", "read_metadata", "save_result"]


class DiskFullError(OSError):
    """Not enough disk space to write the file; nothing was written under the final name."""


class MissingDigestWarning(UserWarning):
    """A file without an integrity digest (saved before digests existed) was loaded unchecked."""


def check_output_path(path, overwrite: bool = False) -> str:
    """Refuse, before any work, an output path that cannot be written; -> the path as a string."""
    path = os.fspath(path)
    if not path or os.path.basename(path) in ("", ".", ".."):
        raise ValueError(f"output path {path!r} names no file; give a file name such as model-w8a8.safetensors")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a folder; give a file name inside it, e.g. {os.path.join(path, 'model.safetensors')}")
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another name or pass overwrite=True (CLI: --overwrite)")
    directory = _existing_parent(os.path.dirname(os.path.abspath(path)))
    if not os.path.isdir(directory):
        raise NotADirectoryError(f"cannot create the folder for {path}: {directory} is a file")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write into {directory} (permission denied); choose another output folder")
    return path


def _existing_parent(directory: str) -> str:
    while not os.path.exists(directory):
        directory = os.path.dirname(directory)
    return directory


def _fsync_dir(directory: str) -> None:
    """Make a rename durable. Some platforms (Windows) cannot open a folder; the rename is still atomic."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _is_disk_full(exc: BaseException) -> bool:
    text = str(exc)
    return getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text or "StorageFull" in text


def _tensors_and_metadata(calibration: Calibration) -> tuple[dict, dict]:
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
    metadata[DIGEST_KEY] = digest_of(metadata, tensors)
    return tensors, metadata


def save_result(calibration: Calibration, path: str, overwrite: bool = False) -> str:
    """Write ``calibration`` to ``path`` atomically and durably; never replaces a file unless asked.

    A calibration is never changed by weight patches (they act on a runtime's layers), so what is
    written is always the calibrated model, even while a LoRA is merged for sampling. On any failure
    (including KeyboardInterrupt) no file exists under ``path`` and the temporary file is removed.
    """
    path = check_output_path(path, overwrite)
    tensors, metadata = _tensors_and_metadata(calibration)
    directory = os.path.dirname(os.path.abspath(path))
    needed = sum(t.numel() * t.element_size() for t in tensors.values()) + sum(map(len, metadata.values()))
    os.makedirs(directory, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise DiskFullError(errno.ENOSPC, f"disk full: {path} needs about {needed / 2**20:.1f} MiB but "
                                          f"{free / 2**20:.1f} MiB are free; free some space or save elsewhere")
    # Hidden, and not ending in .safetensors, so that no model list ever shows a half-written file.
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        try:
            save_file(tensors, tmp, metadata=metadata)
            os.chmod(tmp, 0o644)  # mkstemp makes it private; a saved model is an ordinary file
            with open(tmp, "rb+") as written:
                os.fsync(written.fileno())
        except Exception as exc:
            if _is_disk_full(exc):
                raise DiskFullError(errno.ENOSPC, f"disk full while writing {path}; nothing was saved. "
                                                  "Free some space or save elsewhere") from exc
            raise
        _publish(tmp, path, overwrite)
        _fsync_dir(directory)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _publish(tmp: str, path: str, overwrite: bool) -> None:
    """Rename into place. Without ``overwrite``, a hard link refuses an existing name atomically (no
    window in which a concurrent save could be replaced); where links are unsupported, a checked rename."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(f"{path} already exists; choose another name or pass overwrite=True") from None
    except OSError:
        if os.path.lexists(path):
            raise FileExistsError(f"{path} already exists; choose another name or pass overwrite=True") from None
        os.replace(tmp, path)


def _open(path: str):
    try:
        return safe_open(path, framework="pt")
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise QuantFileError(f"{path} is not a readable safetensors file (corrupt or truncated?): {exc}. "
                             "Re-save it from the Calibrate & Quantize result, or calibrate again.") from exc


def read_metadata(path: str) -> dict:
    """Header of a FidelityQuant file, validated; raises QuantFileError with what is wrong."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no FidelityQuant file at {path}")
    with _open(path) as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != FORMAT_NAME:
        raise QuantFileError(f"{path} is a safetensors file but not a FidelityQuant result "
                             "(no 'fidelityquant' format tag); it may be a plain checkpoint.")
    version = metadata.get("format_version", "0")
    if not version.isdigit() or len(version) > 6:
        raise QuantFileError(f"{path}: format_version {version[:20]!r} is not a number; the file is damaged.")
    if int(version) > FORMAT_VERSION:
        raise QuantFileError(f"{path} was written by a newer FidelityQuant (format {version}); "
                             f"this version reads format {FORMAT_VERSION}. Update FidelityQuant.")
    return metadata


def load_result(path: str, unet=None, device=None) -> Calibration:
    """Read a calibration; if ``unet`` is given, refuse a file made for another model.

    A file without a digest (written before digests) loads with a MissingDigestWarning: its data are
    checked for structure and finite scales only.
    """
    path = os.fspath(path)
    metadata = read_metadata(path)
    digest, tensors = Digest(metadata), {}
    with _open(path) as f:
        for key in sorted(f.keys()):  # each tensor's size is bounded by the file's, which safetensors checked
            tensors[key] = f.get_tensor(key)
    digest.add_all(tensors)
    # Damage first (the likeliest cause of anything below), then structure, for files without a digest
    # or with a recomputed one.
    if DIGEST_KEY not in metadata:
        warnings.warn(f"{path} has no integrity digest (saved by FidelityQuant 0.1.0 or earlier): its data were "
                      "not checked for damage. Re-save it to add one.", MissingDigestWarning, stacklevel=2)
    elif digest.hexdigest() != metadata[DIGEST_KEY]:
        raise QuantFileError(f"{path} is damaged: its contents do not match the integrity digest saved with it "
                             "(changed after saving: an incomplete copy or download, or a disk error). Copy it "
                             "again from the original, or calibrate again.")
    parsed = checks.parse_metadata(path, metadata)
    meta_layers, expected = checks.expected_tensors(path, parsed["layers"])
    checks.check_keys(path, set(tensors), expected)
    for key in expected:
        checks.check_tensor(path, key, tensors[key], expected)
    groups = len(parsed["groups"])
    layers = {}
    for name, layer in meta_layers.items():
        own = {k: tensors[f"layer.{name}.{k}"] for k in layer.state_dict()}
        checks.check_layer_values(path, name, own, groups)
        layers[name] = LayerState(layer.spec(), {k: t.to(device) if device else t for k, t in own.items()})
    time_keys = tensors.get("time_keys")
    time_tables = {k[len("time."):]: t for k, t in tensors.items() if k.startswith("time.")}
    checks.check_time_tables(path, time_keys, time_tables)
    if device:
        time_keys = None if time_keys is None else time_keys.to(device)
        time_tables = {k: t.to(device) for k, t in time_tables.items()}
    calibration = Calibration(
        layout=metadata["family"], sd_version=metadata["variant"], config=parsed["config"],
        base_fingerprint=parsed["fingerprint"], layers=layers, step_groups=parsed["groups"],
        time_keys=time_keys, time_tables=time_tables, plan=parsed["plan"], report=parsed["report"])
    if unet is not None:
        adapter = calibration.check_compatible(unet)
        checks.check_against_model(path, calibration, adapter, unet)
    return calibration


def describe(calibration: Calibration) -> str:
    """The report text of a loaded file. The report is information, not model data: a file whose report
    entry cannot be formatted (hand-made, or from another tool) still loads, and this says so."""
    try:
        return calibration.summary()
    except Exception as exc:
        return (f"FidelityQuant: {calibration.sd_version} {calibration.layout} UNet, {len(calibration.layers)} "
                f"quantized layers (the file's report could not be shown: {type(exc).__name__}: {exc})")
