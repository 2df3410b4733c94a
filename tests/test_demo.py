"""The README's main command, `python -m quant_core demo`, at smoke-test size."""
import json

import torch

from quant_core.__main__ import main


def test_demo_runs_end_to_end_and_ours_beats_naive(tmp_path, capsys):
    torch.manual_seed(0)
    args = ["demo", "--steps", "3", "--images", "2", "--calib-prompts", "4", "--out", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "Fidelity vs the float model" in out and "naive-W4A8" in out
    assert (tmp_path / "side_by_side.png").stat().st_size > 0
    rows = {r["name"]: r for r in json.loads((tmp_path / "report.json").read_text())["variants"]}
    assert rows["W4A8"]["unet_err"] < rows["naive-W4A8"]["unet_err"]
    assert rows["W4A8"]["psnr"] > 0 and 0 < rows["W4A8"]["ssim"] <= 1
