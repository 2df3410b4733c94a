"""Files written before the quant_core reshape (FidelityQuant 0.1.0, file format 1) still load and run the same.

tests/data/fq_v010_tiny_sd1_w4a8.safetensors was saved by the 0.1.0 code (tests/data/make_v010_file.py)
from the seeded tiny SD1 UNet; the expected file holds that version's quantized UNet outputs for fixed inputs
at a calibrated timestep and an unseen one.
"""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quant_core import load
from quant_core.artifact import MissingDigestWarning
from unets import tiny_unet

DATA = Path(__file__).parent / "data"


def test_a_file_saved_by_0_1_0_loads_and_gives_the_same_outputs():
    unet = tiny_unet("sd1", seed=0)
    with pytest.warns(MissingDigestWarning, match="no integrity digest"):  # 0.1.0 wrote no digest
        calibration = load(DATA / "fq_v010_tiny_sd1_w4a8.safetensors", unet)
    assert calibration.layout == "diffusers" and calibration.sd_version == "sd1"
    assert calibration.config.weight_bits == 4 and len(calibration.step_groups) == 2
    expected = load_file(str(DATA / "fq_v010_tiny_sd1_w4a8_expected.safetensors"))
    model = calibration.apply(unet)
    with torch.no_grad():
        for i, t in enumerate((expected["t0"][0], torch.tensor(321.0))):
            out = model(expected["x"], t, encoder_hidden_states=expected["ctx"]).sample
            assert torch.equal(out, expected[f"out{i}"]), f"output {i} differs from 0.1.0's"
