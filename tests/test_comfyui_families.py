"""SD2.x and SDXL inside ComfyUI (COMFYUI_PATH), through a headless server as a user would run them.

tests/comfy_checkpoints.py writes two seeded single-file checkpoints that ComfyUI's own
CheckpointLoaderSimple detects as ``SD20`` with v-prediction (OpenCLIP-H, context 1024) and as
``Segmind_Vega``, an SDXL-family layout (CLIP-L + OpenCLIP-G, ADM size/crop conditioning), plus a LoRA for
each. The SD2 checkpoint runs workflows/1_calibrate_and_compare, the SDXL one
workflows/4_sdxl_calibrate_and_compare (both patched to 64x64 latents, 3 steps, 2 calibration prompts).
tests/test_comfyui_families_inprocess.py covers what needs the Python objects: SDXL's ADM input, the refiner,
ComfyUI's own fp8 / quantized weight formats.

Text encoders are full size (ComfyUI builds them from fixed configs): the checkpoints are 0.85 GB (SD2)
and 1.8 GB (SDXL), each written in 6-16 s here.
"""
from __future__ import annotations

import re
import shutil
import time

import pytest
import torch

import comfy_checkpoints as checkpoints
from comfyui_env import import_comfyui
from comfyui_server import SIZE, comfy_path, messages, node_id, running_server, small_workflow, succeeded

FAMILIES = ("sd2", "sdxl")
CHECKPOINT = {"sd2": "tiny_sd2.safetensors", "sdxl": "tiny_sdxl.safetensors"}
WORKFLOW = {"sd2": "1_calibrate_and_compare", "sdxl": "4_sdxl_calibrate_and_compare"}
REPORT_LINE = {"sd2": ("sd2 ldm UNet", "ComfyUI model: SD20 (SD2.x), v_prediction prediction"),
               "sdxl": ("sdxl ldm UNet", "ComfyUI model: Segmind_Vega (SDXL family), eps prediction")}
# Compare Images' mean PSNR, quantized vs float (8-bit 64x64), W8A8, 2 prompts, 3 euler steps, measured on
# ComfyUI 0.8.0: SD2 35.53 dB, SDXL 23.73 dB (with the LoRA: 33.91 / 24.46 dB); the float image against its
# own mirror image (unrelated content, same statistics): SD2 25.00 dB (a low-contrast image, std 25/255),
# SDXL 16.21 dB; the LoRA's own effect on the float image: 26.32 / 17.86 dB. Each threshold sits about halfway,
# so a quantized path that has lost the image fails while BLAS / platform noise passes.
PSNR_THRESHOLD_DB = {"sd2": 30.0, "sdxl": 20.0}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = comfy_path()
    import_comfyui("the SD2/SDXL server tests", "comfy.clip_model", "comfy.ops", "comfy.taesd.taesd",
                   "comfy.supported_models")
    from safetensors.torch import save_file

    base = tmp_path_factory.mktemp("comfy_families")
    models = base / "models"
    (models / "loras").mkdir(parents=True)
    for family in FAMILIES:
        start = time.monotonic()
        unet = checkpoints.write_checkpoint(family, path, models / "checkpoints" / CHECKPOINT[family])
        save_file(checkpoints.lora_state(unet, seed=4), str(models / "loras" / f"{family}_lora.safetensors"))
        print(f"\n{family} checkpoint written in {time.monotonic() - start:.1f} s")
    try:
        with running_server(path, base) as srv:
            yield srv
    finally:
        shutil.rmtree(models, ignore_errors=True)  # ~2.7 GB of weights


def _graph(family: str, stem: str | None = None) -> dict:
    """An example workflow in API format on the family's checkpoint (``small_workflow``: 64x64, 3 steps)."""
    return small_workflow(stem or WORKFLOW[family], CHECKPOINT[family])


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(255.0 ** 2 / (a.float() - b.float()).pow(2).mean()))


def _compare_psnr(entry: dict, graph: dict) -> float:
    text = entry["outputs"][node_id(graph, "FidelityQuantCompare")]["text"][0]
    return float(re.search(r"mean: PSNR ([\d.]+) dB", text).group(1))


def _images(srv, entry: dict, graph: dict) -> tuple:
    out = entry["outputs"]
    return tuple(srv.image(out[node_id(graph, "SaveImage", title)]["images"][0])
                 for title in ("Save (quantized)", "Save (float)"))


@pytest.fixture(scope="module", params=FAMILIES)
def calibrated(request, server):
    family = request.param
    graph = _graph(family)
    entry, seconds = server.run(graph)
    succeeded(entry, server)
    print(f"\n{family}: {WORKFLOW[family]} (calibrate + 2 samplers + compare) {seconds:.1f} s")
    return family, graph, entry


def test_quantized_image_close_to_float_and_report_names_the_family(server, calibrated):
    family, graph, entry = calibrated
    report = entry["outputs"][node_id(graph, "FidelityQuantCalibrate")]["text"][0]
    print(f"\ncalibration report ({family}):\n{report}")
    for line in REPORT_LINE[family]:
        assert line in report, report
    quant, ref = (image.float() for image in _images(server, entry, graph))
    assert quant.numel() == ref.numel() == SIZE * SIZE * 3
    clipped = float(((ref == 0) | (ref == 255)).float().mean())
    assert ref.std() > 15 and clipped < 0.2, (float(ref.std()), clipped)  # signal, not clipped flat
    assert not torch.equal(quant, ref)  # the quantized path ran
    psnr = _compare_psnr(entry, graph)
    mirror = _psnr(ref.view(SIZE, SIZE, 3).flip(1), ref.view(SIZE, SIZE, 3))
    print(f"{family}: quantized vs float {psnr:.2f} dB; float vs its mirror image {mirror:.2f} dB; "
          f"float std {float(ref.std()):.1f}, clipped {clipped:.3f}")
    assert abs(_psnr(quant, ref) - psnr) < 1.0  # the node's figure is real
    assert psnr > PSNR_THRESHOLD_DB[family] > mirror + 2


@pytest.fixture(scope="module")
def saved_file(server, calibrated):
    family, _, _ = calibrated
    graph = _graph(family, "3_calibrate_and_save")
    graph[node_id(graph, "FidelityQuantSave")]["inputs"]["filename"] = f"tiny_{family}"
    entry, _ = server.run(graph)
    succeeded(entry, server)
    # the same calibration inputs as the compare workflow: ComfyUI's cache hands over that result
    assert node_id(graph, "FidelityQuantCalibrate") in messages(entry, "execution_cached")[0]["nodes"]
    name = entry["outputs"][node_id(graph, "FidelityQuantSave")]["text"][0].removeprefix("saved ")
    assert (server.base / "models" / "fidelity_quant" / name).is_file()
    return name


def test_save_then_load_gives_identical_output_and_float_is_untouched(server, calibrated, saved_file):
    family, g1, e1 = calibrated
    graph = _graph(family, "2_load_quantized")
    # workflow 2 has SD1-style prompt nodes; the SDXL run keeps workflow 4's (same seed, same conditioning)
    if family == "sdxl":
        for nid in ("2", "3"):
            graph[nid] = g1[nid]
    graph[node_id(graph, "FidelityQuantLoad")]["inputs"]["file"] = saved_file
    entry, _ = server.run(graph)
    succeeded(entry, server)
    report = entry["outputs"][node_id(graph, "FidelityQuantLoad")]["text"][0]
    assert REPORT_LINE[family][1] in report, report
    loaded = server.image(entry["outputs"][node_id(graph, "SaveImage")]["images"][0])
    calibrated_image, float_image = _images(server, e1, g1)
    assert torch.equal(loaded, calibrated_image)

    # The checkpoint's own MODEL still samples the float image, bit for bit (sampled again: the last
    # prompts did not hold the float sampler, so ComfyUI's cache no longer has it).
    keep = {"CheckpointLoaderSimple", "CLIPTextEncode", "CLIPTextEncodeSDXL", "EmptyLatentImage"}
    float_only = {k: v for k, v in g1.items() if v["class_type"] in keep or v["_meta"]["title"] in
                  ("KSampler (float)", "Decode (float)", "Save (float)")}
    entry, _ = server.run(float_only)
    succeeded(entry, server)
    save = node_id(float_only, "SaveImage", "Save (float)")
    assert save not in messages(entry, "execution_cached")[0]["nodes"]
    assert torch.equal(server.image(entry["outputs"][save]["images"][0]), float_image)


def test_lora_on_the_quantized_model(server, calibrated):
    """LoraLoaderModelOnly after Calibrate & Quantize and on the float branch: every key lands, the LoRA
    changes the image more than quantization does, and quantized+LoRA stays close to float+LoRA."""
    family, g1, e1 = calibrated
    graph = _graph(family)
    for nid, source in (("20", "5"), ("21", "1")):
        graph[nid] = {"class_type": "LoraLoaderModelOnly", "_meta": {"title": f"LoRA {nid}"},
                      "inputs": {"model": [source, 0], "lora_name": f"{family}_lora.safetensors", "strength_model": 1.0}}
    graph[node_id(graph, "KSampler", "KSampler (quantized)")]["inputs"]["model"] = ["20", 0]
    graph[node_id(graph, "KSampler", "KSampler (float)")]["inputs"]["model"] = ["21", 0]
    log_before = len(server.log_tail(10**9))
    entry, seconds = server.run(graph)
    succeeded(entry, server)
    assert "lora key not loaded" not in server.log_tail(10**9)[log_before:]
    quant_lora, float_lora = _images(server, entry, graph)
    quant, float_image = _images(server, e1, g1)
    psnr = _compare_psnr(entry, graph)
    effect = _psnr(float_lora, float_image)
    print(f"\n{family} + LoRA: {seconds:.1f} s; quantized+LoRA vs float+LoRA {psnr:.2f} dB; "
          f"float+LoRA vs float (the LoRA's effect) {effect:.2f} dB")
    assert not torch.equal(quant_lora, quant)
    assert effect < psnr - 3  # the LoRA moves the image more than quantization does
    assert psnr > PSNR_THRESHOLD_DB[family], psnr
