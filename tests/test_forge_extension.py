"""The extension inside a real, headless Forge (CPU, --always-cpu --all-in-fp32), over its HTTP API.

    source /work/hosts/forge/env.sh && OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_forge_extension.py

Same set-up as tests/test_a1111_extension.py (tests/webui_server.py). Covered on Forge: calibration through
the API route, the load path (quantized close to float, "None" bit-identical, infotext), a file for another
checkpoint refused, and LoRA with a quantized file refused with its message (not supported on Forge yet).
Skips with the reason without FORGE_PATH / FORGE_PYTHON or the test checkpoint.
"""
from __future__ import annotations

import json

import pytest

from webui_server import LORA, HttpError, WebUI, missing, psnr

REASON = missing("forge")
pytestmark = pytest.mark.skipif(REASON is not None, reason=str(REASON))

PROMPT = "a photo of a red fox in the snow"
CALIBRATION = {"prompts": "a red fox in the snow\na lighthouse on a cliff at sunset", "negative": "", "steps": 4,
               "cfg": 7.0, "sampler_name": "Euler", "width": 256, "height": 256, "seed": 7, "preset": "W8A8",
               "timestep_groups": 2, "consistency_pass": True, "memory_limit_mb": 64, "filename": "tiny-w8a8"}


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    server = WebUI("forge", tmp_path_factory.mktemp("forge"))
    try:
        print(f"\nForge API up in {server.start():.0f} s")
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def float_image(ui):
    image, png, info = ui.txt2img(PROMPT)
    return image, png


@pytest.fixture(scope="module")
def calibrated(ui, float_image):
    try:
        result = ui.request("/fidelityquant/calibrate", CALIBRATION)
    except HttpError as exc:
        pytest.fail(f"calibration failed: {exc}\n{ui.log_tail()}")
    print(f"\n{result['report']}")
    assert (ui.quant_dir / result["file"]).is_file()
    return result["file"]


def test_quantized_close_to_float_and_none_identical(ui, float_image, calibrated):
    _, png, _ = ui.txt2img(PROMPT, quant_file="None")
    assert png == float_image[1], "choosing None changed the float image"
    quant, _, info = ui.txt2img(PROMPT, quant_file=calibrated)
    other, _, _ = ui.txt2img("a bowl of ramen, top view", seed=99)
    close, unrelated = psnr(quant, float_image[0]), psnr(other, float_image[0])
    print(f"\nForge: quantized vs float {close:.2f} dB; unrelated image vs float {unrelated:.2f} dB")
    assert f"FidelityQuant: {calibrated}" in info
    assert close < float("inf") and close > unrelated + 6
    _, png, _ = ui.txt2img(PROMPT, quant_file="None")
    assert png == float_image[1], "float image changed after a quantized job"


def test_other_checkpoint_file_and_lora_refused(ui, float_image, calibrated):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(ui.quant_dir / calibrated), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = dict(f.metadata())
    metadata["fingerprint"] = json.dumps({"fp16": "0" * 32, "bf16": "1" * 32})
    save_file(tensors, str(ui.quant_dir / "other-model.safetensors"), metadata=metadata)
    with pytest.raises(HttpError) as info:
        ui.txt2img(PROMPT, quant_file="other-model.safetensors")
    assert "calibrated on a different checkpoint" in info.value.body
    with pytest.raises(HttpError) as info:
        ui.txt2img(f"{PROMPT} <lora:{LORA}:1>", quant_file=calibrated)
    assert "LoRA on a quantized UNet is not supported in Forge yet" in info.value.body
    _, png, _ = ui.txt2img(PROMPT, quant_file="None")
    assert png == float_image[1]
