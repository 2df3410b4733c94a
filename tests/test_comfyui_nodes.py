"""The nodes inside real ComfyUI (COMFYUI_PATH): calibrate with ComfyUI's sampler, patch a clone, save/load, cancel.

The MODEL is a small SD1.5-layout UNet loaded through ComfyUI's own loader (model_channels 320,
context 768, one level). CLIP is replaced by a seeded stand-in (prompt -> fixed random embedding):
text encoding is ComfyUI's business, and a real CLIP-L would dominate the test's run time.
"""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from bench.tiny_models import FakeClip, load_comfy_sd15
from comfyui_env import import_comfyui

REPO = Path(__file__).resolve().parents[1]
NODE_IDS = {"FidelityQuantCalibrate", "FidelityQuantSave", "FidelityQuantLoad", "FidelityQuantCompare"}


def _comfy():
    import_comfyui("the node tests", "comfy.model_management", "comfy.sample", "comfy.sd", "folder_paths")
    import comfy
    import folder_paths
    return comfy, folder_paths


@pytest.fixture(scope="module")
def env():
    comfy, folder_paths = _comfy()
    spec = importlib.util.spec_from_file_location("fidelityquant_pack", REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["fidelityquant_pack"] = pack
    spec.loader.exec_module(pack)
    assert set(pack.nodes.fidelity_nodes.NODE_CLASS_MAPPINGS) == NODE_IDS
    # Exactly one API is exported: ComfyUI would ignore comfy_entrypoint next to NODE_CLASS_MAPPINGS.
    assert hasattr(pack, "comfy_entrypoint") != hasattr(pack, "NODE_CLASS_MAPPINGS")
    return comfy, folder_paths, pack


def _tiny_sd15(comfy, seed):
    torch.manual_seed(seed)  # the global RNG state the rest of each test was written against
    return load_comfy_sd15(seed)


def _sample(comfy, model, seed=3, steps=3):
    clip = FakeClip()
    pos, neg = clip.encode_from_tokens_scheduled("a red house"), clip.encode_from_tokens_scheduled("")
    latent = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, 5.0, "euler", "normal", pos, neg, latent,
                               disable_pbar=True, seed=seed)


def _calibrate(pack, model, **overrides):
    args = dict(model=model, clip=FakeClip(), prompts="a red house\na blue boat\na green tree", negative="",
                steps=3, cfg=5.0, sampler_name="euler", scheduler="normal", width=64, height=64, seed=0,
                preset="W8A8", timestep_groups=2, bits_budget=4.5, consistency_pass=True, memory_limit_mb=64)
    args.update(overrides)
    return pack.nodes.fidelity_nodes.CalibrateAndQuantize().run(**args)["result"]


def _pristine(comfy, model, original_unet):
    """After ComfyUI unpatches (it does so lazily, on the next load or an unload), the input MODEL's
    UNet is the original module, with no hooks and no quantized layers left behind."""
    from quant_core.runtime.layers import QuantConv2d, QuantLinear

    comfy.model_management.unload_all_models()
    unet = model.model.diffusion_model
    return (unet is original_unet and not model.object_patches
            and all(not m._forward_pre_hooks and not m._forward_hooks for m in unet.modules())
            and not any(isinstance(m, (QuantLinear, QuantConv2d)) for m in unet.modules()))


def test_calibrate_quantize_patches_a_clone_and_stays_close(env, tmp_path):
    comfy, folder_paths, pack = env
    model = _tiny_sd15(comfy, seed=0)
    original_unet = model.model.diffusion_model
    float_before = _sample(comfy, model)
    qmodel, result, report = _calibrate(pack, model)
    assert qmodel is not model and "timestep groups" in report
    assert len(qmodel.object_patches) == len(result.layers) + len(result.time_tables)
    assert _pristine(comfy, model, original_unet)
    float_after = _sample(comfy, model)
    assert torch.equal(float_before, float_after)  # the input MODEL is untouched
    assert "\nkernels: " in report  # which kernel each layer kind runs here
    # Denormals are flushed on the sampling thread during each quantized UNet call, and only then.
    from quant_core.runtime.denormals import thread_flushes
    runtime = pack.nodes.patching.runtime_for(result, model.model)
    seen = []
    hook = next(iter(runtime.layers.values())).register_forward_pre_hook(lambda m, a: seen.append(thread_flushes()))
    torch.set_flush_denormal(False)
    quant = _sample(comfy, qmodel)
    hook.remove()
    assert seen and all(seen) and not thread_flushes() and not runtime._flush.active
    rel = float((quant - float_after).norm() / float_after.norm())
    print(f"W8A8 final-latent relative error vs float: {rel:.4f}")
    assert 0 < rel < 0.15, rel  # W8A8, random weights, 3 euler steps: measured 0.078 (2x margin)
    assert torch.equal(_sample(comfy, model), float_after)  # still float after the quantized run
    assert _pristine(comfy, model, original_unet)

    folder_paths.folder_names_and_paths[pack.nodes.fidelity_nodes.FOLDER] = ([str(tmp_path)], set())
    saver = pack.nodes.fidelity_nodes.SaveQuantizedUNet()
    saver.save(result, "tiny")
    saver.save(result, "tiny")  # never overwrites: a numbered second file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.safetensors", "tiny_00001.safetensors"]
    loaded, _ = pack.nodes.fidelity_nodes.LoadQuantizedUNet().load(model, "tiny.safetensors")
    shown = pack.nodes.fidelity_nodes.LoadQuantizedUNet().load_with_report(model, "tiny.safetensors")
    assert shown["ui"]["text"] == [shown["result"][1]] and "W8A8" in shown["result"][1]  # what ComfyUI (V1) calls
    assert torch.equal(_sample(comfy, loaded), quant)

    # A LoRA-style weight patch on the quantized MODEL: merged by ComfyUI through our convert_weight /
    # set_weight, close to the float model with the same patch, and undone bit-exactly.
    comfy.model_management.unload_all_models()
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    layer = pack.nodes.patching.runtime_for(result, model.model).layers["input_blocks.1.1.transformer_blocks.0.attn1.to_q"]
    codes = layer.weight.clone()
    w = model.model.state_dict()[key]
    delta = torch.randn(w.shape, generator=torch.Generator().manual_seed(5)) * float(w.abs().mean()) * 0.3
    lora_float, lora_quant = model.clone(), qmodel.clone()
    assert lora_float.add_patches({key: ("diff", (delta,))}, 1.0) == [key]
    assert lora_quant.add_patches({key: ("diff", (delta,))}, 1.0) == [key]
    with_lora_float, with_lora_quant = _sample(comfy, lora_float), _sample(comfy, lora_quant)
    assert not torch.equal(with_lora_quant, quant)
    rel_lora = float((with_lora_quant - with_lora_float).norm() / with_lora_float.norm())
    print(f"with LoRA patch: {rel_lora:.4f}")
    assert rel_lora < 1.5 * rel + 0.01
    comfy.model_management.unload_all_models()
    assert torch.equal(layer.weight, codes)
    assert torch.equal(_sample(comfy, qmodel), quant)

    other = _tiny_sd15(comfy, seed=1)
    from quant_core.calibration import IncompatibleModelError
    with pytest.raises(IncompatibleModelError, match="different checkpoint"):
        pack.nodes.fidelity_nodes.LoadQuantizedUNet().load(other, "tiny.safetensors")


def test_cancelled_calibration_leaves_the_model_float(env, monkeypatch):
    comfy, _, pack = env
    import comfy.utils
    model = _tiny_sd15(comfy, seed=0)
    original_unet = model.model.diffusion_model
    reference = _sample(comfy, model)
    update = comfy.utils.ProgressBar.update_absolute

    def cancel_midway(self, value, total=None, preview=None):  # the user presses Cancel at the 4th UNet call
        if value == 4:
            comfy.model_management.interrupt_current_processing(True)
        return update(self, value, total, preview)

    monkeypatch.setattr(comfy.utils.ProgressBar, "update_absolute", cancel_midway)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        _calibrate(pack, model)
    monkeypatch.undo()
    assert _pristine(comfy, model, original_unet)
    assert torch.equal(_sample(comfy, model), reference)


def test_compare_images_node(env):
    _, _, pack = env
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(2, 32, 32, 3, generator=gen)
    b = (a + 0.05 * torch.randn(a.shape, generator=gen)).clamp(0, 1)
    out = pack.nodes.fidelity_nodes.CompareImages().compare(a, b)["result"]
    assert "image 1: PSNR" in out[0] and "mean: PSNR" in out[0]
    assert out[1].shape == a.shape
    with pytest.raises(ValueError, match="differ in size"):
        pack.nodes.fidelity_nodes.CompareImages().compare(a, b[:1])


def test_v3_nodes_mirror_the_v1_nodes(env):
    """The V3 schemas come from the same declarations as the V1 classes and call the same functions."""
    import asyncio

    _, _, pack = env
    try:
        from comfy_api.latest import io
    except ImportError as exc:
        pytest.skip(f"this ComfyUI has no V3 node API (comfy_api.latest): {exc}")
    assert hasattr(pack, "comfy_entrypoint") and not hasattr(pack, "NODE_CLASS_MAPPINGS")
    nodes = asyncio.run(asyncio.run(pack.comfy_entrypoint()).get_node_list())
    v1 = pack.nodes.fidelity_nodes.NODE_CLASS_MAPPINGS
    assert {n.GET_SCHEMA().node_id for n in nodes} == NODE_IDS
    for node in nodes:
        info, old = node.GET_NODE_INFO_V1(), v1[node.GET_SCHEMA().node_id]
        assert issubclass(node, io.ComfyNode)
        assert info["input_order"]["required"] == list(old.INPUT_TYPES()["required"]), info["name"]
        assert tuple(info["output"]) == old.RETURN_TYPES and tuple(info["output_name"]) == old.RETURN_NAMES
        assert info["output_node"] == bool(old.OUTPUT_NODE) and info["category"] == "FidelityQuant"
    seed = dict(nodes[0].GET_NODE_INFO_V1()["input"]["required"])["seed"]
    assert seed[1]["control_after_generate"] is False  # a randomized seed would recalibrate on every queue

    gen = torch.Generator().manual_seed(0)
    a = torch.rand(1, 16, 16, 3, generator=gen)
    compare = next(n for n in nodes if n.GET_SCHEMA().node_id == "FidelityQuantCompare")
    out = compare.execute(reference=a, images=(a + 0.01).clamp(0, 1))
    assert out.ui["text"][0] == out.result[0] and "mean: PSNR" in out.result[0]
