"""The extension inside a real, headless AUTOMATIC1111 v1.10.1 (CPU), over its HTTP API.

    source /work/hosts/a1111/env.sh && OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_a1111_extension.py

One server for the module (tests/webui_server.py: this checkout symlinked into a fresh data dir's
extensions/, the small seeded SD1.5-layout checkpoint, 256x256, 4 Euler steps,
two torch threads). Skips with the reason
without A1111_PATH / A1111_PYTHON or the test checkpoint.
"""
from __future__ import annotations

import json
import os
import threading
import time

import pytest

from webui_server import LORA, HttpError, WebUI, missing, psnr

REASON = missing("a1111")
pytestmark = pytest.mark.skipif(REASON is not None, reason=str(REASON))

PROMPT = "a photo of a red fox in the snow"
CALIBRATION = {"prompts": "a red fox in the snow\na lighthouse on a cliff at sunset", "negative": "", "steps": 4,
               "cfg": 7.0, "sampler_name": "Euler", "width": 256, "height": 256, "seed": 7, "preset": "W8A8",
               "timestep_groups": 2, "consistency_pass": True, "memory_limit_mb": 64, "filename": "tiny-w8a8"}


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    server = WebUI("a1111", tmp_path_factory.mktemp("a1111"))
    try:
        startup = server.start()
        print(f"\nA1111 API up in {startup:.0f} s")
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def float_image(ui):
    t0 = time.time()
    image, png, info = ui.txt2img(PROMPT)
    print(f"\nfloat txt2img (incl. model load) {time.time() - t0:.0f} s")
    assert "FidelityQuant" not in info
    return image, png


IMAGES: dict = {}  # images that later tests reuse, by tag


@pytest.fixture(scope="module")
def calibrated(ui, float_image):
    t0 = time.time()
    try:
        result = ui.request("/fidelityquant/calibrate", CALIBRATION)
    except HttpError as exc:
        pytest.fail(f"calibration failed: {exc}\n{ui.log_tail()}")
    print(f"\ncalibration: {time.time() - t0:.0f} s\n{result['report']}")
    assert result["file"] == "tiny-w8a8.safetensors"
    assert (ui.quant_dir / result["file"]).is_file()
    return result["file"]


def test_none_is_the_float_model(ui, float_image):
    t0 = time.time()
    image, png, info = ui.txt2img(PROMPT, quant_file="None")
    print(f"\nfloat txt2img {time.time() - t0:.0f} s")
    assert png == float_image[1], "choosing None changed the float image"
    assert "FidelityQuant" not in info


def test_files_route_lists_the_folder(ui, calibrated):
    listing = ui.get("/fidelityquant/files")
    assert calibrated in listing["files"]
    assert listing["folder"].endswith(os.path.join("models", "fidelity_quant"))


def test_quantized_close_to_float_and_restored(ui, float_image, calibrated):
    t0 = time.time()
    quant, _, info = IMAGES["quant"] = ui.txt2img(PROMPT, quant_file=calibrated)
    print(f"\nquantized txt2img {time.time() - t0:.0f} s")
    other, _, _ = ui.txt2img("a bowl of ramen, top view", seed=99)  # an unrelated float image
    close, unrelated = psnr(quant, float_image[0]), psnr(other, float_image[0])
    print(f"quantized vs float {close:.2f} dB; unrelated image vs float {unrelated:.2f} dB")
    assert f"FidelityQuant: {calibrated}" in info
    assert close < float("inf"), "the quantized image is identical to the float one: the file had no effect"
    assert close > unrelated + 6, f"quantized image not close to float ({close:.2f} dB vs unrelated {unrelated:.2f} dB)"
    again, png, _ = ui.txt2img(PROMPT, quant_file="None")
    assert png == float_image[1], "float image changed after a quantized job"


def test_other_checkpoint_file_refused(ui, float_image, calibrated):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from quant_core.integrity import digest_of

    source = ui.quant_dir / calibrated
    with safe_open(str(source), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = dict(f.metadata())
    metadata["fingerprint"] = json.dumps({"fp16": "0" * 32, "bf16": "1" * 32})  # made for some other weights
    metadata["digest"] = digest_of({k: v for k, v in metadata.items() if k != "digest"}, tensors)  # intact
    save_file(tensors, str(ui.quant_dir / "other-model.safetensors"), metadata=metadata)
    with pytest.raises(HttpError) as info:
        ui.txt2img(PROMPT, quant_file="other-model.safetensors")
    assert "calibrated on a different checkpoint" in info.value.body
    _, png, _ = ui.txt2img(PROMPT, quant_file="None")
    assert png == float_image[1]


def test_unknown_file_refused(ui):
    with pytest.raises(HttpError) as info:
        ui.txt2img(PROMPT, quant_file="no-such-file.safetensors")
    assert "no file 'no-such-file.safetensors'" in info.value.body


def test_lora_on_quantized(ui, float_image, calibrated):
    lora_prompt = f"{PROMPT} <lora:{LORA}:1>"
    t0 = time.time()
    float_lora, _, _ = ui.txt2img(lora_prompt)
    t1 = time.time()
    quant_lora, _, info = ui.txt2img(lora_prompt, quant_file=calibrated)
    print(f"\nfloat + LoRA txt2img {t1 - t0:.0f} s; quantized + LoRA {time.time() - t1:.0f} s")
    quant = IMAGES["quant"][0] if "quant" in IMAGES else ui.txt2img(PROMPT, quant_file=calibrated)[0]
    lora_effect = psnr(float_lora, float_image[0])
    close = psnr(quant_lora, float_lora)
    gap = psnr(quant, float_image[0])
    print(f"\nLoRA effect on float {lora_effect:.2f} dB; quantized+LoRA vs float+LoRA {close:.2f} dB "
          f"(quantized vs float without LoRA {gap:.2f} dB)")
    assert lora_effect < 40, "the LoRA barely changes the float image: the test cannot see it"
    assert close < float("inf"), "quantized+LoRA is identical to float+LoRA: the quantized layers did not run"
    assert psnr(quant_lora, quant) < gap, "the LoRA had no visible effect on the quantized UNet"
    assert close > lora_effect + 3, "quantized+LoRA is not closer to float+LoRA than the LoRA's own effect"
    assert close > gap - 3, f"quantized+LoRA {close:.2f} dB much further from float+LoRA than without LoRA"
    assert f"FidelityQuant: {calibrated}" in info
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
             "denoising_strength": 0.6}

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


def test_interrupt_during_calibration_leaves_model(ui, float_image, calibrated):
    outcome = {}

    def run():
        try:
            outcome["result"] = ui.request("/fidelityquant/calibrate", dict(CALIBRATION, filename="interrupted"))
        except HttpError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.time() + 300
    while time.time() < deadline:
        progress = ui.get("/sdapi/v1/progress?skip_current_image=true")
        if (progress.get("state") or {}).get("job") and progress["state"].get("job_count", 0) > 0:
            break
        time.sleep(0.5)
    time.sleep(2)
    ui.request("/sdapi/v1/interrupt", {})
    thread.join(900)
    assert "error" in outcome, f"calibration was not interrupted: {outcome}"
    assert "interrupted" in outcome["error"].body
    assert not (ui.quant_dir / "interrupted.safetensors").exists()
    assert not [n for n in os.listdir(ui.quant_dir) if n.startswith(".") or "interrupted" in n], "a file was written"
    _, png, _ = ui.txt2img(PROMPT, quant_file="None")
    assert png == float_image[1], "float image changed after an interrupted calibration"
