"""Fuzz test of the loader: seeded mutations of a valid saved file (issue 15 item 3).

Every case must end in one clear error of ours (QuantFileError, or IncompatibleModelError for a file
that is well formed but made for another model) or in a correct load; never another exception, a hang
or an allocation far beyond the file's size.

Three families:
- raw bytes: header length, bytes of the header JSON or of the tensor data, truncation, appended bytes.
  The stored digest is kept, so a load that succeeds must give exactly the original model.
- header edits with the digest left stale: offsets, dtypes, shapes, metadata values. Refused as damaged
  unless the edit left the hashed content unchanged (then, again, exactly the original model).
- the same edits and tensor-value edits (NaN / zero / negative scales, out-of-range group scales,
  missing or extra tensors) with the digest recomputed or removed: a crafted or pre-digest file. These
  exercise the structural checks; a load that succeeds must run and give finite outputs.
"""
import json
import random
import resource
import struct
import time
import warnings

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from quant_core import artifact
from quant_core.calibration import IncompatibleModelError
from quant_core.integrity import DIGEST_KEY, digest_of
from unets import tiny_unet

DATA = Path(__file__).parent / "data"

CASES = 360
OURS = (artifact.QuantFileError, IncompatibleModelError)
DTYPES = ["F32", "F16", "BF16", "I8", "U8", "I32", "I64", "BOOL", "F64", "XX", ""]
HUGE = [0, -1, 1, 2**31, 2**40, 10**12]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The tiny W4A8 file of tests/data (int4 weights and group scales, 2 timestep groups, time tables),
    re-saved by this version so that it carries a digest; no calibration needed."""
    unet = tiny_unet("sd1", seed=0)
    with pytest.warns(artifact.MissingDigestWarning):
        calibration = artifact.load_result(DATA / "fq_v010_tiny_sd1_w4a8.safetensors", unet)
    folder = tmp_path_factory.mktemp("fuzz")
    path = artifact.save_result(calibration, folder / "base.safetensors")
    gen = torch.Generator().manual_seed(7)
    x, ctx = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 7, 64, generator=gen)
    with torch.no_grad():
        expected = calibration.apply(unet)(x, torch.tensor(333.0), encoder_hidden_states=ctx).sample
    return dict(unet=unet, data=open(path, "rb").read(), folder=folder, x=x, ctx=ctx, expected=expected)


def split(data: bytes):
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def resign(data: bytes, folder, drop: bool = False) -> bytes:
    """Recompute the digest over what the (edited) file now holds, or remove it: a crafted file."""
    header, body = split(data)
    meta = header.get("__metadata__", {})
    meta.pop(DIGEST_KEY, None)
    if not drop:
        probe = folder / "probe.safetensors"
        probe.write_bytes(join(header, body))
        try:
            with safe_open(str(probe), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception:
            return join(header, body)  # not even safetensors can read it; the loader must refuse it too
        meta[DIGEST_KEY] = digest_of(meta, tensors)
    header["__metadata__"] = meta
    return join(header, body)


def tensor_names(header):
    return sorted(k for k in header if k != "__metadata__")


def edit_header(rng, data):
    """One edit of the header: offsets, dtype, shape or a metadata value."""
    header, body = split(data)
    meta = header["__metadata__"]
    name = rng.choice(tensor_names(header))
    kind = rng.choice(["offsets", "dtype", "shape", "meta", "meta_json", "spec"])
    if kind == "offsets":
        start, end = header[name]["data_offsets"]
        other = header[rng.choice(tensor_names(header))]["data_offsets"]
        header[name]["data_offsets"] = rng.choice([[start, end + 1], [start + 1, end], [end, start], other,
                                                   [start, len(body) + 8], [0, 2**62], [start, rng.choice(HUGE)]])
    elif kind == "dtype":
        header[name]["dtype"] = rng.choice(DTYPES)
    elif kind == "shape":
        shape = list(header[name]["shape"])
        header[name]["shape"] = rng.choice([shape[::-1], shape + [1], shape[:-1], [rng.choice(HUGE)] + shape[1:],
                                            [s * 2 for s in shape], [-1] * len(shape), []])
    elif kind == "meta":
        key = rng.choice(sorted(meta))
        meta[key] = rng.choice(["", "null", "{}", "[]", "1e400", "NaN", "abc", meta[key][: len(meta[key]) // 2],
                                "sd3", "99", "-1", "[[]]", '{"a": 1}', "\u00e9\u0000", "[" * 5000])
    elif kind == "meta_json":
        key = rng.choice(["config", "groups", "plan", "report", "fingerprint"])
        value = json.loads(meta[key])
        meta[key] = json.dumps(_poke(rng, value))
    else:
        specs = json.loads(meta["layers"])
        layer = rng.choice(sorted(specs))
        field = rng.choice(sorted(specs[layer]))
        specs[layer][field] = rng.choice(HUGE + [3, "x", None, [1, 2, 3], 2.5, True, "linear", "conv"])
        if rng.random() < 0.2:
            specs.pop(layer)
        meta["layers"] = json.dumps(specs)
    return join(header, body), kind


def _poke(rng, value):
    """Replace, delete or retype one entry somewhere inside a JSON value."""
    if isinstance(value, dict) and value:
        key = rng.choice(sorted(value))
        if rng.random() < 0.3:
            return {k: v for k, v in value.items() if k != key}
        return {**value, key: _poke(rng, value[key])}
    if isinstance(value, list) and value:
        i = rng.randrange(len(value))
        if rng.random() < 0.3:
            return value[:i] + value[i + 1:]
        return value[:i] + [_poke(rng, value[i])] + value[i + 1:]
    return rng.choice([None, "x", -1, 0, 3, 1e308, float("nan"), [], {}, True, 2**40])


def edit_values(rng, data, folder):
    """One crafted tensor edit, written back with safetensors and the metadata kept."""
    path = folder / "values.safetensors"
    path.write_bytes(data)
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    name = rng.choice(sorted(tensors))
    kind = rng.choice(["scale", "group_scale", "table", "drop", "extra", "retype"])
    scales = sorted(k for k in tensors if k.endswith(("weight_scale", "act_scale", "bias")))
    if kind == "scale":
        name = rng.choice(scales)
        tensors[name] = tensors[name].clone()
        tensors[name][rng.randrange(tensors[name].numel())] = rng.choice([float("nan"), float("inf"), 0.0, -1.0])
    elif kind == "group_scale":
        name = rng.choice(sorted(k for k in tensors if k.endswith("weight_group_scale")))
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[rng.randrange(tensors[name].numel())] = rng.choice([0, 17, 255])
    elif kind == "table":
        name = rng.choice(sorted(k for k in tensors if k.startswith("time")))
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[0] = rng.choice([float("nan"), float("inf")])
    elif kind == "drop":
        tensors.pop(name)
    elif kind == "extra":
        tensors[rng.choice(["layer.nowhere.weight", "extra", name + "_copy"])] = torch.zeros(3)
    else:
        tensors[name] = tensors[name].to(rng.choice([torch.float16, torch.int32, torch.float64]))
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=meta)
    return path.read_bytes(), kind


def mutate(case: int, data: bytes, folder):
    """-> (mutated bytes, family, description). Seeded by the case number."""
    rng = random.Random(case)
    family = ["raw", "stale", "signed", "unsigned"][case % 4]
    if family == "raw":
        header_len = struct.unpack("<Q", data[:8])[0]
        kind = rng.choice(["length", "header_byte", "data_byte", "truncate", "append", "empty"])
        if kind == "length":
            value = rng.choice([0, 1, header_len - 1, header_len + 1, len(data), 2**63, rng.randrange(2**32)])
            return struct.pack("<Q", value) + data[8:], family, f"{kind}={value}"
        if kind in ("header_byte", "data_byte"):
            lo, hi = (8, 8 + header_len) if kind == "header_byte" else (8 + header_len, len(data))
            at = rng.randrange(lo, hi)
            return data[:at] + bytes([data[at] ^ (1 << rng.randrange(8))]) + data[at + 1:], family, f"{kind}@{at}"
        if kind == "truncate":
            at = rng.randrange(len(data))
            return data[:at], family, f"{kind}@{at}"
        if kind == "append":
            return data + bytes(rng.randrange(1, 64)), family, kind
        return b"", family, kind
    if family != "stale" and rng.random() < 0.5:
        mutated, kind = edit_values(rng, data, folder)
    else:
        mutated, kind = edit_header(rng, data)
    if family != "stale":
        mutated = resign(mutated, folder, drop=family == "unsigned")
    return mutated, family, kind


@pytest.mark.parametrize("case", range(CASES))
def test_a_mutated_file_is_refused_clearly_or_loads_correctly(base, case):
    data, *description = mutate(case, base["data"], base["folder"])
    path = base["folder"] / f"case{case}.safetensors"
    path.write_bytes(data)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", artifact.MissingDigestWarning)
            calibration = artifact.load_result(path, base["unet"])
    except OURS as exc:
        message = str(exc)
        assert str(path) in message or "checkpoint" in message or "UNet" in message, (description, message)
        assert len(message) > 40, (description, message)
        calibration = None
    except Exception as exc:  # anything else is a crash of the loader
        pytest.fail(f"{description}: {type(exc).__name__}: {exc}")
    finally:
        path.unlink()
    assert time.perf_counter() - start < 10, description
    # ru_maxrss is in KiB on Linux: a case may not raise the process's peak by more than 64 MiB (the file is ~0.5 MB).
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 64 * 1024, description
    if calibration is None:
        return
    assert artifact.describe(calibration).startswith("FidelityQuant"), description  # what the Load node shows
    with torch.no_grad():
        out = calibration.apply(base["unet"])(base["x"], torch.tensor(333.0), encoder_hidden_states=base["ctx"]).sample
    assert torch.isfinite(out).all(), description
    if description[0] in ("raw", "stale"):  # the digest held: it must be the original model, bit for bit
        assert torch.equal(out, base["expected"]), description


def test_the_cases_cover_every_family_and_end_both_ways(base):
    """The fuzz is not vacuous: most cases are refused, some load, and every family is represented."""
    outcomes = {}
    for case in range(0, CASES, 5):
        data, family, kind = mutate(case, base["data"], base["folder"])
        path = base["folder"] / "cover.safetensors"
        path.write_bytes(data)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", artifact.MissingDigestWarning)
                artifact.load_result(path, base["unet"])
            outcomes.setdefault(family, []).append("loaded")
        except OURS:
            outcomes.setdefault(family, []).append("refused")
    assert set(outcomes) == {"raw", "stale", "signed", "unsigned"}
    everything = sum(outcomes.values(), [])
    assert everything.count("refused") > len(everything) // 2 and "loaded" in everything, outcomes
