"""Bad inputs through the nodes inside real ComfyUI (COMFYUI_PATH; skips with the reason without it).

The host-free parts (names, paths, input ranges) are in tests/test_bad_inputs.py; here the nodes run on
a real MODEL: a damaged or foreign file on the Load node, a model with a NaN weight and out-of-range
inputs on the Calibrate node, and a link out of models/fidelity_quant/. Each fails with one clear
message, the MODEL stays bit-identical, and the float model still samples afterwards.
"""
import importlib.util
import struct
import sys
from pathlib import Path

import pytest
import torch

from bench.tiny_models import FakeClip, load_comfy_sd15
from comfyui_env import import_comfyui
from quant_core import artifact
from quant_core.models.modeltree import weights_digest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import_comfyui("the ComfyUI bad-input tests", "comfy.model_management", "comfy.sample", "comfy.sd", "folder_paths")
    import comfy.model_management
    import comfy.sample
    import folder_paths

    spec = importlib.util.spec_from_file_location("fidelityquant_pack", REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    pack = sys.modules.get("fidelityquant_pack")
    if pack is None:
        pack = importlib.util.module_from_spec(spec)
        sys.modules["fidelityquant_pack"] = pack
        spec.loader.exec_module(pack)
    nodes = pack.nodes.fidelity_nodes
    folder = tmp_path_factory.mktemp("fidelity_quant")
    folder_paths.folder_names_and_paths[nodes.FOLDER] = ([str(folder)], set())
    torch.manual_seed(0)
    model = load_comfy_sd15(0)
    args = dict(model=model, clip=FakeClip(), prompts="a red house", negative="", steps=2, cfg=5.0,
                sampler_name="euler", scheduler="normal", width=64, height=64, seed=0, preset="W8A8",
                timestep_groups=1, bits_budget=4.5, consistency_pass=False, memory_limit_mb=32)
    _, result, _ = nodes.CalibrateAndQuantize().run(**args)["result"]
    nodes.SaveQuantizedUNet().save(result, "good")
    return dict(comfy=comfy, nodes=nodes, model=model, folder=folder, args=args,
                good=(folder / "good.safetensors").read_bytes())


def _sample(comfy, model):
    clip = FakeClip()
    latent = torch.zeros(1, 4, 8, 8)
    return comfy.sample.sample(model, comfy.sample.prepare_noise(latent, 3), 2, 5.0, "euler", "normal",
                               clip.encode_from_tokens_scheduled("a boat"), clip.encode_from_tokens_scheduled(""),
                               latent, disable_pbar=True, seed=3)


def _unet_digest(env):
    env["comfy"].model_management.unload_all_models()
    return weights_digest(env["model"].model.diffusion_model)


def _damaged(data: bytes) -> bytes:
    at = 8 + struct.unpack("<Q", data[:8])[0] + 64
    return data[:at] + bytes([data[at] ^ 1]) + data[at + 1:]


@pytest.mark.parametrize("kind,content,error,pattern", [
    ("damaged", _damaged, artifact.QuantFileError, "is damaged"),
    ("truncated", lambda d: d[:1000], artifact.QuantFileError, "not a readable safetensors file"),
    ("empty", lambda d: b"", artifact.QuantFileError, "not a readable safetensors file"),
])
def test_the_load_node_refuses_a_bad_file_and_the_server_model_still_samples(env, kind, content, error, pattern):
    before, float_out = _unet_digest(env), _sample(env["comfy"], env["model"])
    (env["folder"] / f"{kind}.safetensors").write_bytes(content(env["good"]))
    with pytest.raises(error, match=pattern):
        env["nodes"].LoadQuantizedUNet().load(env["model"], f"{kind}.safetensors")
    assert _unet_digest(env) == before
    assert torch.equal(_sample(env["comfy"], env["model"]), float_out)  # the next prompt runs


def test_the_load_node_refuses_a_link_out_of_its_folder(env, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(env["good"])
    (env["folder"] / "link.safetensors").symlink_to(outside)
    with pytest.raises(ValueError, match="link to a file outside"):
        env["nodes"].LoadQuantizedUNet().load(env["model"], "link.safetensors")
    with pytest.raises(ValueError, match="no absolute paths or '..'"):
        env["nodes"].LoadQuantizedUNet().load(env["model"], "../elsewhere.safetensors")


@pytest.mark.parametrize("override,pattern", [
    (dict(steps=0), "steps 0"), (dict(width=100), "width 100 is not a multiple of 8"),
    (dict(prompts=" \n\n"), "no calibration prompts"), (dict(memory_limit_mb=0), "memory limit 0 MB"),
    (dict(preset="W4A8-mixed", bits_budget=4.0), "bits_budget 4.0"),
])
def test_the_calibrate_node_checks_its_inputs_before_sampling(env, override, pattern):
    before = _unet_digest(env)
    with pytest.raises(ValueError, match=pattern):
        env["nodes"].CalibrateAndQuantize().run(**{**env["args"], **override})
    assert _unet_digest(env) == before


def test_the_calibrate_node_names_the_layer_holding_nan(env):
    model = load_comfy_sd15(1)
    unet = model.model.diffusion_model
    name = "input_blocks.1.1.proj_in"
    with torch.no_grad():
        unet.get_submodule(name).weight.view(-1)[3] = float("nan")
    before = weights_digest(unet)
    with pytest.raises(ValueError, match=f"layer {name} holds 1 NaN/Inf"):
        env["nodes"].CalibrateAndQuantize().run(**{**env["args"], "model": model})
    env["comfy"].model_management.unload_all_models()
    assert weights_digest(model.model.diffusion_model) == before


def test_the_bits_budget_widget_allows_only_what_the_engine_accepts(env):
    """ComfyUI clamps a widget to its min/max, so the widget's range must lie inside the engine's (4, 16]."""
    from quant_core.config import preset

    spec = env["nodes"].CALIBRATE.inputs()
    options = next(opts for name, _, opts in spec if name == "bits_budget")
    for value in (options["min"], options["default"], options["max"]):
        assert preset("W4A8-mixed", bits_budget=value).bits_budget == value
    with pytest.raises(ValueError, match="must lie in"):
        preset("W4A8-mixed", bits_budget=options["min"] - options["step"])
