"""In-process ComfyUI checks beside the SD2/SDXL server tests (COMFYUI_PATH): what needs the Python objects.

- SDXL's ADM input (pooled text + size/crop embeddings, ``y``) reaches the quantized model unchanged, and
  the size conditioning changes its output (UNet only, Segmind Vega layout, seeded CLIP stand-in).
- The SDXL refiner (``SDXLRefiner``: model_channels 384, context 1280, ADM 2560) calibrates and stays close
  to float.
- ComfyUI's own weight formats: plain fp8 storage is calibrated from its values; a scaled-fp8 checkpoint
  loads on ComfyUI 0.8.0 as ``QuantizedTensor`` weights (calibrated from their dequantized values) and
  on 0.3.64 as fp8 codes plus ``scale_weight`` (refused with a message).
- ComfyUI's TorchCompileModel on a quantized MODEL (Dynamo through ComfyUI's own compile wrapper, the
  traced graphs run as traced; the node itself with Inductor only with FIDELITYQUANT_SLOW_TESTS=1: C++ code
  generation takes minutes on a shared 2-core machine).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

import comfy_checkpoints as checkpoints
from bench.tiny_models import FakeClip, comfy_sd15_unet, load_comfy_sd15
from comfyui_env import import_comfyui

REPO = Path(__file__).resolve().parents[1]
SLOW = os.environ.get("FIDELITYQUANT_SLOW_TESTS") == "1"


@pytest.fixture(scope="module")
def env():
    import_comfyui("the in-process SD2/SDXL tests", "comfy.model_management", "comfy.sample", "comfy.sd",
                   "folder_paths", "comfy.supported_models")
    import comfy
    pack = sys.modules.get("fidelityquant_pack")  # loaded once per process (other test modules load it too)
    if pack is None:
        spec = importlib.util.spec_from_file_location("fidelityquant_pack", REPO / "__init__.py",
                                                      submodule_search_locations=[str(REPO)])
        pack = importlib.util.module_from_spec(spec)
        sys.modules["fidelityquant_pack"] = pack
        spec.loader.exec_module(pack)
    return comfy, pack


def _calibrate(pack, model, clip, **overrides):
    args = dict(prompts="a red house\na blue boat", negative="", steps=3, cfg=5.0, sampler_name="euler",
                scheduler="normal", width=64, height=64, seed=0, preset="W8A8", timestep_groups=2, bits_budget=4.5,
                consistency_pass=True, memory_limit_mb=64)
    args.update(overrides)
    return pack.nodes.fidelity_nodes.calibrate_and_quantize(model, clip, **args)


def _sample(comfy, model, positive, negative, seed=3, steps=3):
    latent = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, 5.0, "euler", "normal", positive, negative, latent,
                               disable_pbar=True, seed=seed)


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def _sdxl_cond(clip, text, width, height):
    (context, extra), = clip.encode_from_tokens_scheduled(text)
    return [[context, dict(extra, width=width, height=height, crop_w=0, crop_h=0, target_width=width,
                           target_height=height)]]


def test_sdxl_adm_conditioning_reaches_the_quantized_model(env):
    comfy, pack = env
    model = comfy.sd.load_diffusion_model_state_dict(checkpoints.unet_state("sdxl", 0))
    assert type(model.model.model_config).__name__ == "Segmind_Vega"
    clip = FakeClip(width=2048, pooled=1280)
    qmodel, _, report = _calibrate(pack, model, clip)
    assert "sdxl ldm UNet" in report and "ComfyUI model: Segmind_Vega (SDXL family), eps prediction" in report
    seen = []
    hook = model.model.diffusion_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["y"].clone()), with_kwargs=True)
    try:
        results = {}
        for name, runs_on, size in (("float", model, 1024), ("quant", qmodel, 1024), ("quant_small", qmodel, 512)):
            seen.clear()
            results[name] = (_sample(comfy, runs_on, _sdxl_cond(clip, "a lighthouse", size, size),
                                     _sdxl_cond(clip, "", size, size)), list(seen))
    finally:
        hook.remove()
    (f, y_float), (q, y_quant), (q_small, y_small) = results["float"], results["quant"], results["quant_small"]
    assert len(y_float) == 3 and y_float[0].shape == (2, 2816)  # cond + uncond, pooled 1280 + 6 x 256 size/crop
    assert all(torch.equal(a, b) for a, b in zip(y_float, y_quant, strict=True))  # y reaches it unchanged
    assert not torch.equal(y_small[0], y_quant[0]) and torch.equal(y_small[0][:, :1280], y_quant[0][:, :1280])
    print(f"\nSDXL quantized vs float {_rel(q, f):.4f}; quantized at size 512 vs 1024 {_rel(q_small, q):.4f}")
    # measured 0.131 and 0.369 (ComfyUI 0.8.0; random weights, final latents of std ~200): the size
    # conditioning moves the quantized output by more than quantization does
    assert 0 < _rel(q, f) < 0.25 and _rel(q_small, q) > 0.3


def test_sdxl_refiner_calibrates_and_stays_close(env):
    comfy, pack = env
    model = comfy.sd.load_diffusion_model_state_dict(checkpoints.unet_state("sdxl_refiner", 0))
    assert type(model.model.model_config).__name__ == "SDXLRefiner"
    clip = FakeClip(width=1280, pooled=1280)
    qmodel, _, report = _calibrate(pack, model, clip)
    assert "sdxl ldm UNet" in report and "ComfyUI model: SDXLRefiner (SDXL refiner)" in report
    pos, neg = clip.encode_from_tokens_scheduled("a lighthouse"), clip.encode_from_tokens_scheduled("")
    f, q = _sample(comfy, model, pos, neg), _sample(comfy, qmodel, pos, neg)
    other = _sample(comfy, model, pos, neg, seed=4)
    print(f"\nrefiner quantized vs float {_rel(q, f):.4f}; another seed vs float {_rel(other, f):.4f}")
    assert 0 < _rel(q, f) < 0.3 < _rel(other, f)  # measured 0.169 and 1.34 (ComfyUI 0.8.0)


def _sd15_scaled_fp8_state() -> dict:
    """The tiny SD1.5 UNet with its transformer linears in ComfyUI's scaled-fp8 checkpoint format."""
    state = {}
    for key, value in comfy_sd15_unet(1, 32, 0).state_dict().items():
        if ".transformer_blocks." in key and key.endswith(".weight") and value.dim() == 2:
            scale = value.abs().max() / 448
            state[key] = (value / scale).to(torch.float8_e4m3fn)
            state[key[: -len("weight")] + "scale_weight"] = scale.reshape(())
        else:
            state[key] = value
    state["scaled_fp8"] = torch.tensor([], dtype=torch.float8_e4m3fn)
    return state


def test_fp8_stored_weights_calibrate(env):
    """Load Diffusion Model's weight_dtype fp8_e4m3fn: the fp8 values are the model's weights."""
    comfy, pack = env
    model = load_comfy_sd15(0, model_options={"dtype": torch.float8_e4m3fn})
    unet = model.model.diffusion_model
    assert unet.input_blocks[1][1].transformer_blocks[0].attn1.to_q.weight.dtype == torch.float8_e4m3fn
    clip = FakeClip()
    pos, neg = clip.encode_from_tokens_scheduled("a red house"), clip.encode_from_tokens_scheduled("")
    f = _sample(comfy, model, pos, neg)
    qmodel, _, _ = _calibrate(pack, model, clip)
    rel = _rel(_sample(comfy, qmodel, pos, neg), f)
    print(f"\nfp8-stored SD1.5, W8A8 vs float: {rel:.4f}")
    assert 0 < rel < 0.15


def test_scaled_fp8_checkpoint_handled_or_refused(env, tmp_path):
    comfy, pack = env
    from quant_core.artifact import load_result, save_result

    model = comfy.sd.load_diffusion_model_state_dict(_sd15_scaled_fp8_state())
    layer = model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn1.to_q
    clip = FakeClip()
    if isinstance(getattr(layer, "scale_weight", None), torch.Tensor):  # ComfyUI 0.3.64: scaled_fp8 ops
        with pytest.raises(pack.nodes.host_model.UnsupportedWeightFormatError, match="scaled fp8 weights"):
            _calibrate(pack, model, clip)
        return
    # ComfyUI 0.8.0: mixed-precision ops, the weight a QuantizedTensor that dequantizes when read
    assert type(layer.weight).__name__ == "QuantizedTensor", type(layer.weight)
    pos, neg = clip.encode_from_tokens_scheduled("a red house"), clip.encode_from_tokens_scheduled("")
    f = _sample(comfy, model, pos, neg)
    qmodel, calibration, _ = _calibrate(pack, model, clip)
    q = _sample(comfy, qmodel, pos, neg)
    print(f"\nscaled-fp8 SD1.5 (QuantizedTensor weights), W8A8 vs float: {_rel(q, f):.4f}")
    assert 0 < _rel(q, f) < 0.15
    save_result(calibration, str(tmp_path / "scaled.safetensors"))
    comfy.model_management.unload_all_models()
    loaded = load_result(str(tmp_path / "scaled.safetensors"), model.model.diffusion_model)  # fingerprint matches
    assert torch.equal(_sample(comfy, pack.nodes.patching.quantized_model(model, loaded), pos, neg), q)


@pytest.fixture(scope="module")
def quantized_sd15(env):
    comfy, pack = env
    model = load_comfy_sd15(0)
    clip = FakeClip()
    qmodel, _, _ = _calibrate(pack, model, clip)
    pos, neg = clip.encode_from_tokens_scheduled("a red house"), clip.encode_from_tokens_scheduled("")
    return model, qmodel, pos, neg, _sample(comfy, qmodel, pos, neg)


def test_torch_compile_wrapper_on_the_quantized_model(env, quantized_sd15):
    """ComfyUI's own compile wrapper (what TorchCompileModel installs), Dynamo-traced: same latents."""
    comfy, _ = env
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    torch._dynamo.reset()
    _, qmodel, pos, neg, eager = quantized_sd15
    graphs = []

    def recording_backend(graph_module, example_inputs):  # Dynamo's traced graphs, run as traced
        graphs.append(graph_module)
        return graph_module.forward

    compiled = qmodel.clone()
    set_torch_compile_wrapper(model=compiled, backend=recording_backend)
    out = _sample(comfy, compiled, pos, neg)
    print(f"\ncompiled (Dynamo, {len(graphs)} graphs) vs eager quantized: {_rel(out, eager):.2e}")
    assert graphs and _rel(out, eager) < 1e-4


@pytest.mark.skipif(not SLOW, reason="Inductor compiles C++ for minutes on a 2-core CPU; FIDELITYQUANT_SLOW_TESTS=1")
def test_torch_compile_model_node_inductor(env, quantized_sd15):
    comfy, _ = env
    from comfy_extras.nodes_torch_compile import TorchCompileModel

    torch._dynamo.reset()
    _, qmodel, pos, neg, eager = quantized_sd15
    result = TorchCompileModel.execute(qmodel, "inductor")
    compiled = result[0] if isinstance(result, tuple) else result.result[0]
    out = _sample(comfy, compiled, pos, neg)
    print(f"\nTorchCompileModel (inductor) vs eager quantized: {_rel(out, eager):.2e}")
    assert _rel(out, eager) < 1e-3
