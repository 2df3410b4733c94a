"""A real diffusers StableDiffusionPipeline (small, seeded) calibrated end to end, and the CLI on a saved folder."""
import pytest
import torch

from quant_core import artifact
from quant_core.__main__ import main as cli_main
from quant_core.config import preset
from quant_core.models.modeltree import weights_digest
from quant_core import quantize
from quant_core.models.runners import DiffusersRunner

from tiny_pipelines import make_tiny_sd_pipeline

PROMPTS = ["a red cat on a mat", "a blue house by the sea"]


@pytest.fixture(scope="module")
def pipe():
    return make_tiny_sd_pipeline(seed=0)


def _no_hooks(module):
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in module.modules())


@pytest.mark.parametrize("name", ["W8A8", "W4A8", "W4A8-mixed"])
def test_pipeline_presets_end_to_end(pipe, name):
    runner = DiffusersRunner(pipe, PROMPTS, steps=4, guidance_scale=5.0, seed=0)
    digest = weights_digest(pipe.unet)
    float_unet = pipe.unet
    result = quantize(pipe.unet, runner, preset(name, workers=1))
    assert pipe.unet is float_unet and _no_hooks(float_unet) and weights_digest(float_unet) == digest
    images_float = runner.images(float_unet)
    images_quant = runner.images(result.apply(float_unet))
    assert images_quant.shape == images_float.shape and torch.isfinite(images_quant).all()
    assert pipe.unet is float_unet and weights_digest(float_unet) == digest
    steps = result.report["fidelity"]["unet_rel_error_per_step"]
    assert len(steps) == 4 and all(v < 1.0 for v in steps.values())


def test_cli_quantize_writes_a_loadable_file(pipe, tmp_path):
    folder = tmp_path / "model"
    pipe.save_pretrained(folder, safe_serialization=True)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "q.safetensors"
    args = ["quantize", "--model", str(folder), "--prompts", str(prompts), "--preset", "W4A8",
            "--out", str(out), "--steps", "3", "--groups", "2"]
    assert cli_main(args) == 0
    result = artifact.load_result(out, pipe.unet)  # the saved folder holds the same weights
    assert result.config.weight_bits == 4 and len(result.step_groups) <= 2
    with pytest.raises(SystemExit, match="exists"):
        cli_main(args)
    (tmp_path / "empty.txt").write_text("\n# only a comment\n")
    with pytest.raises(SystemExit, match="no prompts"):
        cli_main(["quantize", "--model", str(folder), "--prompts", str(tmp_path / "empty.txt"),
                  "--out", str(tmp_path / "x.safetensors")])
