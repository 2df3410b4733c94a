"""A headless ComfyUI server for the tests (COMFYUI_PATH): start, POST /prompt, wait, read /history and images.

``running_server`` starts ``main.py --cpu`` on a free loopback port with a temporary base directory whose
custom_nodes/ links this pack, and always stops it; ``small_workflow`` reads an example workflow patched to
the tiny test checkpoints. Shared by tests/test_comfyui_server.py (SD1.5, the example workflows),
tests/test_comfyui_families.py (SD2.x, SDXL) and tests/test_comfyui_faults.py.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "workflows"
PACK_DIR = "ComfyUI-FidelityQuant"
# What the server tests run the example workflows with: the tiny checkpoints sample 64x64 in 3 steps.
STEPS, SIZE = 3, 64
CALIBRATION_PROMPTS = "a red house on a hill\na blue boat on a lake"


def comfy_path() -> Path:
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        pytest.skip("COMFYUI_PATH is not set (point it at a ComfyUI checkout to run the headless-server tests)")
    if not (Path(path) / "main.py").is_file():
        pytest.skip(f"COMFYUI_PATH={path} has no main.py")
    return Path(path)


def comfyui_version(comfy_dir: Path) -> tuple:
    """(major, minor, patch) from the checkout's comfyui_version.py; (0,) when it has none."""
    found = re.search(r'__version__ = "(\d+)\.(\d+)\.(\d+)', (comfy_dir / "comfyui_version.py").read_text()
                      if (comfy_dir / "comfyui_version.py").is_file() else "")
    return tuple(int(v) for v in found.groups()) if found else (0,)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url: str, base: Path, log: Path, process: subprocess.Popen):
        self.url, self.base, self.log, self.process = url, base, log, process
        # ComfyUI 0.8.0 puts a cached node's UI output into /history only for a prompt that names a
        # client (execution.py ``execute``: ``if server.client_id is not None``); 0.3.64 always did.
        # The browser always sends one, so the tests do too.
        self.client_id = uuid.uuid4().hex

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
        return self.wait(self.post("/prompt", {"prompt": graph, "client_id": self.client_id})["prompt_id"], timeout), \
            time.monotonic() - start

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
def running_server(comfy_dir: Path, base: Path, env_overrides: dict | None = None, extra_args: tuple = ()):
    """ComfyUI headless on a free loopback port with ``base`` as its base directory; always stopped."""
    if not (base / "custom_nodes" / PACK_DIR).exists():
        (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
        os.symlink(REPO, base / "custom_nodes" / PACK_DIR, target_is_directory=True)
    env = dict(os.environ)
    env.pop("FIDELITYQUANT_NODE_API", None)
    env.update(env_overrides or {})
    if (comfy_dir / "_shims").is_dir():  # a local pure-Python torchvision, if any
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(comfy_dir / "_shims"), env.get("PYTHONPATH")]))
    port = free_port()
    log = base / "comfyui.log"
    start = time.monotonic()
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
             "--disable-auto-launch", "--base-directory", str(base), "--database-url", "sqlite:///:memory:", *extra_args],
            cwd=comfy_dir, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
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


def messages(entry: dict, event: str) -> list:
    return [data for name, data in entry["status"]["messages"] if name == event]


def node_id(graph: dict, class_type: str, title: str | None = None) -> str:
    return next(k for k, v in graph.items() if v["class_type"] == class_type and title in (None, v["_meta"]["title"]))


def succeeded(entry: dict, srv: Server) -> None:
    errors = messages(entry, "execution_error")
    assert entry["status"]["status_str"] == "success", (errors and errors[0]["exception_message"]) or srv.log_tail()


def small_workflow(stem: str, ckpt_name: str) -> dict:
    """workflows/<stem>_api.json on checkpoint ``ckpt_name``: 64x64, 3 steps, 2 calibration prompts, 2 groups."""
    graph = json.loads((WORKFLOWS / f"{stem}_api.json").read_text())
    for node in graph.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = ckpt_name
        elif kind == "EmptyLatentImage":
            inputs.update(width=SIZE, height=SIZE)
        elif kind == "KSampler":
            inputs["steps"] = STEPS
        elif kind == "FidelityQuantCalibrate":
            inputs.update(prompts=CALIBRATION_PROMPTS, steps=STEPS, width=SIZE, height=SIZE, timestep_groups=2,
                          memory_limit_mb=64)
    return graph
