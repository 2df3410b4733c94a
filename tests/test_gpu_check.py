"""bench/gpu_check.sh proven on the CPU: --dry-run runs every step at tiny shapes and writes the JSONs and
the summary; a budget too small for a step skips it (and says so) instead of cutting it off."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"


def run(*args, timeout=900):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("OUT", None)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env=env)


def status(out: Path) -> dict:
    rows = [line.split("\t") for line in (out / "status.tsv").read_text().splitlines()[1:]]
    return {row[0]: row for row in rows}


def test_dry_run_runs_every_step_and_writes_the_summary(tmp_path):
    proc = run("--dry-run", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = status(tmp_path)
    assert list(steps) == ["env", "tests", "kernels", "unet-tiny", "calibrate"]
    assert all(row[1] == "ok" for row in steps.values()), steps
    unet = json.loads((tmp_path / "unet-tiny-64.json").read_text())
    assert {r["mode"] for r in unet["records"]} == {"fp32", "bf16", "w8a8", "w4a8"}
    kernels = json.loads((tmp_path / "kernels.json").read_text())
    assert kernels["records"] and kernels["meta"]["device"] == "cpu"
    calib = json.loads((tmp_path / "calibrate-tiny.json").read_text())
    assert calib["phase_seconds"]["fit"] > 0
    summary = (tmp_path / "summary.md").read_text()
    assert summary.startswith("| step | status |")
    assert summary.count("| ok |") == 5 and "w4a8" in summary and "phases:" in summary
    if not torch.cuda.is_available():
        assert "skipped" in summary.splitlines()[3]  # tests row: the CUDA tests skip here, and the row says so


def test_a_budget_too_small_skips_steps_cleanly(tmp_path):
    proc = run("--dry-run", "--budget", "20", "--out", str(tmp_path), timeout=120)
    assert proc.returncode == 1  # not everything ran
    steps = status(tmp_path)
    assert {row[1] for row in steps.values()} == {"skipped-time"}
    assert "== env: SKIPPED (needs 30 s, " in proc.stdout
    assert (tmp_path / "summary.md").read_text().count("skipped-time") == 5


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_without_a_gpu_the_full_check_refuses_with_a_hint(tmp_path):
    proc = run("--out", str(tmp_path), timeout=120)
    assert proc.returncode == 3 and "--dry-run" in proc.stderr
