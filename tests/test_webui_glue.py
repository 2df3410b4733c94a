"""The host-free part of the A1111 / Forge glue (fidelityquant_webui/common.py), without either host.

The layer swap is checked on a calibrated tiny diffusers UNet: swapped in, the live UNet gives the quantized
model's output (the same as ``Calibration.apply``'s clone); restored, it gives bit-identical float output
with the very same modules and no hooks left. Plus file listing / choice / naming and the settings' checks.
"""
from __future__ import annotations

import pytest
import torch

from fidelityquant_webui import common
from quant_core import quantize
from quant_core.config import preset
from quant_core.models.modeltree import weights_digest
from unets import LoopRunner, tiny_unet


@pytest.fixture(scope="module")
def calibrated():
    torch.manual_seed(0)
    unet = tiny_unet("sd1").eval()
    runner = LoopRunner(unet, prompts=1, steps=3)
    calibration = quantize(unet, runner, preset("W8A8", timestep_groups=2, consistency_pass=False, evaluate=False,
                                                workers=1))
    return unet, calibration


def call(unet, t):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    context = torch.randn(2, 7, unet.config.cross_attention_dim, generator=gen)
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=context).sample


def test_swap_runs_quantized_and_restore_is_exact(calibrated):
    unet, calibration = calibrated
    t = torch.tensor(calibration.step_groups[0][0])
    before = {name: module for name, module in unet.named_modules()}
    digest = weights_digest(unet)
    float_out = call(unet, t)
    expected = call(calibration.apply(unet), t)

    adapter = calibration.check_compatible(unet)
    swap = common.LayerSwap(unet, calibration.runtime(adapter.timesteps_from_call), adapter.timesteps_from_call)
    assert swap.active and len(swap.originals) >= len(calibration.layers)
    swapped_out = call(unet, t)
    assert torch.equal(swapped_out, expected)
    assert not torch.equal(swapped_out, float_out)

    swap.restore()
    assert not swap.active
    assert {name: module for name, module in unet.named_modules()} == before
    assert not unet._forward_pre_hooks and not unet._forward_hooks
    assert torch.equal(call(unet, t), float_out)
    assert weights_digest(unet) == digest


def test_swap_routes_each_call_and_runs_on_call(calibrated):
    unet, calibration = calibrated
    adapter = calibration.check_compatible(unet)
    runtime = calibration.runtime(adapter.timesteps_from_call)
    calls = []
    swap = common.LayerSwap(unet, runtime, adapter.timesteps_from_call, on_call=lambda: calls.append(1))
    try:
        groups = set()
        for group in calibration.step_groups:
            call(unet, torch.tensor(group[0]))
            groups.add(runtime.context.step_group)
        assert groups == set(range(len(calibration.step_groups)))
        assert len(calls) == len(calibration.step_groups)
    finally:
        swap.restore()


def test_swap_of_missing_layer_leaves_model_untouched(calibrated):
    unet, calibration = calibrated
    adapter = calibration.check_compatible(unet)
    runtime = calibration.runtime(adapter.timesteps_from_call)
    before = {name: module for name, module in unet.named_modules()}
    runtime.layers["down_blocks.99.missing"] = next(iter(runtime.layers.values()))
    with pytest.raises(Exception):
        common.LayerSwap(unet, runtime, adapter.timesteps_from_call)
    assert {name: module for name, module in unet.named_modules()} == before
    assert not unet._forward_pre_hooks and not unet._forward_hooks


def test_file_listing_and_choice(tmp_path):
    assert common.list_files(str(tmp_path / "absent")) == [common.NONE]
    (tmp_path / "b.safetensors").write_bytes(b"x")
    (tmp_path / "A.safetensors").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.safetensors").write_bytes(b"x")
    assert common.list_files(str(tmp_path)) == [common.NONE, "A.safetensors", "b.safetensors", "sub/c.safetensors"]
    assert common.resolve_file(str(tmp_path), "sub/c.safetensors") == str((tmp_path / "sub" / "c.safetensors").resolve())
    with pytest.raises(FileNotFoundError, match="no file 'zz.safetensors'.*A.safetensors"):
        common.resolve_file(str(tmp_path), "zz.safetensors")
    with pytest.raises(ValueError, match="only safetensors"):
        common.resolve_file(str(tmp_path), "notes.txt")
    with pytest.raises(ValueError, match="outside"):
        common.resolve_file(str(tmp_path / "sub"), "../b.safetensors")
    assert common.is_none("None") and common.is_none("") and common.is_none(None)
    assert not common.is_none("A.safetensors")


def test_output_path_never_overwrites(tmp_path):
    first = common.output_path(str(tmp_path), "w8")
    assert first == str(tmp_path / "w8.safetensors")
    (tmp_path / "w8.safetensors").write_bytes(b"x")
    assert common.output_path(str(tmp_path), "w8.safetensors") == str(tmp_path / "w8_00001.safetensors")
    for bad in ("", "../x", "a/b", ".hidden"):
        with pytest.raises(ValueError, match="plain file name"):
            common.output_path(str(tmp_path), bad)


def test_settings_checks():
    config = common.make_config("W4A8-mixed", timestep_groups=3, bits_budget=5.0, consistency_pass=False,
                                memory_limit_mb=32)
    assert (config.weight_bits, config.timestep_groups, config.bits_budget, config.consistency_pass,
            config.memory_limit_mb) == (4, 3, 5.0, False, 32)
    assert common.make_config("W8A8", bits_budget=5.0).bits_budget == preset("W8A8").bits_budget
    with pytest.raises(ValueError, match="unknown preset 'naive-W8A8'"):
        common.make_config("naive-W8A8")
    with pytest.raises(ValueError, match="at least one non-blank prompt"):
        common.prompt_lines(" \n\n ")
    assert common.prompt_lines(" a \n\nb\n") == ["a", "b"]
    assert len(common.prompt_lines(common.default_prompts())) == 34


def test_calibration_inputs_checked():
    lines, steps, width, height, seed = common.check_calibration_inputs("a\n\nb", "", 20.0, 7, 512, 256.0, 3)
    assert (lines, steps, width, height, seed) == (["a", "b"], 20, 512, 256, 3)
    assert all(type(v) is int for v in (steps, width, height, seed))
    bad = [(("", "", 4, 7, 256, 256, 0), "non-blank prompt"), (("a", None, 4, 7, 256, 256, 0), "negative prompt"),
           (("a", "", 2.5, 7, 256, 256, 0), "steps 2.5 must be a whole number"),
           (("a", "", 0, 7, 256, 256, 0), "steps 0"), (("a", "", 4, 7, 250, 256, 0), "not a multiple of 8"),
           (("a", "", 4, 7, 256, 32, 0), "outside 64..4096"), (("a", "", 4, "7", 256, 256, 0), "cfg '7'"),
           (("a", "", 4, 7, 256, 256, -1), "seed -1"), (("a", "", True, 7, 256, 256, 0), "steps True")]
    for args, message in bad:
        with pytest.raises(ValueError, match=message):
            common.check_calibration_inputs(*args)
    with pytest.raises(ValueError, match="timestep_groups 2.5"):
        common.make_config("W8A8", timestep_groups=2.5)


def _fake_merge(patches, weight, key):
    """Stands in for Forge's merge_lora_to_weight: each patch is [strength, delta, strength_model, None, None]."""
    out = weight.clone()
    for strength, delta, strength_model, _offset, _function in patches:
        out = out * strength_model + strength * delta.reshape(out.shape)
    return out


def test_forge_lora_set_merges_and_restores_exactly(calibrated):
    from fidelityquant_webui.forge_lora import FORGE_LAYER_KINDS, PREFIX, ForgePatchable, apply_lora_set

    unet, calibration = calibrated
    t = torch.tensor(calibration.step_groups[0][0])
    adapter = calibration.check_compatible(unet)
    runtime = calibration.runtime(adapter.timesteps_from_call, kinds=FORGE_LAYER_KINDS)
    layers = {n: m for n, m in runtime.layers.items() if isinstance(m, ForgePatchable)}
    assert layers, "no layer took the Forge LoRA kinds"
    name = next(n for n in layers if "attn1.to_q" in n)
    layer = layers[name]
    codes, scale, bias = layer.weight.clone(), layer.weight_scale.clone(), layer.bias
    float_layer = unet.get_submodule(name)
    delta = 0.3 * float_layer.weight.detach().norm() / float_layer.weight.numel() ** 0.5 * torch.randn(
        float_layer.weight.shape, generator=torch.Generator().manual_seed(3))
    lora = {("fq-tiny-lora.safetensors", 1.0, 1.0, False): {f"{PREFIX}{name}.weight": [[1.0, delta, 1.0, None, None]]}}
    swap = common.LayerSwap(unet, runtime, adapter.timesteps_from_call)
    try:
        plain = call(unet, t)
        assert apply_lora_set(runtime, lora, _fake_merge)
        assert not apply_lora_set(runtime, dict(lora), _fake_merge), "the same set merged twice"
        merged_weight = layer.weight_value(layer.weight, layer.weight_scale).dequantize().view(layer.weight_shape)
        expected = layer.float_weight(codes) + delta
        assert (merged_weight - expected).abs().max() <= 0.51 * layer.weight_scale.max(), "merge off by > 1/2 step"
        with_lora = call(unet, t)
        assert not torch.equal(with_lora, plain)
        assert apply_lora_set(runtime, {}, _fake_merge)
        assert torch.equal(layer.weight, codes) and torch.equal(layer.weight_scale, scale) and layer.bias is bias
        assert torch.equal(call(unet, t), plain), "removing the LoRA did not restore the quantized output exactly"
        online = {("x", 1.0, 1.0, True): {f"{PREFIX}{name}.weight": [[1.0, delta, 1.0, None, None]]}}
        with pytest.raises(ValueError, match="online LoRA"):
            apply_lora_set(runtime, online, _fake_merge)
    finally:
        swap.restore()


def test_refusal_fails_the_first_unet_call_and_is_removed(calibrated):
    unet, calibration = calibrated
    t = torch.tensor(calibration.step_groups[0][0])
    float_out = call(unet, t)
    refusal = common.Refusal(unet, ValueError("FidelityQuant: this FidelityQuant file was calibrated on a different "
                                              "checkpoint"))
    assert refusal.active
    with pytest.raises(ValueError, match="different checkpoint"):
        call(unet, t)
    refusal.restore()
    assert not refusal.active and not unet._forward_pre_hooks
    assert torch.equal(call(unet, t), float_out)


def test_calibration_inside_inference_mode_through_the_forward_wrapper(calibrated):
    """Forge samples under torch.inference_mode(); with the UNet's forward run outside it, calibration works and
    gives the same result as without inference mode. The instance attribute is put back afterwards."""
    unet, calibration = calibrated

    class InferenceModeRunner(LoopRunner):
        def __call__(self, model):
            with common.unet_outside_inference_mode(model), torch.inference_mode():
                return super().__call__(model)

    config = preset("W8A8", timestep_groups=2, consistency_pass=False, evaluate=False, workers=1)
    marker = unet.forward
    unet.forward = marker  # an instance attribute, as ControlNet sets one
    try:
        result = quantize(unet, InferenceModeRunner(unet, prompts=1, steps=3), config)
        assert unet.__dict__["forward"] is marker
    finally:
        del unet.__dict__["forward"]
    assert "forward" not in unet.__dict__
    assert result.summary().splitlines()[1:3] == calibration.summary().splitlines()[1:3]
    layer = next(iter(calibration.layers))
    assert torch.equal(result.layers[layer].tensors["weight"], calibration.layers[layer].tensors["weight"])
