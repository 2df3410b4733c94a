#!/usr/bin/env python
"""Smoke check for the headless AUTOMATIC1111 / Forge test hosts (not a pytest test).

Starts the UI on CPU on a free 127.0.0.1 port with its API only, waits for the API, then:
  1. /sdapi/v1/txt2img twice with the same seed -> the PNG bytes must be identical;
  2. with --lora: once with `<lora:NAME:1>` in the prompt -> must differ from 1;
     then once more without it -> must be identical to 1 again (the LoRA is restored exactly);
and stops the server (its whole process group) in every case.

    source /work/hosts/a1111/env.sh && python tests/hosts/check_hosts.py --ui a1111 \
        --ckpt /work/hosts/models/fq-sd15-tiny.safetensors --lora /work/hosts/models/fq-tiny-lora.safetensors
    source /work/hosts/forge/env.sh && python tests/hosts/check_hosts.py --ui forge --ckpt ... --lora ...

The UI tree and Python come from --path/--python or A1111_PATH/A1111_PYTHON (FORGE_PATH/
FORGE_PYTHON). A1111 needs an offline HF cache for openai/clip-vit-large-patch14 (setup_a1111.sh
builds it; --hf-home or A1111_HF_HOME, default <A1111_PATH>/../hf-home). Each run uses a fresh
--data-dir (a temporary folder unless --data-dir is given), so settings never carry over.
Only the standard library is needed to run this script. Prints a JSON summary; exit 0 = pass.
"""
import argparse
import base64
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

COMMON = ["--skip-prepare-environment", "--skip-install", "--skip-torch-cuda-test", "--skip-version-check",
          "--nowebui", "--api", "--server-name", "127.0.0.1", "--no-download-sd-model", "--no-hashing"]
UI_ARGS = {
    # A1111 v1.10: CPU for every module, fp32 everywhere.
    "a1111": ["--use-cpu", "all", "--no-half", "--no-half-vae", "--precision", "full"],
    # Forge: its own memory manager; --always-cpu + --all-in-fp32.
    "forge": ["--always-cpu", "--all-in-fp32", "--do-not-download-clip"],
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url, payload=None, timeout=600):
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def sampling_speeds(log_path):
    """Seconds per sampling step of each finished job, from the sampler's tqdm bar in the log
    (the bar without the "Total progress" prefix; its elapsed time / steps)."""
    out = []
    with open(log_path, errors="replace") as f:
        text = f.read().replace("\r", "\n")
    done = True  # tqdm prints the closing line twice: count the first per job
    for line in text.split("\n"):
        if "Total progress" in line:
            continue
        if re.match(r"\s*0%\|", line):
            done = False
        m = re.match(r"\s*100%\|[^|]*\|\s*(\d+)/(\d+) \[(\d+):(\d+)<", line)
        if m and m.group(1) == m.group(2) and not done:
            done = True
            out.append(round((int(m.group(3)) * 60 + int(m.group(4))) / int(m.group(1)), 2))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ui", choices=["a1111", "forge"], required=True)
    ap.add_argument("--path", help="UI tree (default $A1111_PATH / $FORGE_PATH)")
    ap.add_argument("--python", help="UI venv python (default $A1111_PYTHON / $FORGE_PYTHON)")
    ap.add_argument("--ckpt", required=True, help="checkpoint (make_sd15_checkpoint.py; keep its .yaml beside it)")
    ap.add_argument("--lora", help="LoRA .safetensors; its folder is passed as --lora-dir")
    ap.add_argument("--hf-home", help="A1111 only: offline HF cache (default $A1111_HF_HOME or PATH/../hf-home)")
    ap.add_argument("--data-dir", help="UI --data-dir (default: a fresh temporary folder, removed afterwards)")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--sampler", default="Euler")
    ap.add_argument("--startup-timeout", type=float, default=900)
    ap.add_argument("--log", help="server log file (default DATA_DIR/server.log, printed on failure)")
    ap.add_argument("--save-images", help="folder to write the PNGs to")
    ap.add_argument("--extra-arg", action="append", default=[], help="extra UI command-line argument (repeatable)")
    args = ap.parse_args()

    up = args.ui.upper()
    path = args.path or os.environ.get(f"{up}_PATH")
    python = args.python or os.environ.get(f"{up}_PYTHON")
    if not path or not python:
        sys.exit(f"{up}_PATH and {up}_PYTHON (or --path/--python) are required; see tests/hosts/setup_{args.ui}.sh")
    path, ckpt = os.path.abspath(path), os.path.abspath(args.ckpt)

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    if args.ui == "a1111":
        env["HF_HOME"] = args.hf_home or os.environ.get("A1111_HF_HOME") or os.path.join(os.path.dirname(path), "hf-home")
    env.pop("PYTHONPATH", None)

    own_data = args.data_dir is None
    data_dir = args.data_dir or tempfile.mkdtemp(prefix=f"fq-{args.ui}-")
    log_path = args.log or os.path.join(data_dir, "server.log")
    port = args.port or free_port()
    cmd = [python, "launch.py"] + COMMON + UI_ARGS[args.ui] + [
        "--port", str(port), "--data-dir", data_dir, "--ckpt", ckpt] + args.extra_arg
    if args.lora:
        cmd += ["--lora-dir", os.path.dirname(os.path.abspath(args.lora))]
    base = f"http://127.0.0.1:{port}"
    result = {"ui": args.ui, "cmd": " ".join(cmd), "port": port, "log": log_path, "ok": False}

    result["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
    t0 = time.time()
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, cwd=path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode} before the API answered")
            if time.time() - t0 > args.startup_timeout:
                raise RuntimeError("API did not answer in time")
            try:
                models = http(base + "/sdapi/v1/sd-models", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, socket.timeout, OSError):
                time.sleep(1)
        result["api_up_s"] = round(time.time() - t0, 1)
        result["models"] = [m.get("title") for m in models]

        def txt2img(prompt, tag):
            payload = {"prompt": prompt, "negative_prompt": "", "seed": args.seed, "steps": args.steps,
                       "width": args.size, "height": args.size, "cfg_scale": 7, "sampler_name": args.sampler,
                       "batch_size": 1, "n_iter": 1, "send_images": True, "save_images": False}
            t = time.time()
            r = http(base + "/sdapi/v1/txt2img", payload, timeout=1800)
            dt = time.time() - t
            png = base64.b64decode(r["images"][0].split(",", 1)[-1])
            if args.save_images:
                os.makedirs(args.save_images, exist_ok=True)
                with open(os.path.join(args.save_images, f"{args.ui}-{tag}.png"), "wb") as f:
                    f.write(png)
            result.setdefault("calls", []).append({"tag": tag, "seconds": round(dt, 2),
                                                   "sha256": hashlib.sha256(png).hexdigest()[:16]})
            return png, dt, r

        prompt = "a photo of a red fox in the snow"
        a, dt_first, r = txt2img(prompt, "float-1")
        result["first_call_done_s"] = round(time.time() - t0, 1)
        info = json.loads(r.get("info", "{}") or "{}")
        result["infotext"] = (info.get("infotexts") or [""])[0]
        b, dt_b, _ = txt2img(prompt, "float-2")
        result["seconds_per_step_upper_bound"] = round(dt_b / args.steps, 2)
        checks = {"same_seed_identical": a == b}
        if args.lora:
            name = os.path.splitext(os.path.basename(args.lora))[0]
            c, _, rl = txt2img(prompt + f" <lora:{name}:1>", "lora")
            checks["lora_changes_image"] = c != a
            lora_info = (json.loads(rl.get("info", "{}") or "{}").get("infotexts") or [""])[0]
            checks["lora_in_infotext"] = "Lora hashes" in lora_info or name in lora_info
            d, _, _ = txt2img(prompt, "float-3")
            checks["lora_removed_identical"] = d == a
        result["checks"] = checks
        result["ok"] = all(checks.values())
    except Exception as e:  # report, then stop the server below
        result["error"] = f"{type(e).__name__}: {e}"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        result["total_s"] = round(time.time() - t0, 1)
        result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["sampling_s_per_step"] = sampling_speeds(log_path)
    if not result["ok"]:
        with open(log_path, errors="replace") as f:
            result["log_tail"] = f.read()[-4000:]
    print(json.dumps(result, indent=1))
    if own_data and result["ok"] and not args.log:
        shutil.rmtree(data_dir, ignore_errors=True)
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
