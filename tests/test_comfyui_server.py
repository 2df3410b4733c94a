"""The example workflows through a real headless ComfyUI server (COMFYUI_PATH), as a user would run them.

A temporary base directory gets a small SD1.5-layout checkpoint with seeded random weights (UNet with
model_channels 320 / context 768 but one level, a TAESD-layout VAE, a full-size random CLIP-L, fp16),
a second UNet for the wrong-model case, and this pack in custom_nodes/ (symlink). ComfyUI runs as
``main.py --cpu --base-directory <tmp>`` on a free loopback port; the tests POST the API-format
workflows from workflows/ (patched to the tiny model: few steps, 64x64) and read /history.

Without COMFYUI_PATH only the workflow-file check runs; the rest skips with the reason.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch

from bench.tiny_models import comfy_sd15_unet
from comfyui_env import import_comfyui

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "workflows"
PACK_DIR = "ComfyUI-FidelityQuant"
NODE_IDS = ("FidelityQuantCalibrate", "FidelityQuantSave", "FidelityQuantLoad", "FidelityQuantCompare")
STEPS, SIZE = 3, 64
CALIBRATION_PROMPTS = "a red house on a hill\na blue boat on a lake"
# The quantized image must stay this close to the float one (Compare Images' mean PSNR, 8-bit 64x64).
# Measured with W8A8, 2 calibration prompts, 3 euler steps on this random-weight model: 26.2 dB (SSIM
# 0.83); the float image against its own mirror image (same statistics, unrelated content) gives 17.1 dB.
# 22 dB leaves 4 dB for BLAS / platform differences and still fails a quantized path that has lost the
# image (wrong scales, wrong timestep group, float and quantized mixed up), which lands near 17 dB.
PSNR_THRESHOLD_DB = 22.0


def _load_generator():
    spec = importlib.util.spec_from_file_location("fq_make_workflows", WORKFLOWS / "make_workflows.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_workflow_files_match_their_generator():
    """workflows/*.json are what make_workflows.py writes, and the UI and API versions are the same graph."""
    gen = _load_generator()
    for name, text in gen.files().items():
        assert (WORKFLOWS / name).read_text() == text, f"{name} is stale: run python workflows/make_workflows.py"
    for stem in gen.GRAPHS:
        ui = json.loads((WORKFLOWS / f"{stem}.json").read_text())
        api = json.loads((WORKFLOWS / f"{stem}_api.json").read_text())
        assert {str(n["id"]) for n in ui["nodes"]} == set(api)
        for link_id, src, src_slot, dst, dst_slot, _ in ui["links"]:
            node = next(n for n in ui["nodes"] if n["id"] == dst)
            assert node["inputs"][dst_slot]["link"] == link_id
            assert api[str(dst)]["inputs"][node["inputs"][dst_slot]["name"]] == [str(src), src_slot]
        assert (WORKFLOWS / "README.md").read_text().count(f"`{stem}") >= 1, f"workflows/README.md omits {stem}"


# --- server fixture ----------------------------------------------------------------------------------------

def _comfy_path() -> Path:
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        pytest.skip("COMFYUI_PATH is not set (point it at a ComfyUI checkout to run the headless-server tests)")
    if not (Path(path) / "main.py").is_file():
        pytest.skip(f"COMFYUI_PATH={path} has no main.py")
    return Path(path)


def _random_state(module: torch.nn.Module, seed: int, gain: float = 1.0) -> dict:
    """Seeded random fp16 values for every tensor of ``module`` (built on the meta device)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in module.state_dict().items():
        if t.dim() == 1 and "norm" in name and name.endswith("weight"):
            value = 1 + 0.1 * torch.randn(t.shape, generator=gen)
        elif name.endswith("bias"):
            value = 0.02 * torch.randn(t.shape, generator=gen)
        else:
            fan_in = max(1, t[0].numel()) if t.dim() > 1 else 1
            value = torch.randn(t.shape, generator=gen) * gain / fan_in ** 0.5
        out[name] = value.to(torch.float16)
    return out


def _tiny_unet(ops, device="meta"):
    return comfy_sd15_unet(seed=None, operations=ops, device=device)  # weights: _random_state


def _write_models(comfy_path: Path, models: Path) -> None:
    """models/checkpoints/tiny_sd15.safetensors (UNet + TAESD + CLIP-L) and models/diffusion_models/other_unet."""
    import_comfyui("the headless-server tests", "comfy.clip_model", "comfy.ops", "comfy.taesd.taesd")
    import comfy
    from safetensors.torch import save_file

    ops = comfy.ops.disable_weight_init
    unet = _random_state(_tiny_unet(ops), seed=0)
    # CLIP-L keeps all 12 layers: ComfyUI builds the text encoder from a fixed config and leaves
    # missing layers uninitialised (torch.empty), so a shortened one would give garbage conditioning.
    config = json.loads((comfy_path / "comfy" / "sd1_clip_config.json").read_text())
    clip = _random_state(comfy.clip_model.CLIPTextModel(config, torch.float16, "meta", ops), seed=1)
    clip.pop("text_projection.weight")  # SD1.5 checkpoints have none (ComfyUI tolerates its absence)
    with torch.device("meta"):
        taesd_meta = comfy.taesd.taesd.TAESD()
    taesd = _random_state(taesd_meta, seed=2, gain=2 ** 0.5)  # ReLU network: He scaling keeps the signal alive
    # the scale/shift ComfyUI's own VAELoader gives SD1 TAESD (nodes.py:752-754)
    taesd["vae_scale"], taesd["vae_shift"] = torch.tensor(0.18215), torch.tensor(0.0)
    # Put the decoder's output in the middle of [0, 1] so images are not clipped flat (which would make
    # any two images look alike): rescale the last conv to output std 0.12 around 0.5 on random latents
    # of std 2. Sampled latents come out wider: the float image has std ~55/255 with 5.6% of its values
    # clipped (a first try at 0.2 on std-1 latents clipped 39%).
    decoder = comfy.taesd.taesd.Decoder()
    decoder.load_state_dict({k[len("taesd_decoder."):]: v.float() for k, v in taesd.items()
                             if k.startswith("taesd_decoder.")})
    with torch.no_grad():
        probe = decoder(torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)) * 2)
    last = max((k for k in taesd if k.startswith("taesd_decoder.") and k.endswith(".weight")),
               key=lambda k: int(k.split(".")[1]))
    taesd[last] = (taesd[last].float() * 0.12 / float(probe.std())).half()
    taesd[last.replace(".weight", ".bias")] = (taesd[last.replace(".weight", ".bias")].float()
                                               - float(probe.mean()) * 0.12 / float(probe.std()) + 0.5).half()
    # TAESD.decode maps decoder output d to 2d - 1 and ComfyUI's process_output maps back to d, clamped.

    checkpoint = {**{"model.diffusion_model." + k: v for k, v in unet.items()},
                  **{"first_stage_model." + k: v for k, v in taesd.items()},
                  **{"cond_stage_model.transformer." + k: v for k, v in clip.items()}}
    (models / "checkpoints").mkdir(parents=True)
    save_file(checkpoint, str(models / "checkpoints" / "tiny_sd15.safetensors"))
    # a kohya-named LoRA (rank 8, each delta 0.25 x its weight's norm) on the attention and feed-forward linears
    gen = torch.Generator().manual_seed(4)
    lora = {}
    for key, w in unet.items():
        if ".transformer_blocks." in key and key.endswith(".weight") and w.dim() == 2:
            name = "lora_unet_" + key[: -len(".weight")].replace(".", "_")
            down = torch.randn(8, w.shape[1], generator=gen) / w.shape[1] ** 0.5
            up = torch.randn(w.shape[0], 8, generator=gen)
            up *= 0.25 * float(w.float().norm()) / float((up @ down).norm())
            lora.update({f"{name}.lora_up.weight": up.half(), f"{name}.lora_down.weight": down.half(),
                         f"{name}.alpha": torch.tensor(8.0)})
    (models / "loras").mkdir(parents=True)
    save_file(lora, str(models / "loras" / "tiny_lora.safetensors"))
    (models / "diffusion_models").mkdir(parents=True)
    save_file(_random_state(_tiny_unet(ops), seed=10), str(models / "diffusion_models" / "other_unet.safetensors"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url: str, base: Path, log: Path, process: subprocess.Popen):
        self.url, self.base, self.log, self.process = url, base, log, process

    def get(self, path: str, raw: bool = False):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            body = response.read()
        return body if raw else json.loads(body)

    def post(self, path: str, data: dict):
        request = urllib.request.Request(self.url + path, data=json.dumps(data).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                body = response.read()
                return json.loads(body) if body else None
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"POST {path} -> {exc.code}: {exc.read().decode()[:2000]}") from exc

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def run(self, graph: dict, timeout: float = 900) -> tuple[dict, float]:
        """Queue ``graph``; wait for it; -> (history entry, wall seconds)."""
        start = time.monotonic()
        return self.wait(self.post("/prompt", {"prompt": graph})["prompt_id"], timeout), time.monotonic() - start

    def wait(self, prompt_id: str, timeout: float = 900) -> dict:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id]["status"].get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"]["status_str"] in ("success", "error"):
                    return entry
            if self.process.poll() is not None:
                raise AssertionError(f"ComfyUI exited ({self.process.returncode}):\n{self.log_tail()}")
            time.sleep(0.5)
        raise AssertionError(f"prompt {prompt_id} did not finish in {timeout} s:\n{self.log_tail()}")

    def image(self, ref: dict):
        from PIL import Image

        query = urllib.parse.urlencode({k: ref[k] for k in ("filename", "subfolder", "type")})
        return torch.frombuffer(bytearray(Image.open(io.BytesIO(self.get(f"/view?{query}", raw=True)))
                                          .convert("RGB").tobytes()), dtype=torch.uint8)


@contextlib.contextmanager
def _running_server(comfy_path: Path, base: Path, env_overrides: dict | None = None):
    """ComfyUI headless on a free loopback port with ``base`` as its base directory; always stopped."""
    if not (base / "custom_nodes" / PACK_DIR).exists():
        (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
        os.symlink(REPO, base / "custom_nodes" / PACK_DIR, target_is_directory=True)
    env = dict(os.environ)
    env.pop("FIDELITYQUANT_NODE_API", None)
    env.update(env_overrides or {})
    if (comfy_path / "_shims").is_dir():  # a local pure-Python torchvision, if any
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(comfy_path / "_shims"), env.get("PYTHONPATH")]))
    port = _free_port()
    log = base / "comfyui.log"
    start = time.monotonic()
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
             "--disable-auto-launch", "--base-directory", str(base), "--database-url", "sqlite:///:memory:"],
            cwd=comfy_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    srv = Server(f"http://127.0.0.1:{port}", base, log, process)
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"ComfyUI exited during start-up ({process.returncode}):\n{srv.log_tail()}")
            try:
                srv.get("/system_stats")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() - start > 180:
                    pytest.fail(f"ComfyUI did not answer within 180 s:\n{srv.log_tail()}")
                time.sleep(0.5)
        print(f"\nComfyUI answered {time.monotonic() - start:.1f} s after launch (port {port})")
        yield srv
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=20)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    comfy_path = _comfy_path()
    base = tmp_path_factory.mktemp("comfy_base")
    start = time.monotonic()
    _write_models(comfy_path, base / "models")
    print(f"\ntest models written in {time.monotonic() - start:.1f} s")
    try:
        with _running_server(comfy_path, base) as srv:
            yield srv
    finally:
        shutil.rmtree(base / "models", ignore_errors=True)  # ~0.35 GB of weights


def _api(stem: str) -> dict:
    """An API-format example workflow, patched to the tiny model: 64x64, 3 steps, 2 calibration prompts."""
    graph = json.loads((WORKFLOWS / f"{stem}_api.json").read_text())
    for node in graph.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = "tiny_sd15.safetensors"
        elif kind == "EmptyLatentImage":
            inputs.update(width=SIZE, height=SIZE)
        elif kind == "KSampler":
            inputs["steps"] = STEPS
        elif kind == "FidelityQuantCalibrate":
            inputs.update(prompts=CALIBRATION_PROMPTS, steps=STEPS, width=SIZE, height=SIZE, timestep_groups=2,
                          memory_limit_mb=64)
    return graph


def _messages(entry: dict, event: str) -> list:
    return [data for name, data in entry["status"]["messages"] if name == event]


def _node_id(graph: dict, class_type: str, title: str | None = None) -> str:
    return next(k for k, v in graph.items() if v["class_type"] == class_type and title in (None, v["_meta"]["title"]))


def _succeeded(entry: dict, srv: Server) -> None:
    errors = _messages(entry, "execution_error")
    assert entry["status"]["status_str"] == "success", (errors and errors[0]["exception_message"]) or srv.log_tail()


# --- tests -------------------------------------------------------------------------------------------------

def test_nodes_are_registered_through_the_v3_api(server):
    info = server.get("/object_info")
    gen = _load_generator()
    for node_id in NODE_IDS:
        assert node_id in info, f"{node_id} missing from /object_info:\n{server.log_tail()}"
        node = info[node_id]
        assert node["category"] == "FidelityQuant" and node["python_module"] == f"custom_nodes.{PACK_DIR}"
        # V3 classes are described by Schema.get_v1_info, which always has these keys; a V1 class's
        # description (server.py node_info) only has "deprecated"/"experimental" when they are True.
        assert node["deprecated"] is False and node["experimental"] is False, "loaded through the V1 API"
    # The workflow generator's node signatures match the live server (core nodes and ours).
    for class_type, (links, widgets, outputs) in gen.SIGNATURES.items():
        node = info[class_type]
        required = node["input_order"]["required"]
        assert [w for w in widgets if w not in gen.UI_ONLY_WIDGETS] == [n for n in required if n not in dict(links)]
        assert [n for n in required if n in dict(links)] == [name for name, _ in links]
        assert list(node["output"]) == [kind for _, kind in outputs], class_type


def test_web_extension_is_served(server):
    listed = server.get("/extensions")
    path = f"/extensions/{PACK_DIR}/fidelityquant.js"
    assert path in listed, listed
    assert server.get(path, raw=True).decode() == (REPO / "web" / "fidelityquant.js").read_text()


@pytest.fixture(scope="module")
def workflow1(server):
    graph = _api("1_calibrate_and_compare")
    entry, seconds = server.run(graph)
    _succeeded(entry, server)
    print(f"\nworkflow 1 (calibrate + 2 samplers + compare): {seconds:.1f} s")
    return graph, entry, seconds


def test_workflow1_quantized_close_to_float(server, workflow1):
    graph, entry, _ = workflow1
    outputs = entry["outputs"]
    report = outputs[_node_id(graph, "FidelityQuantCalibrate")]["text"][0]
    assert "W8A8" in report and "timestep groups: 2" in report, report
    print(f"\ncalibration report:\n{report}")
    compare = outputs[_node_id(graph, "FidelityQuantCompare")]["text"][0]
    psnr = float(re.search(r"mean: PSNR ([\d.]+) dB", compare).group(1))
    print(f"\nCompare Images (quantized vs float): {compare}")
    quant = server.image(outputs[_node_id(graph, "SaveImage", "Save (quantized)")]["images"][0]).float()
    ref = server.image(outputs[_node_id(graph, "SaveImage", "Save (float)")]["images"][0]).float()
    assert quant.numel() == ref.numel() == SIZE * SIZE * 3
    # The images carry signal (not clipped flat), so a high PSNR is earned, and they are not identical,
    # so the quantized path really ran.
    assert ref.std() > 20 and float(((ref == 0) | (ref == 255)).float().mean()) < 0.2
    assert not torch.equal(quant, ref)
    flipped = ref.view(SIZE, SIZE, 3).flip(1).reshape(-1)  # an unrelated image with the same statistics
    print(f"PSNR float vs its mirror image: {10 * torch.log10(255.0 ** 2 / (flipped - ref).pow(2).mean()):.2f} dB; "
          f"clipped pixels {float(((ref == 0) | (ref == 255)).float().mean()):.3f}, std {float(ref.std()):.1f}")
    mse = float((quant - ref).pow(2).mean())
    assert abs(10 * torch.log10(torch.tensor(255.0 ** 2 / mse)) - psnr) < 1.0  # the node's figure is real
    assert psnr > PSNR_THRESHOLD_DB, compare


def test_requeue_does_not_recalibrate(server, workflow1):
    graph, first, first_seconds = workflow1
    entry, seconds = server.run(graph)
    _succeeded(entry, server)
    cached = _messages(entry, "execution_cached")[0]["nodes"]
    calibrate = _node_id(graph, "FidelityQuantCalibrate")
    print(f"\nre-queued workflow 1: {seconds:.1f} s (first run {first_seconds:.1f} s); cached nodes {sorted(cached)}")
    assert calibrate in cached and set(cached) == set(graph)
    assert seconds < first_seconds / 3
    # the cached node's report is still in the history (and sent to the UI)
    assert entry["outputs"][calibrate]["text"] == first["outputs"][calibrate]["text"]


@pytest.fixture(scope="module")
def saved_file(server, workflow1):
    graph = _api("3_calibrate_and_save")
    entry, seconds = server.run(graph)
    _succeeded(entry, server)
    text = entry["outputs"][_node_id(graph, "FidelityQuantSave")]["text"][0]
    name = text.removeprefix("saved ")
    assert (server.base / "models" / "fidelity_quant" / name).is_file(), text
    # Same calibration inputs as workflow 1: ComfyUI's cache hands over that result instead of recalibrating.
    assert _node_id(graph, "FidelityQuantCalibrate") in _messages(entry, "execution_cached")[0]["nodes"]
    print(f"\nworkflow 3 (save): {seconds:.1f} s -> {name}")
    return name


def test_save_then_load_gives_identical_output(server, workflow1, saved_file):
    graph = _api("2_load_quantized")
    graph[_node_id(graph, "FidelityQuantLoad")]["inputs"]["file"] = saved_file
    entry, seconds = server.run(graph)
    _succeeded(entry, server)
    print(f"\nworkflow 2 (load + sample): {seconds:.1f} s")
    assert "W8A8" in entry["outputs"][_node_id(graph, "FidelityQuantLoad")]["text"][0]
    loaded = server.image(entry["outputs"][_node_id(graph, "SaveImage")]["images"][0])
    g1, e1, _ = workflow1
    calibrated = server.image(e1["outputs"][_node_id(g1, "SaveImage", "Save (quantized)")]["images"][0])
    assert torch.equal(loaded, calibrated)


def test_loading_a_file_made_for_another_model_fails_clearly(server, saved_file):
    graph = _api("2_load_quantized")
    load = _node_id(graph, "FidelityQuantLoad")
    graph[load]["inputs"]["file"] = saved_file
    graph["99"] = {"class_type": "UNETLoader", "inputs": {"unet_name": "other_unet.safetensors",
                                                          "weight_dtype": "default"}, "_meta": {"title": "other"}}
    graph[load]["inputs"]["model"] = ["99", 0]
    entry, _ = server.run(graph)
    assert entry["status"]["status_str"] == "error"
    error = _messages(entry, "execution_error")[0]
    assert error["node_id"] == load and "different checkpoint" in error["exception_message"], error


def test_v1_fallback_registers_and_runs(tmp_path):
    """FIDELITYQUANT_NODE_API=v1 (what ComfyUI without comfy_api.latest gets): the V1 classes load and run."""
    with _running_server(_comfy_path(), tmp_path, {"FIDELITYQUANT_NODE_API": "v1"}) as srv:
        info = srv.get("/object_info")
        for node_id in NODE_IDS:
            assert node_id in info, f"{node_id} missing from /object_info:\n{srv.log_tail()}"
            assert "deprecated" not in info[node_id]  # described by server.py node_info, i.e. a V1 class
        graph = {"1": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 2,
                                                              "color": 0x808080}},
                 "2": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 2,
                                                              "color": 0x848484}},
                 "3": {"class_type": "FidelityQuantCompare", "inputs": {"reference": ["1", 0], "images": ["2", 0]}}}
        entry, _ = srv.run(graph)
        _succeeded(entry, srv)
        report = entry["outputs"]["3"]["text"][0]  # Compare is an output node: it runs with nothing downstream
        psnr = [float(v) for v in re.findall(r"image \d: PSNR ([\d.]+) dB", report)]
        assert len(psnr) == 2 and all(abs(v - 36.09) < 0.05 for v in psnr), report  # 4/255 everywhere: 20 log10(255/4)


def test_cancelled_calibration_leaves_the_float_model_intact(server, workflow1):
    """Cancel (POST /interrupt) while Calibrate & Quantize runs; the float MODEL then samples exactly as before."""
    graph = _api("3_calibrate_and_save")
    calibrate = _node_id(graph, "FidelityQuantCalibrate")
    graph[calibrate]["inputs"]["seed"] = 7  # not in the cache: calibrates anew
    prompt_id = server.post("/prompt", {"prompt": graph})["prompt_id"]
    deadline = time.monotonic() + 60
    while not any(item[1] == prompt_id for item in server.get("/queue")["queue_running"]):
        assert time.monotonic() < deadline, "the prompt never started"
        time.sleep(0.1)
    time.sleep(3)  # the checkpoint is cached: by now the calibration is encoding prompts or sampling
    asked = time.time()
    server.post("/interrupt", {"prompt_id": prompt_id})
    entry = server.wait(prompt_id)
    interrupted = _messages(entry, "execution_interrupted")
    assert interrupted and interrupted[0]["node_type"] == "FidelityQuantCalibrate", entry["status"]
    print(f"\ncalibration stopped {interrupted[0]['timestamp'] / 1000 - asked:.1f} s after POST /interrupt")

    g1, e1, _ = workflow1
    keep = {"CheckpointLoaderSimple", "CLIPTextEncode", "EmptyLatentImage"}
    float_only = {k: v for k, v in g1.items() if v["class_type"] in keep or v["_meta"]["title"] in
                  ("KSampler (float)", "Decode (float)", "Save (float)")}
    entry, _ = server.run(float_only)
    _succeeded(entry, server)
    save = _node_id(float_only, "SaveImage", "Save (float)")
    assert save not in _messages(entry, "execution_cached")[0]["nodes"]  # really sampled again
    assert torch.equal(server.image(entry["outputs"][save]["images"][0]),
                       server.image(e1["outputs"][save]["images"][0]))


def test_lora_on_the_quantized_model_in_the_server(server, workflow1):
    """Workflow 1 with LoraLoaderModelOnly after Calibrate & Quantize and on the float branch: ComfyUI merges
    the LoRA into our layers inside its server (under torch.inference_mode), every LoRA key lands, the
    LoRA changes the image, and quantized+LoRA stays as close to float+LoRA as without the LoRA."""
    graph = _api("1_calibrate_and_compare")
    for node_id, source in (("20", "5"), ("21", "1")):
        graph[node_id] = {"class_type": "LoraLoaderModelOnly", "_meta": {"title": f"LoRA {node_id}"},
                          "inputs": {"model": [source, 0], "lora_name": "tiny_lora.safetensors", "strength_model": 1.0}}
    graph[_node_id(graph, "KSampler", "KSampler (quantized)")]["inputs"]["model"] = ["20", 0]
    graph[_node_id(graph, "KSampler", "KSampler (float)")]["inputs"]["model"] = ["21", 0]
    log_before = len(server.log_tail(10**9))
    entry, seconds = server.run(graph)
    _succeeded(entry, server)
    assert "lora key not loaded" not in server.log_tail(10**9)[log_before:]
    g1, e1, _ = workflow1
    quant = server.image(entry["outputs"][_node_id(graph, "SaveImage", "Save (quantized)")]["images"][0]).float()
    plain = server.image(e1["outputs"][_node_id(g1, "SaveImage", "Save (quantized)")]["images"][0]).float()
    assert not torch.equal(quant, plain)  # the LoRA took effect on the quantized model
    compare = entry["outputs"][_node_id(graph, "FidelityQuantCompare")]["text"][0]
    psnr = float(re.search(r"mean: PSNR ([\d.]+) dB", compare).group(1))
    print(f"\nworkflow 1 + LoRA on both branches: {seconds:.1f} s; quantized+LoRA vs float+LoRA: {compare}")
    assert psnr > PSNR_THRESHOLD_DB, compare
