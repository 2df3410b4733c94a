"""Start a headless AUTOMATIC1111 / Forge with this repository as an extension, for the extension tests.

The UI runs on CPU on a free 127.0.0.1 port with its API only (the arguments of tests/hosts/check_hosts.py),
a fresh ``--data-dir`` whose ``extensions/fidelityquant`` is a symlink to this checkout, the small seeded
SD1.5-layout checkpoint and its LoRA (tests/hosts/make_sd15_checkpoint.py). Found through
``A1111_PATH`` / ``A1111_PYTHON`` (``FORGE_PATH`` / ``FORGE_PYTHON``) and ``FQ_HOST_MODELS`` (default
/work/hosts/models/small); tests skip with the reason when any is missing.
"""
from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
COMMON = ["--skip-prepare-environment", "--skip-install", "--skip-torch-cuda-test", "--skip-version-check",
          "--nowebui", "--api", "--server-name", "127.0.0.1", "--no-download-sd-model", "--no-hashing"]
UI_ARGS = {"a1111": ["--use-cpu", "all", "--no-half", "--no-half-vae", "--precision", "full"],
           "forge": ["--always-cpu", "--all-in-fp32", "--do-not-download-clip"]}
CKPT = "fq-sd15-tiny.safetensors"
LORA = "fq-tiny-lora"


def missing(ui: str) -> str | None:
    """Why the ``ui`` tests cannot run here, or None."""
    up = ui.upper()
    for var in (f"{up}_PATH", f"{up}_PYTHON"):
        if not os.environ.get(var):
            return f"{var} is not set (build the host with tests/hosts/setup_{ui}.sh and source its env.sh)"
    models = Path(os.environ.get("FQ_HOST_MODELS", "/work/hosts/models/small"))
    if not (models / CKPT).is_file():
        return f"no test checkpoint {models / CKPT} (tests/hosts/make_sd15_checkpoint.py --small; or set FQ_HOST_MODELS)"
    return None


class HttpError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:2000]}")
        self.status, self.body = status, body


class WebUI:
    def __init__(self, ui: str, data_dir: Path) -> None:
        self.ui, self.data_dir = ui, Path(data_dir)
        up = ui.upper()
        self.path, self.python = os.environ[f"{up}_PATH"], os.environ[f"{up}_PYTHON"]
        self.models = Path(os.environ.get("FQ_HOST_MODELS", "/work/hosts/models/small"))
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = self.data_dir / "server.log"
        self.quant_dir = self.data_dir / "models" / "fidelity_quant"
        self.proc = None

    def start(self, timeout: float = 600) -> float:
        (self.data_dir / "extensions").mkdir(parents=True, exist_ok=True)
        os.symlink(REPO, self.data_dir / "extensions" / "fidelityquant")
        self.quant_dir.mkdir(parents=True, exist_ok=True)
        # Two threads, whatever the caller set: with OMP_NUM_THREADS=1, A1111 v1.10 (torch 2.1.2) samples NaNs with
        # the test checkpoint here (tests/hosts/check_hosts.py fails the same way; with 2 threads it passes).
        threads = os.environ.get("FQ_HOST_THREADS", "2")
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
                   OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        if self.ui == "a1111":
            env["HF_HOME"] = os.environ.get("A1111_HF_HOME") or str(Path(self.path).parent / "hf-home")
        env.pop("PYTHONPATH", None)
        cmd = [self.python, "launch.py", *COMMON, *UI_ARGS[self.ui], "--port", str(self.port), "--data-dir",
               str(self.data_dir), "--ckpt", str(self.models / CKPT), "--lora-dir", str(self.models)]
        self._log = open(self.log_path, "w")
        t0 = time.time()
        self.proc = subprocess.Popen(cmd, cwd=self.path, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.ui} exited with {self.proc.returncode} before its API answered:\n"
                                   + self.log_tail())
            if time.time() - t0 > timeout:
                raise RuntimeError(f"{self.ui} API did not answer in {timeout} s:\n" + self.log_tail())
            try:
                self.get("/sdapi/v1/sd-models", timeout=5)
                return time.time() - t0
            except (urllib.error.URLError, ConnectionError, socket.timeout, OSError):
                time.sleep(1)

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._log.close()
        self.proc = None

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def request(self, route: str, payload=None, timeout: float = 1800):
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.base + route, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:
            raise HttpError(exc.code, exc.read().decode(errors="replace")) from None

    def get(self, route: str, timeout: float = 60):
        return self.request(route, None, timeout)

    def txt2img(self, prompt: str, quant_file: str | None = None, seed: int = 1234, size: int = 256, steps: int = 4,
                **extra):
        """-> (image as float array HxWx3 in [0, 255], PNG bytes, infotext) of the first image."""
        return self.txt2img_all(prompt, quant_file, seed, size, steps, **extra)[0]

    def img2img(self, prompt: str, init_png: bytes, quant_file: str | None = None, denoising_strength: float = 0.6,
                **extra):
        """-> (image, PNG bytes, infotext) of img2img from ``init_png`` (same defaults as txt2img)."""
        init = "data:image/png;base64," + base64.b64encode(init_png).decode()
        return self.txt2img_all(prompt, quant_file, route="/sdapi/v1/img2img", init_images=[init],
                                denoising_strength=denoising_strength, **extra)[0]

    def txt2img_all(self, prompt: str, quant_file: str | None = None, seed: int = 1234, size: int = 256,
                    steps: int = 4, route: str = "/sdapi/v1/txt2img", **extra) -> list:
        """-> [(image, PNG bytes, infotext)] for every image of the job (no grid)."""
        payload = {"prompt": prompt, "negative_prompt": "", "seed": seed, "steps": steps, "width": size,
                   "height": size, "cfg_scale": 7, "sampler_name": "Euler", "batch_size": 1, "n_iter": 1,
                   "send_images": True, "save_images": False, "do_not_save_grid": True, **extra}
        if quant_file is not None:
            payload["alwayson_scripts"] = {"FidelityQuant": {"args": [quant_file]}}
        r = self.request(route, payload)
        infotexts = json.loads(r.get("info") or "{}").get("infotexts") or []
        out = []
        for i, image in enumerate(r["images"]):
            png = base64.b64decode(image.split(",", 1)[-1])
            out.append((decode(png), png, infotexts[i] if i < len(infotexts) else ""))
        return out


def decode(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
