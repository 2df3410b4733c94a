"""Bad inputs, as a new user (or an API client of a shared server) would give them (issue 15 item 1).

Each kind gets one clear message that names the problem (never a raw OSError / KeyError / RuntimeError
from a library underneath), and the user's model stays bit-identical. The table ``KINDS`` covers the
library API and the node functions (the ComfyUI-free parts of nodes/: names, paths, input ranges, the
Save node with a stand-in ``folder_paths``); the CLI cases follow it. What needs a running ComfyUI
(the Load node on a real MODEL) is in tests/test_comfyui_nodes.py and skips there without COMFYUI_PATH.
"""
import json
import re
import struct
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from nodes import fidelity_nodes, inputs
from quant_core import artifact, preset, quantize
from quant_core.__main__ import main
from quant_core.calibration import IncompatibleModelError
from quant_core.integrity import DIGEST_KEY
from quant_core.models.modeltree import weights_digest
from quant_core.runtime import kernels
from quant_core.runtime.layers import QuantLinear
from quant_core.validate import InputError, check_sampling, clean_prompts
from unets import LoopRunner, tiny_unet

DATA = Path(__file__).parent / "data"
GOOD_CALIBRATE = dict(prompts="a red house\na boat", negative="", steps=3, cfg=5.0, width=64, height=64, seed=0,
                      preset="W8A8", timestep_groups=2, bits_budget=4.5, memory_limit_mb=64)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The tiny SD1 UNet, its W4A8 calibration (tests/data, re-saved with a digest) and a folder of files."""
    unet = tiny_unet("sd1", seed=0)
    with pytest.warns(artifact.MissingDigestWarning):
        calibration = artifact.load_result(DATA / "fq_v010_tiny_sd1_w4a8.safetensors", unet)
    folder = tmp_path_factory.mktemp("bad")
    good = artifact.save_result(calibration, folder / "good.safetensors")
    return types.SimpleNamespace(unet=unet, calibration=calibration, folder=folder, good=good,
                                 data=Path(good).read_bytes(), digest=weights_digest(unet))


def _file(env, name, data: bytes) -> Path:
    path = env.folder / name
    path.write_bytes(data)
    return path


def _header(data: bytes):
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _crafted(env, name, edit_meta=None, edit_tensors=None, digest=True) -> Path:
    """A well-formed file whose content was changed (a crafted file, or one from a buggy tool)."""
    from quant_core.integrity import digest_of
    from safetensors import safe_open

    with safe_open(env.good, framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    meta.pop(DIGEST_KEY)
    if digest:
        meta[DIGEST_KEY] = digest_of(meta, tensors)
    save_file(tensors, str(env.folder / name), metadata=meta)
    return env.folder / name


def _flip_data_byte(env):
    n = struct.unpack("<Q", env.data[:8])[0]
    at = 8 + n + 100
    return env.data[:at] + bytes([env.data[at] ^ 0x10]) + env.data[at + 1:]


def _nan_weight(unet_seed=5, value=float("nan")):
    unet = tiny_unet("sd1", seed=unet_seed)
    with torch.no_grad():
        unet.down_blocks[0].attentions[0].proj_in.weight[0, 0] = value
    return unet


def _set(mapping, key, value):
    mapping[key] = value


def _load(env, path, unet=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", artifact.MissingDigestWarning)
        return artifact.load_result(path, env.unet if unet is None else unet)


# kind -> (call with env, exception type, message pattern). The matrix in the issue note is this table.
KINDS = {
    # saved files
    "file: truncated": (lambda e: _load(e, _file(e, "t.safetensors", e.data[: len(e.data) // 2])),
                        artifact.QuantFileError, "not a readable safetensors file"),
    "file: bytes flipped in the tensor data": (lambda e: _load(e, _file(e, "f.safetensors", _flip_data_byte(e))),
                                               artifact.QuantFileError, "is damaged.*integrity digest"),
    "file: empty": (lambda e: _load(e, _file(e, "e.safetensors", b"")), artifact.QuantFileError,
                    "not a readable safetensors file"),
    "file: not safetensors": (lambda e: _load(e, _file(e, "n.safetensors", b"PK\x03\x04 a zip, not a model")),
                              artifact.QuantFileError, "not a readable safetensors file"),
    "file: a plain checkpoint": (lambda e: save_file({"w": torch.zeros(2)}, str(e.folder / "p.safetensors"))
                                 or _load(e, e.folder / "p.safetensors"), artifact.QuantFileError,
                                 "not a FidelityQuant result"),
    "file: missing": (lambda e: _load(e, e.folder / "nowhere.safetensors"), FileNotFoundError,
                      "no FidelityQuant file at"),
    "file: made for another checkpoint": (lambda e: _load(e, e.good, tiny_unet("sd1", seed=1)),
                                          IncompatibleModelError, "calibrated on a different checkpoint"),
    "file: made for another SD version": (lambda e: _load(e, e.good, tiny_unet("sd2", seed=0)),
                                          IncompatibleModelError, "for a sd1 diffusers UNet.*sd2"),
    "file: an SD version this release does not know": (
        lambda e: _load(e, _crafted(e, "v.safetensors", lambda m: _set(m, "variant", "sd3"))),
        artifact.QuantFileError, "made for a 'sd3' UNet"),
    "file: newer format version": (
        lambda e: _load(e, _crafted(e, "nv.safetensors", lambda m: _set(m, "format_version", "2"))),
        artifact.QuantFileError, "newer FidelityQuant.*Update"),
    "file: malformed metadata JSON": (
        lambda e: _load(e, _crafted(e, "j.safetensors", lambda m: _set(m, "layers", "{not json"), digest=False)),
        artifact.QuantFileError, "'layers' is not valid JSON"),
    "file: tensor of the wrong shape": (
        lambda e: _load(e, _crafted(e, "s.safetensors", edit_tensors=lambda t: _set(
            t, "layer.mid_block.resnets.0.conv1.weight_scale", torch.ones(7)))),
        artifact.QuantFileError, "weight_scale' is torch.float32 \\(7,\\).*needs"),
    "file: tensor of the wrong dtype": (
        lambda e: _load(e, _crafted(e, "d.safetensors", edit_tensors=lambda t: _set(
            t, "layer.mid_block.resnets.0.conv1.weight", t["layer.mid_block.resnets.0.conv1.weight"].to(torch.int16)))),
        artifact.QuantFileError, "is torch.int16.*needs torch.uint8"),
    "file: missing tensor": (
        lambda e: _load(e, _crafted(e, "m.safetensors", edit_tensors=lambda t: t.pop(
            "layer.mid_block.resnets.0.conv1.act_scale"))), artifact.QuantFileError, "tensor\\(s\\) are missing"),
    "file: extra tensor": (
        lambda e: _load(e, _crafted(e, "x.safetensors", edit_tensors=lambda t: _set(t, "stowaway", torch.zeros(1)))),
        artifact.QuantFileError, "unexpected tensor.*stowaway"),
    "file: a NaN scale": (
        lambda e: _load(e, _crafted(e, "nan.safetensors", edit_tensors=lambda t: t[
            "layer.mid_block.resnets.0.conv1.weight_scale"].__setitem__(0, float("nan")))),
        artifact.QuantFileError, "weight_scale holds NaN, Inf, zero or negative"),
    # models the engine cannot quantize
    "model: a DiT (not a UNet)": (
        lambda e: quantize(nn.ModuleDict({"double_blocks": nn.ModuleList([nn.Linear(8, 8)])}), None, "W8A8"),
        ValueError, "Flux|DiT|not a Stable Diffusion"),
    "model: no eligible layers": (lambda e: quantize(nn.Sequential(nn.ReLU()), None, "W8A8"), ValueError,
                                  "Stable Diffusion|UNet"),
    "model: mixed dtypes": (lambda e: quantize(_half_block(), None, "W8A8"), InputError,
                            "mixes weight dtypes: float32.*float16.*unet.float"),
    "model: a NaN weight": (lambda e: quantize(_nan_weight(), None, "naive-W8A8"), InputError,
                            "layer down_blocks.0.attentions.0.proj_in holds 1 NaN/Inf.*float model itself is broken"),
    "model: an Inf weight": (lambda e: quantize(_nan_weight(value=float("inf")), None, "W8A8"), InputError,
                             "proj_in holds 1 NaN/Inf"),
    # calibration settings
    "settings: memory limit 0": (lambda e: quantize(e.unet, None, preset("W8A8", memory_limit_mb=0)), InputError,
                                 "memory limit 0 MB: give a positive number"),
    "settings: memory limit negative": (lambda e: quantize(e.unet, None, preset("W8A8", memory_limit_mb=-5)),
                                        InputError, "memory limit -5 MB"),
    "settings: bits budget below the preset's": (lambda e: preset("W4A8-mixed", bits_budget=3.0), ValueError,
                                                 "bits_budget 3.0 must lie in \\(4, 16\\]"),
    "settings: unknown preset": (lambda e: preset("W2A2"), ValueError, "unknown preset 'W2A2'; choose one of"),
    "settings: zero timestep groups": (lambda e: preset("W8A8", timestep_groups=0), ValueError,
                                       "timestep_groups must be at least 1"),
    "settings: steps 0": (lambda e: check_sampling(0), InputError, "steps 0: give a whole number of sampling steps"),
    "settings: size not divisible by 8": (lambda e: check_sampling(20, 500, 512), InputError,
                                          "width 500 is not a multiple of 8.*496 or 504"),
    "settings: absurd size": (lambda e: check_sampling(20, 512, 100000), InputError, "height 100000 is outside"),
    "settings: zero prompts": (lambda e: clean_prompts([]), InputError, "no calibration prompts"),
    "settings: only blank prompts": (lambda e: clean_prompts(["", "   ", "\t"]), InputError, "no calibration prompts"),
    # saving
    "save: the path is a folder": (lambda e: artifact.save_result(e.calibration, e.folder), IsADirectoryError,
                                   "is a folder; give a file name inside it"),
    "save: the file exists": (lambda e: artifact.save_result(e.calibration, e.good), FileExistsError,
                              "already exists; choose another name"),
    "save: a parent is a file": (lambda e: artifact.save_result(e.calibration, Path(e.good) / "x.safetensors"),
                                 NotADirectoryError, "is a file"),
    # Save node file names (ComfyUI's convention: numbered copies, never an overwrite)
    "name: newline (a pasted prompt)": (lambda e: inputs.save_stem("my model\nsecond line"), ValueError,
                                        "line break"),
    "name: tab": (lambda e: inputs.save_stem("a\tb"), ValueError, "control character"),
    "name: ../ traversal": (lambda e: inputs.save_stem("../../evil"), ValueError, "plain file name without folders"),
    "name: absolute path": (lambda e: inputs.save_stem("/etc/cron.d/x"), ValueError, "without folders"),
    "name: 300 characters": (lambda e: inputs.save_stem("a" * 300), ValueError, "300 bytes long; at most 200"),
    "name: reserved characters": (lambda e: inputs.save_stem('what?*"'), ValueError, '" \\* \\?.*reserve'),
    "name: empty": (lambda e: inputs.save_stem("   "), ValueError, "file name is empty"),
    "name: a device name": (lambda e: inputs.save_stem("CON"), ValueError, "reserves for a device"),
    "name: hidden": (lambda e: inputs.save_stem(".x"), ValueError, "may not start with a dot"),
    # Load node files
    "load: ../ traversal": (lambda e: inputs.resolve_load([str(e.folder)], "../../etc/passwd.safetensors"),
                            ValueError, "inside models/fidelity_quant.*'\\.\\.'"),
    "load: absolute path": (lambda e: inputs.resolve_load([str(e.folder)], str(e.good)), ValueError,
                            "no absolute paths"),
    "load: not a .safetensors name": (lambda e: inputs.resolve_load([str(e.folder)], "model.ckpt"), ValueError,
                                      "only safetensors files are read"),
    "load: a link out of the folder": (lambda e: inputs.resolve_load([str(e.folder / "models")], "out.safetensors"),
                                       ValueError, "link to a file outside"),
    "load: a file not there": (lambda e: inputs.resolve_load([str(e.folder)], "gone.safetensors"), ValueError,
                               "not found in models/fidelity_quant"),
    # Calibrate node inputs as an API client may send them
    "node: steps 0": (lambda e: _calibrate_inputs(steps=0), ValueError, "FidelityQuant: steps 0"),
    "node: width 100001": (lambda e: _calibrate_inputs(width=100001), ValueError, "width 100001 is outside"),
    "node: cfg NaN": (lambda e: _calibrate_inputs(cfg=float("nan")), ValueError, "cfg nan must be a number"),
    "node: seed -1": (lambda e: _calibrate_inputs(seed=-1), ValueError, "seed -1 must be"),
    "node: unknown preset": (lambda e: _calibrate_inputs(preset="W2A2"), ValueError, "preset 'W2A2' is not one of"),
    "node: 5000 prompts": (lambda e: _calibrate_inputs(prompts="p\n" * 5000), ValueError,
                           "5000 calibration prompts; at most 1000"),
    "node: a 10000-character prompt": (lambda e: _calibrate_inputs(prompts="x" * 10000), ValueError,
                                       "prompt 1 is 10000 characters"),
    "node: only blank prompts": (lambda e: _calibrate_inputs(prompts="\n  \n"), ValueError, "no calibration prompts"),
    "node: timestep_groups 99": (lambda e: _calibrate_inputs(timestep_groups=99), ValueError,
                                 "timestep_groups 99 must be"),
    "node: bits budget 4 for W4A8-mixed": (lambda e: _calibrate_inputs(preset="W4A8-mixed", bits_budget=4.0),
                                           ValueError, "bits_budget 4.0: W4A8-mixed needs"),
    "node: memory limit 0": (lambda e: _calibrate_inputs(memory_limit_mb=0), ValueError, "memory limit 0 MB"),
    "node: quant_result not from the Calibrate node": (lambda e: _save_node(e, "not a result", "x"), ValueError,
                                                        "quant_result must come from Calibrate"),
}


def _half_block():
    unet = tiny_unet("sd1", seed=0)
    unet.down_blocks[0].half()
    return unet


def _calibrate_inputs(**overrides):
    return inputs.check_calibrate_inputs(**{**GOOD_CALIBRATE, **overrides})


@pytest.fixture
def fake_folder_paths(monkeypatch, tmp_path):
    """Just the part of ComfyUI's folder_paths that the Save node uses (models_dir, model folders, the list cache)."""
    fp = types.ModuleType("folder_paths")
    fp.models_dir = str(tmp_path / "models")
    fp.folder_names_and_paths = {}
    fp.filename_list_cache = {fidelity_nodes.FOLDER: (["stale"], {}, 0.0)}
    fp.add_model_folder_path = lambda name, path: fp.folder_names_and_paths.setdefault(name, ([], set()))[0].append(path)
    fp.get_folder_paths = lambda name: fp.folder_names_and_paths[name][0]
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    return fp


def _save_node(env, result, name):
    return fidelity_nodes.SaveQuantizedUNet().save(result, name)


def test_the_matrix_has_at_least_30_kinds():
    assert len(KINDS) >= 30


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_each_bad_input_gets_one_clear_message(env, kind, fake_folder_paths):
    call, error, pattern = KINDS[kind]
    if kind == "load: a link out of the folder":
        (env.folder / "models").mkdir(exist_ok=True)
        link = env.folder / "models" / "out.safetensors"
        if not link.is_symlink():
            link.symlink_to(env.good)  # env.good lies outside env.folder/models
    with pytest.raises(error, match=pattern) as caught:
        call(env)
    message = str(caught.value)
    assert type(caught.value).__module__.split(".")[0] in ("quant_core", "builtins"), type(caught.value)
    assert 20 < len(message) < 600 and "Traceback" not in message, message
    assert weights_digest(env.unet) == env.digest  # the user's model is never modified


def test_the_save_node_numbers_copies_and_never_overwrites(env, fake_folder_paths):
    node = fidelity_nodes.SaveQuantizedUNet()
    first = node.save(env.calibration, "sd15 w4a8.safetensors")["ui"]["text"][0]
    folder = Path(fake_folder_paths.models_dir) / fidelity_nodes.FOLDER
    before = (folder / "sd15 w4a8.safetensors").read_bytes()
    second = node.save(env.calibration, "sd15 w4a8")["ui"]["text"][0]
    (folder / "sd15 w4a8_00002.safetensors").symlink_to(folder / "nowhere")  # a dangling link counts as taken
    third = node.save(env.calibration, "sd15 w4a8")["ui"]["text"][0]
    assert (first, second, third) == ("saved sd15 w4a8.safetensors", "saved sd15 w4a8_00001.safetensors",
                                      "saved sd15 w4a8_00003.safetensors")
    assert (folder / "sd15 w4a8.safetensors").read_bytes() == before
    assert fidelity_nodes.FOLDER not in fake_folder_paths.filename_list_cache  # the Load list is refreshed
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []  # no temporary files left
    name = "n" * inputs.MAX_STEM_BYTES  # the longest name still leaves room for its numbered copies
    node.save(env.calibration, name)
    assert node.save(env.calibration, name)["ui"]["text"][0] == f"saved {name}_00001.safetensors"
    loaded = _load(env, folder / "sd15 w4a8_00003.safetensors")
    assert loaded.plan == env.calibration.plan


def test_a_file_reached_through_a_link_inside_the_folder_loads(env, tmp_path):
    folder = tmp_path / "fq"
    folder.mkdir()
    (folder / "real.safetensors").write_bytes(env.data)
    (folder / "alias.safetensors").symlink_to(folder / "real.safetensors")
    assert inputs.resolve_load([str(folder)], "alias.safetensors") == str(folder / "alias.safetensors")


def test_a_model_given_too_little_capture_memory_still_calibrates(env):
    """A limit smaller than one call's rows is a fallback, not an error: fewer rows, and the report says
    which layers rounded to nearest for lack of rows."""
    unet = tiny_unet("sd1", seed=0)
    result = quantize(unet, LoopRunner(unet, prompts=1, steps=2), preset("W8A8", memory_limit_mb=0.01, evaluate=False,
                                                                         workers=1, consistency_pass=False))
    assert result.report["capture_bytes"] < 2**20 and "error-compensated rounding" in result.summary()


def test_a_cpu_without_int8_instructions_falls_back_to_float_and_says_so(monkeypatch, caplog):
    layer = nn.Linear(64, 32)
    x = torch.randn(5, 64)
    fast = QuantLinear.from_float(layer, act_scales=[0.05])
    monkeypatch.setattr(kernels, "cpu_flags", lambda: frozenset({"sse4_2", "avx2"}))
    kernels.cpu_has_fast_int8.cache_clear()
    try:
        with caplog.at_level("INFO", logger="fidelityquant"):
            slow = QuantLinear.from_float(layer, act_scales=[0.05])
            assert slow.backend_for(torch.device("cpu")) == "float"
            out = slow(x)
        assert "int8 dot-product instructions not found -> CPU int8 GEMM emulated in float32" in caplog.text
    finally:
        kernels.cpu_has_fast_int8.cache_clear()
    fast.use_backend("int_mm")
    # The float path computes the same integer products in float32: equal up to float rounding.
    assert torch.allclose(out, fast(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- CLI

def _cli(capsys, *args):
    """-> (exit code, what the command says about the error: its SystemExit text or its 'error:' lines).
    Libraries' own warnings on stderr (diffusers, transformers) are not the command's message."""
    capsys.readouterr()
    try:
        code = main(["quantize", *args])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    said = code if isinstance(code, str) else "\n".join(line for line in err.splitlines() if line.startswith("error:"))
    return code, said.strip()


@pytest.fixture
def cli_files(tmp_path, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red house\n")
    from quant_core import __main__ as cli

    def must_not_load(*_):
        raise AssertionError("the model was loaded although the arguments were already known to be bad")
    monkeypatch.setattr(cli, "_load_model", must_not_load)
    return tmp_path, prompts


@pytest.mark.parametrize("case,args,pattern", [
    ("--out is a folder", ["--out", "{tmp}"], "is a folder; give a file name inside it"),
    ("--out exists", ["--out", "{tmp}/prompts.txt"], "already exists.*--overwrite"),
    ("--out not .safetensors", ["--out", "{tmp}/model.bin"], "must end in .safetensors"),
    ("--steps 0", ["--out", "{tmp}/m.safetensors", "--steps", "0"], "steps 0"),
    ("--height 500", ["--out", "{tmp}/m.safetensors", "--height", "500"], "height 500 is not a multiple of 8"),
    ("--memory-mb 0", ["--out", "{tmp}/m.safetensors", "--memory-mb", "0"], "memory limit 0 MB"),
    ("--groups 0", ["--out", "{tmp}/m.safetensors", "--groups", "0"], "timestep_groups must be at least 1"),
    ("empty prompt file", ["--out", "{tmp}/m.safetensors", "--prompts", "{tmp}/empty.txt"], "has no prompts"),
    ("prompt file missing", ["--out", "{tmp}/m.safetensors", "--prompts", "{tmp}/none.txt"], "prompt file not found"),
])
def test_cli_refuses_bad_arguments_before_loading_or_calibrating(cli_files, capsys, case, args, pattern):
    tmp, prompts = cli_files
    (tmp / "empty.txt").write_text("# only a comment\n\n")
    full = ["--model", str(tmp / "model"), "--prompts", str(prompts)] + [a.format(tmp=tmp) for a in args]
    code, message = _cli(capsys, *full)
    assert code not in (0, None), case
    assert re.search(pattern, message), (case, message)
    assert "Traceback" not in message and len(message.splitlines()) <= 2, message


def test_cli_names_a_truncated_diffusers_weights_file_in_one_line(tmp_path, capsys):
    from tiny_pipelines import make_tiny_sd_pipeline

    folder = tmp_path / "model"
    make_tiny_sd_pipeline(seed=0).save_pretrained(folder, safe_serialization=True)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    (tmp_path / "p.txt").write_text("a red house\n")
    code, message = _cli(capsys, "--model", str(folder), "--prompts", str(tmp_path / "p.txt"),
                         "--out", str(tmp_path / "m.safetensors"), "--steps", "2")
    assert code not in (0, None)
    assert "could not load the diffusers model" in message and "incomplete or corrupt" in message, message
    print(message)
    assert len(message.splitlines()) == 1 and not (tmp_path / "m.safetensors").exists()


def test_cli_missing_model_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a red house\n")
    code, message = _cli(capsys, "--model", str(tmp_path / "nowhere"), "--prompts", str(tmp_path / "p.txt"),
                         "--out", str(tmp_path / "m.safetensors"))
    assert code not in (0, None) and message.startswith("error: diffusers model folder not found"), message
    assert not (tmp_path / "m.safetensors").exists()
