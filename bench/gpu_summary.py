"""Summary table of a bench/gpu_check.sh run: every step's status and time, and the main figures of its JSON.

    python bench/gpu_summary.py OUT_DIR > OUT_DIR/summary.md

Reads OUT_DIR/status.tsv (written by gpu_check.sh) and the JSON each step names. A step that was skipped,
timed out or failed is listed as such; a JSON it left behind is not trusted.
"""
from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _tests(path: Path) -> str:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return "no JUnit file"
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    get = (lambda k: int(suite.get(k, 0))) if suite is not None else (lambda k: 0)
    run = get("tests") - get("skipped")
    return f"{run - get('failures') - get('errors')}/{run} passed, {get('skipped')} skipped"


def _kernels(data: dict) -> str:
    rows = [r for r in data.get("records", []) if r.get("mode") in ("w8a8", "w4a8") and not r.get("keep_unpacked")]
    parts = [f"{r['name']} {r['mode']} {r['ratio_vs_fp32']:.2f}x fp32 ({r['backend']})" for r in rows[:8]]
    return "; ".join(parts) or "no records"


def _unet(data: dict) -> str:
    meta = data.get("meta", {})
    half = "fp16" if meta.get("device") == "cuda" else "bf16"
    parts = []
    for r in data.get("records", []):
        ratio = r.get(f"speedup_vs_{half}")
        compiled = f", {r.get('speedup_vs_eager', float('nan')):.2f}x eager, compile {r['compile_s']:.0f} s" if r.get("compiled") else ""
        parts.append(f"{r['mode']} {r['s_per_step']:.3f} s/step" + (f" ({ratio:.2f}x {half}{compiled})" if ratio else ""))
    return f"{meta.get('arch')} {meta.get('res')}px: " + "; ".join(parts)


def _calibrate(data: dict) -> str:
    phases = data.get("phase_seconds") or {}
    text = ", ".join(f"{k} {v:.1f} s" for k, v in phases.items())
    errors = data.get("unet_rel_error") or {}
    err = ", ".join(f"{k} rel err {v:.4f}" for k, v in errors.items())
    return f"phases: {text or 'none'}; plain sampling {data.get('plain_sampling_seconds', float('nan')):.1f} s; {err}"


def describe(name: str, path: Path) -> str:
    if name == "tests":
        return _tests(path)
    data = _load(path)
    if data is None:
        return "no JSON"
    if name == "env":
        return ", ".join(f"{k} {v}" for k, v in data.items())
    if name == "kernels":
        return _kernels(data)
    if name.startswith("unet"):
        return _unet(data)
    if name == "calibrate":
        return _calibrate(data)
    return ""


def main(argv=None) -> int:
    out = Path((argv or sys.argv[1:])[0])
    lines = (out / "status.tsv").read_text().splitlines()[1:]
    print("| step | status | seconds | budget | figures |")
    print("|---|---|---|---|---|")
    for line in lines:
        name, status, seconds, budget, file = line.split("\t")
        figures = describe(name, out / file) if status == "ok" else "(see the step's log)"
        print(f"| {name} | {status} | {seconds} | {budget} | {figures} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
