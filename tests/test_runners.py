"""DiffusersRunner and load_diffusers_pipeline on tiny, real, seeded diffusers pipelines (offline, CPU)."""
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quant_core.models.runners import DiffusersRunner, load_diffusers_pipeline
from tiny_pipelines import BOS, EOS, WORDS, make_tiny_sd_pipeline, make_tiny_sdxl_pipeline, make_tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a photo of a cat", "a red car on a street at night", "Oil painting, 42 zebras!"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models run fastest single-threaded; on a shared CPU, multi-threaded OpenMP can be 100x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sd1():
    return make_tiny_sd_pipeline(seed=0)


@pytest.fixture(scope="module")
def sdxl():
    return make_tiny_sdxl_pipeline(seed=0)


@pytest.fixture(params=["sd1", "sdxl"])
def pipe(request):
    return request.getfixturevalue(request.param)


class CallCounter:
    """Forward pre-hook recording each UNet call's sample batch and timestep."""

    def __init__(self, module):
        self.calls = []
        self.handle = module.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.calls.append((args[0].shape[0], float(torch.as_tensor(args[1]).reshape(-1)[0]), sorted(kwargs)))

    def remove(self):
        self.handle.remove()


# ---------------------------------------------------------------------- tiny pipelines


def test_tokenizer_is_a_real_clip_bpe():
    tok = make_tiny_tokenizer()
    ids = tok(["a photo of a cat", "xylophone 7"], padding="max_length", max_length=tok.model_max_length,
              truncation=True, return_tensors="pt").input_ids
    assert ids.shape == (2, 77) and tok.model_max_length == 77
    assert ids[0, 0] == tok.bos_token_id and tok.convert_ids_to_tokens(ids[0, 1:6].tolist()) == \
        ["a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>"]
    assert ids[0, 6] == tok.eos_token_id and (ids[0, 6:] == tok.pad_token_id).all()
    assert tok.convert_ids_to_tokens(ids[1, 1:4].tolist())[:2] == ["x", "y"]  # unknown words fall back to bytes
    assert make_tiny_tokenizer(pad_token="!").pad_token == "!"
    for word in WORDS:  # every merged word is one token
        assert tok.convert_ids_to_tokens(tok(word).input_ids) == [BOS, word + "</w>", EOS]


@pytest.mark.parametrize("variant", ["sd1", "sd2", "sdxl"])
def test_tiny_pipelines_generate_images(variant, sd1, sdxl):
    pipe = {"sd1": sd1, "sdxl": sdxl}.get(variant) or make_tiny_sd_pipeline(seed=0, variant=variant)
    out = pipe(["a photo of a cat", "a dog"], num_inference_steps=4, generator=torch.Generator().manual_seed(0),
               output_type="pt").images
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0 and float(out.std()) > 0
    expected_context = {"sd1": 32, "sd2": 64, "sdxl": 64}[variant]
    assert pipe.unet.config.cross_attention_dim == expected_context
    assert pipe.unet.config.use_linear_projection == (variant != "sd1")


def test_tiny_pipelines_are_deterministic_per_seed():
    a, b, c = make_tiny_sd_pipeline(seed=3), make_tiny_sd_pipeline(seed=3), make_tiny_sd_pipeline(seed=4)
    state_a, state_b, state_c = a.unet.state_dict(), b.unet.state_dict(), c.unet.state_dict()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert not all(torch.equal(state_a[k], state_c[k]) for k in state_a)
    assert torch.equal(a.text_encoder.get_input_embeddings().weight, b.text_encoder.get_input_embeddings().weight)


# ---------------------------------------------------------------------- DiffusersRunner


def test_runner_calls_the_unet_total_unet_calls_times_with_cfg_batch(pipe):
    runner = DiffusersRunner(pipe, PROMPTS, steps=3, batch_size=2, guidance_scale=5.0)
    assert runner.total_unet_calls == 2 * 3  # two batches (2 + 1 prompts), 3 steps each
    counter = CallCounter(pipe.unet)
    try:
        latents = runner(pipe.unet)
    finally:
        counter.remove()
    assert len(counter.calls) == runner.total_unet_calls
    # classifier-free guidance: [uncond, cond] concatenated into one call of batch 2 x prompts
    assert [batch for batch, _, _ in counter.calls] == [4, 4, 4, 2, 2, 2]
    assert "encoder_hidden_states" in counter.calls[0][2]
    timesteps = [t for _, t, _ in counter.calls]
    assert timesteps[:3] == timesteps[3:] and timesteps[0] > timesteps[1] > timesteps[2]
    assert [tuple(x.shape) for x in latents] == [(2, 4, 16, 16), (1, 4, 16, 16)]
    assert all(torch.isfinite(x).all() for x in latents)


def test_total_unet_calls_follows_second_order_schedulers(sd1):
    from diffusers import DDIMScheduler, HeunDiscreteScheduler

    heun = copy.copy(sd1)  # shallow: shares the modules, own attribute dict
    heun.register_modules(scheduler=HeunDiscreteScheduler.from_config(sd1.scheduler.config))
    runner = DiffusersRunner(heun, PROMPTS[:1], steps=3, guidance_scale=1.0)
    counter = CallCounter(sd1.unet)
    try:
        runner(sd1.unet)
    finally:
        counter.remove()
    assert runner.total_unet_calls == len(counter.calls) == 2 * 3 - 1
    assert [batch for batch, _, _ in counter.calls] == [1] * 5  # no guidance: no doubled batch
    assert isinstance(sd1.scheduler, DDIMScheduler) and sd1.config.scheduler[1] == "DDIMScheduler"


def test_runner_refuses_offloaded_pipelines(sd1):
    offloaded = copy.copy(sd1)
    offloaded._all_hooks = [object()]  # what enable_model_cpu_offload leaves behind
    with pytest.raises(ValueError, match="CPU offloading"):
        DiffusersRunner(offloaded, PROMPTS[:1], steps=2)(copy.deepcopy(sd1.unet))
    assert offloaded.unet is sd1.unet


def test_runner_is_deterministic_and_a_deep_copy_gives_identical_latents(pipe):
    runner = DiffusersRunner(pipe, PROMPTS[:2], steps=3, seed=7)
    first, second = runner(pipe.unet), runner(pipe.unet)
    clone = copy.deepcopy(pipe.unet)
    swapped = runner(clone)
    assert len(first) == 2
    for a, b, c in zip(first, second, swapped):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(first[0], first[1])  # batches get different seeds (seed + batch index)
    other_seed = DiffusersRunner(pipe, PROMPTS[:2], steps=3, seed=8)(pipe.unet)
    assert not torch.equal(first[0], other_seed[0])


def test_runner_really_samples_with_the_given_unet(sd1):
    runner = DiffusersRunner(sd1, PROMPTS[:1], steps=3)
    reference = runner(sd1.unet)[0]
    changed = copy.deepcopy(sd1.unet)
    with torch.no_grad():
        changed.conv_out.bias.add_(0.5)
    counter_original, counter_changed = CallCounter(sd1.unet), CallCounter(changed)
    try:
        out = runner(changed)[0]
    finally:
        counter_original.remove()
        counter_changed.remove()
    assert not counter_original.calls and len(counter_changed.calls) == runner.total_unet_calls
    assert not torch.allclose(out, reference)


def test_runner_restores_pipe_unet_after_run_and_after_an_error(pipe):
    original, config_entry = pipe.unet, tuple(pipe.config.unet)
    bar_config = dict(getattr(pipe, "_progress_bar_config", {}))
    runner = DiffusersRunner(pipe, PROMPTS[:1], steps=2)
    clone = copy.deepcopy(original)
    runner(clone)
    assert pipe.unet is original and pipe.components["unet"] is original
    assert tuple(pipe.config.unet) == config_entry

    def boom(module, args, kwargs):
        assert pipe.unet is clone  # the swapped-in UNet is the one being called
        raise RuntimeError("boom inside the UNet")

    handle = clone.register_forward_pre_hook(boom, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="boom inside the UNet"):
            runner(clone)
        with pytest.raises(RuntimeError, match="boom inside the UNet"):
            runner.images(clone)
    finally:
        handle.remove()
    assert pipe.unet is original and tuple(pipe.config.unet) == config_entry
    assert dict(getattr(pipe, "_progress_bar_config", {})) == bar_config


def test_runner_images_match_the_latents_trajectory(pipe):
    runner = DiffusersRunner(pipe, PROMPTS, steps=3, batch_size=2, negative_prompt="blurry, low quality")
    images = runner.images(pipe.unet)
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.float32
    assert torch.isfinite(images).all() and 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    latents = torch.cat(runner(pipe.unet))
    vae = pipe.vae
    with torch.no_grad():
        decoded = vae.decode(latents / vae.config.scaling_factor).sample
    assert torch.allclose(images, (decoded / 2 + 0.5).clamp(0, 1), atol=1e-5)
    assert runner.images(None, output_type="np").shape == (3, 32, 32, 3)


def test_runner_validates_arguments(sd1):
    with pytest.raises(ValueError, match="non-empty"):
        DiffusersRunner(sd1, [])
    with pytest.raises(ValueError, match="steps"):
        DiffusersRunner(sd1, ["x"], steps=0)
    with pytest.raises(ValueError, match="batch_size"):
        DiffusersRunner(sd1, ["x"], batch_size=0)
    assert DiffusersRunner(sd1, "one prompt").prompts == ["one prompt"]


def test_runner_drives_quantize_end_to_end(sd1):
    from quant_core.config import preset
    from quant_core import quantize

    runner = DiffusersRunner(sd1, PROMPTS[:2], steps=3, batch_size=2)
    done = []
    result = quantize(sd1.unet, runner, preset("W8A8", evaluate=False, workers=1),
                      progress=lambda d, t: done.append((d, t)))
    assert done and done[-1][1] == runner.total_unet_calls * 2  # capture + consistency pass
    assert done[-1][0] == done[-1][1]
    quantized = runner(result.apply(sd1.unet))[0]
    reference = runner(sd1.unet)[0]
    assert torch.isfinite(quantized).all()
    assert float((quantized - reference).norm() / reference.norm()) < 0.5
    assert sd1.unet is not None and not sd1.unet._forward_pre_hooks


# ---------------------------------------------------------------------- load_diffusers_pipeline


@pytest.mark.parametrize("make,cls", [(make_tiny_sd_pipeline, "StableDiffusionPipeline"),
                                      (make_tiny_sdxl_pipeline, "StableDiffusionXLPipeline")])
def test_load_diffusers_pipeline_round_trip(make, cls, tmp_path):
    pipe = make(seed=1)
    pipe.save_pretrained(tmp_path / "model", safe_serialization=True)
    assert (tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = load_diffusers_pipeline(str(tmp_path / "model"))
    assert type(loaded).__name__ == cls
    assert loaded.unet.dtype == torch.float32 and loaded.device.type == "cpu"
    state, loaded_state = pipe.unet.state_dict(), loaded.unet.state_dict()
    assert state.keys() == loaded_state.keys() and all(torch.equal(state[k], loaded_state[k]) for k in state)
    expected = DiffusersRunner(pipe, PROMPTS[:2], steps=2)(pipe.unet)
    got = DiffusersRunner(loaded, PROMPTS[:2], steps=2)(loaded.unet)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(expected, got))


def test_load_diffusers_pipeline_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_diffusers_pipeline(str(tmp_path / "missing"))

    single = tmp_path / "model.safetensors"
    single.write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="is a file; expected a diffusers pipeline folder"):
        load_diffusers_pipeline(str(single))

    folder = tmp_path / "no_index"
    (folder / "unet").mkdir(parents=True)
    (folder / "weights.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no model_index.json.*found: unet/, weights.bin"):
        load_diffusers_pipeline(str(folder))
    with pytest.raises(FileNotFoundError, match="the folder is empty"):
        (tmp_path / "empty").mkdir()
        load_diffusers_pipeline(str(tmp_path / "empty"))

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model_index.json").write_text("{not json")
    with pytest.raises(ValueError, match="could not read"):
        load_diffusers_pipeline(str(bad))

    flux = tmp_path / "flux"
    flux.mkdir()
    (flux / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match=r"'FluxPipeline'.*supported: StableDiffusionPipeline, "
                                         r"StableDiffusionXLPipeline"):
        load_diffusers_pipeline(str(flux))

    no_unet = tmp_path / "no_unet"
    no_unet.mkdir()
    (no_unet / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                          "unet": [None, None]}))
    with pytest.raises(ValueError, match="no UNet component"):
        load_diffusers_pipeline(str(no_unet))


def test_runners_module_imports_without_diffusers_or_transformers():
    code = ("import sys; sys.modules['diffusers'] = None; sys.modules['transformers'] = None; "
            "import quant_core, quant_core.models.runners as r; "
            "assert callable(r.DiffusersRunner) and callable(r.load_diffusers_pipeline); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
