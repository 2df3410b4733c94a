"""The README's main command, `python bench/demo.py`, at smoke-test size."""
import json

import torch

from bench.demo import main


def test_demo_runs_end_to_end_and_ours_beats_naive(tmp_path, capsys):
    torch.manual_seed(0)
    args = ["--steps", "3", "--images", "2", "--calib-prompts", "4", "--out", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "Fidelity vs the float model" in out and "naive-W4A8" in out
    assert "=== BASELINE: naive-W4A8" in out and "=== OURS: W4A8" in out  # the two reports say which is which
    assert "32x32" in out and "higher is better" in out  # what the proxy draws; what the columns mean
    assert (tmp_path / "side_by_side.png").stat().st_size > 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["columns"] == ["float (reference)", "naive-W4A8 (baseline)", "W4A8 (ours)", "|ours - float| x4"]
    rows = {r["name"]: r for r in report["variants"]}
    assert rows["W4A8"]["unet_err"] < rows["naive-W4A8"]["unet_err"]
    assert rows["W4A8"]["psnr"] > 0 and 0 < rows["W4A8"]["ssim"] <= 1
