"""The CLI on single-file checkpoints (SD1.x end to end on a tiny seeded file; SD2.x / SDXL / refiner / other
files by their headers) and its --bits-budget option. Everything offline: configs come from a local folder
or a (faked) Hugging Face cache, never the network."""
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import save_file

from quant_core import artifact
from quant_core.__main__ import main
from quant_core.models import single_file
from single_file_checkpoint import sd1_checkpoint
from tiny_pipelines import make_tiny_sd_pipeline


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """(pipeline, checkpoint path, config folder): the config folder has configs and tokenizer, no weights."""
    root = tmp_path_factory.mktemp("single_file")
    pipe = make_tiny_sd_pipeline(seed=0)
    pipe.save_pretrained(root / "config", safe_serialization=True)
    for weights in (root / "config").rglob("*.safetensors"):
        weights.unlink()
    save_file(sd1_checkpoint(pipe), root / "model.safetensors")
    return pipe, root / "model.safetensors", root / "config"


def _cli(capsys, *args):
    capsys.readouterr()
    try:
        code = main(["quantize", *args])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    said = code if isinstance(code, str) else "\n".join(l for l in err.splitlines() if l.startswith("error:"))
    return code, said.strip()


def _header_file(path, keys):
    save_file({k: torch.zeros(shape) for k, shape in keys.items()}, path)
    return path


UNET_KEYS = {"model.diffusion_model.input_blocks.0.0.weight": (32, 4, 3, 3),
             "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (32, 768)}


def test_loader_rebuilds_every_component_exactly(sd1):
    pipe, path, config = sd1
    loaded = single_file.load_single_file_pipeline(path, config=config)
    assert type(loaded).__name__ == "StableDiffusionPipeline" and loaded.safety_checker is None
    for name in ("unet", "vae", "text_encoder"):
        want, got = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert set(want) == set(got), name
        assert all(torch.equal(want[k], got[k].reshape(want[k].shape)) for k in want), name
    assert loaded.tokenizer("a red house").input_ids == pipe.tokenizer("a red house").input_ids
    assert type(loaded.scheduler) is type(pipe.scheduler)


def test_cli_quantizes_a_single_file_checkpoint(sd1, tmp_path, capsys):
    pipe, path, config = sd1
    (tmp_path / "p.txt").write_text("a red house\na blue car\n")
    out = tmp_path / "q.safetensors"
    code, message = _cli(capsys, "--model", str(path), "--config", str(config), "--prompts", str(tmp_path / "p.txt"),
                         "--out", str(out), "--steps", "2", "--groups", "1", "--no-consistency")
    assert code == 0, message
    # The file's weight fingerprint matches the original pipeline's UNet: the checkpoint came across exactly.
    result = artifact.load_result(out, pipe.unet)
    assert result.config.weight_bits == 8


def test_the_hub_cache_copy_is_used_when_no_config_is_given(sd1, monkeypatch):
    pipe, path, config = sd1
    asked = []
    monkeypatch.setattr(single_file, "_cached_config", lambda repo: asked.append(repo) or config)
    loaded = single_file.load_single_file_pipeline(path)
    assert asked == ["stable-diffusion-v1-5/stable-diffusion-v1-5"]
    assert torch.equal(loaded.unet.conv_in.weight, pipe.unet.conv_in.weight)


@pytest.mark.parametrize("keys,family,repo", [
    ({**UNET_KEYS, "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 32)},
     "SD1.x", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
    ({**UNET_KEYS, "cond_stage_model.model.positional_embedding": (77, 32)}, "SD2.x", "stabilityai/stable-diffusion-2-1"),
    ({**UNET_KEYS, "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": (77, 32),
      "conditioner.embedders.1.model.positional_embedding": (77, 32)}, "SDXL", "stabilityai/stable-diffusion-xl-base-1.0"),
])
def test_without_configs_the_error_names_the_family_and_what_to_pass(tmp_path, capsys, monkeypatch, keys, family, repo):
    monkeypatch.setattr(single_file, "_cached_config", lambda repo: None)
    path = _header_file(tmp_path / "model.safetensors", keys)
    (tmp_path / "p.txt").write_text("a red house\n")
    code, message = _cli(capsys, "--model", str(path), "--prompts", str(tmp_path / "p.txt"),
                         "--out", str(tmp_path / "q.safetensors"))
    assert code not in (0, None)
    assert f"single-file {family} checkpoint" in message and repo in message and "--config" in message, message
    assert len(message.splitlines()) == 1 and not (tmp_path / "q.safetensors").exists()


@pytest.mark.parametrize("keys,pattern", [
    ({**UNET_KEYS, "conditioner.embedders.0.model.positional_embedding": (77, 32)}, "SDXL refiner.*not supported"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (32, 9, 3, 3),
      "cond_stage_model.transformer.text_model.x": (1,)}, "9 input channels"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 32)}, "no UNet.*a LoRA"),
    (UNET_KEYS, "no SD1.x \\(CLIP-L\\), SD2.x \\(OpenCLIP-H\\) or SDXL text encoder"),
])
def test_files_that_are_not_supported_checkpoints_are_named(tmp_path, keys, pattern):
    path = _header_file(tmp_path / "model.safetensors", keys)
    with pytest.raises(ValueError, match=pattern):
        single_file.load_single_file_pipeline(path, config=tmp_path)


def test_pickles_are_never_opened(tmp_path, monkeypatch):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x04not really a pickle")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called on a checkpoint"))
    with pytest.raises(ValueError, match="only .safetensors checkpoints are read"):
        single_file.load_single_file_pipeline(ckpt)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        single_file.load_single_file_pipeline(broken)


def test_a_config_of_another_family_or_width_is_refused(sd1, tmp_path):
    _, path, config = sd1
    other = tmp_path / "config"
    shutil.copytree(config, other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(ValueError, match="is for 'StableDiffusionXLPipeline', but the checkpoint is SD1.x"):
        single_file.load_single_file_pipeline(path, config=other)
    (other / "model_index.json").write_text(json.dumps(index))
    unet = json.loads((other / "unet" / "config.json").read_text())
    (other / "unet" / "config.json").write_text(json.dumps({**unet, "cross_attention_dim": 768}))
    with pytest.raises(ValueError, match="cross-attention width 768, but the checkpoint's is 32"):
        single_file.load_single_file_pipeline(path, config=other)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        single_file.load_single_file_pipeline(path, config=tmp_path / "nowhere")


@pytest.mark.parametrize("args,pattern", [
    (["--preset", "W4A8-mixed", "--bits-budget", "4"], r"bits_budget 4.0 must lie in \(4, 16\]"),
    (["--preset", "W4A8-mixed", "--bits-budget", "16.5"], r"bits_budget 16.5 must lie in \(4, 16\]"),
    (["--preset", "W8A8", "--bits-budget", "6"], "applies to W4A8-mixed only"),
    (["--config", "{tmp}"], "--config is for single-file checkpoints"),
])
def test_cli_option_errors_come_before_any_loading(tmp_path, capsys, monkeypatch, args, pattern):
    from quant_core.models import runners

    monkeypatch.setattr(runners, "load_diffusers_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "p.txt").write_text("a red house\n")
    code, message = _cli(capsys, "--model", str(tmp_path / "model"), "--prompts", str(tmp_path / "p.txt"),
                         "--out", str(tmp_path / "q.safetensors"), *[a.format(tmp=tmp_path) for a in args])
    assert code not in (0, None)
    assert re.search(pattern, message), message


def test_cli_bits_budget_reaches_the_config(tmp_path, capsys, monkeypatch):
    from quant_core import validate

    seen = []

    def record(cfg):
        seen.append(cfg)
        raise SystemExit("stop before loading")
    monkeypatch.setattr(validate, "check_config", record)
    (tmp_path / "p.txt").write_text("a red house\n")
    _cli(capsys, "--model", str(tmp_path / "model"), "--prompts", str(tmp_path / "p.txt"), "--out",
         str(tmp_path / "q.safetensors"), "--preset", "W4A8-mixed", "--bits-budget", "5.25")
    assert seen and seen[0].bits_budget == 5.25 and seen[0].mixed_precision
