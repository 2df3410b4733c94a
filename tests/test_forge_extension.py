"""The extension inside a real, headless Forge (CPU, --always-cpu --all-in-fp32), over its HTTP API.

    source /work/hosts/forge/env.sh && OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_forge_extension.py

Same set-up as tests/test_a1111_extension.py (tests/webui_server.py). Covered on Forge: calibration through
the API route, the load path (quantized close to float, "None" bit-identical, infotext), a file for another
checkpoint refused, and ``<lora:...>`` on the quantized UNet (effective, close to float+LoRA, exact restore).
Skips with the reason without FORGE_PATH / FORGE_PYTHON or the test checkpoint.
"""
from __future__ import annotations

import json
import time

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
    t0 = time.time()
    image, png, info = ui.txt2img(PROMPT)
    print(f"\nfloat txt2img (incl. model load) {time.time() - t0:.0f} s")
    return image, png


IMAGES: dict = {}


@pytest.fixture(scope="module")
def calibrated(ui, float_image):
    t0 = time.time()
    try:
        result = ui.request("/fidelityquant/calibrate", CALIBRATION)
    except HttpError as exc:
        pytest.fail(f"calibration failed: {exc}\n{ui.log_tail()}")
    print(f"\ncalibration: {time.time() - t0:.0f} s\n{result['report']}")
    assert (ui.quant_dir / result["file"]).is_file()
    return result["file"]


def test_quantized_close_to_float_and_none_identical(ui, float_image, calibrated):
    t0 = time.time()
    _, png, _ = ui.txt2img(PROMPT, quant_file="None")
    print(f"\nfloat txt2img {time.time() - t0:.0f} s")
    assert png == float_image[1], "choosing None changed the float image"
    t0 = time.time()
    quant, _, info = IMAGES["quant"] = ui.txt2img(PROMPT, quant_file=calibrated)
    print(f"quantized txt2img {time.time() - t0:.0f} s")
    other, _, _ = ui.txt2img("a bowl of ramen, top view", seed=99)
    close, unrelated = psnr(quant, float_image[0]), psnr(other, float_image[0])
    print(f"\nForge: quantized vs float {close:.2f} dB; unrelated image vs float {unrelated:.2f} dB")
    assert f"FidelityQuant: {calibrated}" in info
    assert close < float("inf") and close > unrelated + 6
    _, png, _ = ui.txt2img(PROMPT, quant_file="None")
    assert png == float_image[1], "float image changed after a quantized job"


def test_other_checkpoint_and_unknown_file_refused(ui, float_image, calibrated):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from quant_core.integrity import digest_of

    with safe_open(str(ui.quant_dir / calibrated), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = dict(f.metadata())
    metadata["fingerprint"] = json.dumps({"fp16": "0" * 32, "bf16": "1" * 32})  # made for some other weights
    metadata["digest"] = digest_of({k: v for k, v in metadata.items() if k != "digest"}, tensors)  # intact
    save_file(tensors, str(ui.quant_dir / "other-model.safetensors"), metadata=metadata)
    with pytest.raises(HttpError) as info:
        ui.txt2img(PROMPT, quant_file="other-model.safetensors")
    assert "calibrated on a different checkpoint" in info.value.body
    with pytest.raises(HttpError) as info:
        ui.txt2img(PROMPT, quant_file="no-such-file.safetensors")
    assert "no file 'no-such-file.safetensors'" in info.value.body
    _, png, _ = ui.txt2img(PROMPT, quant_file="None")
    assert png == float_image[1]


def test_lora_on_quantized(ui, float_image, calibrated):
    lora_prompt = f"{PROMPT} <lora:{LORA}:1>"
    float_lora, _, _ = ui.txt2img(lora_prompt)
    t0 = time.time()
    quant_lora, _, info = ui.txt2img(lora_prompt, quant_file=calibrated)
    print(f"\nquantized + LoRA txt2img {time.time() - t0:.0f} s")
    quant = IMAGES["quant"][0] if "quant" in IMAGES else ui.txt2img(PROMPT, quant_file=calibrated)[0]
    lora_effect = psnr(float_lora, float_image[0])
    close = psnr(quant_lora, float_lora)
    gap = psnr(quant, float_image[0])
    print(f"Forge: LoRA effect on float {lora_effect:.2f} dB; quantized+LoRA vs float+LoRA {close:.2f} dB "
          f"(quantized vs float without LoRA {gap:.2f} dB)")
    assert f"FidelityQuant: {calibrated}" in info
    assert lora_effect < 40, "the LoRA barely changes the float image: the test cannot see it"
    assert close < float("inf"), "quantized+LoRA is identical to float+LoRA: the quantized layers did not run"
    assert psnr(quant_lora, quant) < gap, "the LoRA had no visible effect on the quantized UNet"
    assert close > lora_effect + 3, "quantized+LoRA is not closer to float+LoRA than the LoRA's own effect"
    assert close > gap - 3, f"quantized+LoRA {close:.2f} dB much further from float+LoRA than without LoRA"
    again, _, _ = ui.txt2img(PROMPT, quant_file=calibrated)
    assert psnr(again, quant) == float("inf"), "the quantized image changed after a LoRA job (restore not exact)"
    _, png, _ = ui.txt2img(PROMPT, quant_file="None")
    assert png == float_image[1], "float image changed after LoRA jobs"


def test_batch_count_with_quantized_file(ui, float_image, calibrated):
    """Two batches (n_iter 2) with the file: both record it, and the first is the single job's quantized image."""
    quant = IMAGES["quant"][0] if "quant" in IMAGES else ui.txt2img(PROMPT, quant_file=calibrated)[0]
    t0 = time.time()
    results = ui.txt2img_all(PROMPT, quant_file=calibrated, n_iter=2)
    print(f"\nn_iter 2 quantized txt2img {time.time() - t0:.0f} s")
    assert len(results) == 2
    assert all(f"FidelityQuant: {calibrated}" in info for _, _, info in results)
    assert psnr(results[0][0], quant) == float("inf"), "batch 1 of 2 differs from the same seed's single job"
    assert psnr(results[1][0], quant) < float("inf"), "batch 2 repeated batch 1 (seed not advanced?)"
    _, png, _ = ui.txt2img(PROMPT, quant_file="None")
    assert png == float_image[1], "float image changed after a two-batch quantized job"


@pytest.mark.parametrize("mode", ["hires fix", "img2img"])
def test_hires_fix_and_img2img_with_quantized_file(ui, float_image, calibrated, mode):
    """The file also drives a hires-fix second pass and img2img: close to the float job, not identical, recorded."""
    hires = {"enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent", "hr_second_pass_steps": 2,
             "denoising_strength": 0.6,
             "hr_additional_modules": ["Use same choices"]}  # Forge's API fails on hires fix without it (None)

    def run(quant_file, prompt=PROMPT, seed=1234):
        if mode == "hires fix":
            return ui.txt2img(prompt, quant_file=quant_file, seed=seed, **hires)
        return ui.img2img(prompt, float_image[1], quant_file=quant_file, seed=seed)

    t0 = time.time()
    reference, _, _ = run(None)
    t1 = time.time()
    quant, _, info = run(calibrated)
    print(f"\n{mode}: float {t1 - t0:.0f} s, quantized {time.time() - t1:.0f} s")
    other, _, _ = run(None, "a bowl of ramen, top view", 99)
    close, unrelated = psnr(quant, reference), psnr(other, reference)
    print(f"{mode}: quantized vs float {close:.2f} dB; unrelated vs float {unrelated:.2f} dB")
    assert f"FidelityQuant: {calibrated}" in info
    assert close < float("inf"), f"{mode}: the quantized image is identical to the float one"
    assert close > unrelated + 6, f"{mode}: quantized not close to float ({close:.2f} vs unrelated {unrelated:.2f} dB)"
    _, png, _ = ui.txt2img(PROMPT, quant_file="None")
    assert png == float_image[1], f"float image changed after a quantized {mode} job"
