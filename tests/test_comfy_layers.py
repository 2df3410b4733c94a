"""ComfyUI's weight-patch protocol (LoRA) on quantized layers (nodes/comfy_layers.py, on the engine seam
quant_core/runtime/weight_patch.py), time lookups and the activation-range check, without ComfyUI.

What ComfyUI does is imitated with its documented call shapes (docs/COMFYUI_FACTS.md section 5):
``patch_weight_to_device`` hands ``convert_weight`` a float32 copy of the stored codes and gives the
merged weight to ``set_weight``; low-VRAM mode puts a ``LowVramPatch`` (an object with ``patches``
and ``convert_func``) in ``weight_function``. The real thing is tested in tests/test_comfyui_lora.py.
"""
import importlib.util
import logging
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from quant_core import StepContext
from quant_core.runtime import range_check
from quant_core.runtime.model import QuantizedModel
from quant_core.runtime.range_check import CLIPPED_ENERGY_WARN
from quant_core.runtime.timetables import TimeTableLookup


def _comfy_layers():
    """nodes/comfy_layers.py by file: importing the repo's ``nodes`` package by that name would shadow
    ComfyUI's own top-level ``nodes`` module for the in-process ComfyUI tests of the same session."""
    path = Path(__file__).resolve().parents[1] / "nodes" / "comfy_layers.py"
    spec = importlib.util.spec_from_file_location("fidelityquant_comfy_layers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


comfy_layers = _comfy_layers()
QuantLinear, QuantConv2d = comfy_layers.ComfyQuantLinear, comfy_layers.ComfyQuantConv2d


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _layer(kind, bits, seed=0):
    torch.manual_seed(seed)
    if kind == "linear":
        flt, x = nn.Linear(320, 320), torch.randn(64, 320)
        with torch.no_grad():
            flt.weight.normal_(0, 320 ** -0.5)  # bell-shaped like trained weights (not nn.Linear's uniform)
        q = QuantLinear.from_float(flt, weight_bits=bits, group_size=64, act_scales=[float(x.abs().amax()) / 127])
    else:
        flt, x = nn.Conv2d(64, 96, 3, padding=1), torch.randn(2, 64, 8, 8)
        with torch.no_grad():
            flt.weight.normal_(0, (64 * 9) ** -0.5)
        q = QuantConv2d.from_float(flt, weight_bits=bits, group_size=64, act_scales=[float(x.abs().amax()) / 127])
    return flt, q, x


def _lora_delta(weight, rank=16, seed=1, size=0.3):
    """A rank-``rank`` update whose norm is ``size`` x the weight's (a strong but realistic LoRA)."""
    gen = torch.Generator().manual_seed(seed)
    w2d = weight.reshape(weight.shape[0], -1)
    up, down = torch.randn(w2d.shape[0], rank, generator=gen), torch.randn(rank, w2d.shape[1], generator=gen)
    delta = up @ down
    return (delta * (size * w2d.norm() / delta.norm())).view(weight.shape)


class FakeLowVramPatch:
    """ComfyUI 0.3.64's LowVramPatch (comfy/model_patcher.py:125), built as (key, patches, convert_func,
    set_func): with convert/set functions it takes the stored codes and returns codes; without, a float weight."""

    def __init__(self, key, patches, convert_func=None, set_func=None):
        self.key, self.patches, self.convert_func, self.set_func = key, patches, convert_func, set_func

    def __call__(self, weight):
        if self.convert_func is None:
            return weight + self.patches[self.key]
        weight = self.convert_func(weight.to(torch.float32, copy=True), inplace=True)
        return self.set_func(weight + self.patches[self.key], seed=0, return_weight=True)


class FakeLowVramPatch080(FakeLowVramPatch):
    """ComfyUI 0.8.0's LowVramPatch (comfy/model_patcher.py:126): float weight in, float weight out, always
    (cast_bias_weight converts first; convert/set are kept but unused)."""

    def __call__(self, weight):
        return weight + self.patches[self.key]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_merged_lora_error_stays_at_the_quantization_error(kind, bits):
    """Requantizing a merged weight on the fixed scales costs about what quantizing cost in the first place."""
    flt, q, x = _layer(kind, bits)
    delta = _lora_delta(flt.weight.detach())
    base_err = rel(q(x), flt(x).detach())
    with torch.no_grad():
        flt.weight += delta
    q.set_weight(q.convert_weight(q.weight.float()) + delta)
    merged_err = rel(q(x), flt(x).detach())
    print(f"{kind} W{bits}: output error without LoRA {base_err:.4f}, with a 0.3-norm LoRA merged {merged_err:.4f}")
    # Measured (linear / conv): W8 0.0120 -> 0.0138 / 0.0119 -> 0.0139: the delta is rounded once more
    # on the int8 grid (small); rows the delta pushes past the range get a larger scale instead of
    # saturating (without that, W8 went to 0.097 at LoRA norm 1.0). W4: the merged weight is held as
    # int8 codes, so no second int4 rounding: 0.110 -> 0.105 / 0.113 -> 0.109 (re-rounding it on the
    # int4 grid gave 0.160 / 0.168, sqrt(2) x the weight error). Bound: 25% above the unpatched error.
    assert merged_err < 1.25 * base_err
    if bits == 4:
        assert q.weight.dtype == torch.int8 and q.patch_info["stored_as"] == "int8"


@pytest.mark.parametrize("inplace", [False, True])
def test_saturating_rows_grow_their_scale_and_unpatch_restores_it(inplace):
    flt, q, x = _layer("linear", 8)
    original, calibrated, base_out = q.weight.detach().clone(), q.weight_scale.clone(), q(x)
    dequant = q.convert_weight(original.float())
    delta = torch.zeros_like(dequant)
    delta[3] = dequant[3].abs().amax() * 2  # row 3 now needs 3x its range
    backup = original.clone() if inplace else q.weight  # what ComfyUI's backup holds (copy only when in place)
    q.set_weight(dequant + delta, inplace_update=inplace)
    assert q.patch_info["grown_rows"] == 1 and q.patch_info["max_growth"] > 2.9
    assert torch.equal(q.weight_scale[:3], calibrated[:3]) and q.weight_scale[3] > 2.9 * calibrated[3]
    assert rel(q.dequantize_weight(), dequant + delta) < 0.01  # row 3 is represented, not clipped
    assert torch.equal(q.convert_weight(original.float()), dequant)  # backups still dequantize right
    # ComfyUI's unpatch: a new Parameter around the backup, or an in-place copy into ours
    if inplace:
        q.weight.data.copy_(backup)  # copy_to_param: no version bump, caught once per weights epoch
        q.context.weights_epoch += 1
    else:
        q.weight = nn.Parameter(backup, requires_grad=False)
    assert torch.equal(q(x), base_out) and torch.equal(q.weight_scale, calibrated)
    assert not q.has_merged_patch  # (an in-place restore is seen by the check at the next weights epoch)


def test_result_lists_layers_holding_a_merged_patch():
    flt, q, _ = _layer("linear", 8)
    result = _result(q)
    original = q.weight
    assert result.merged_layers() == []
    q.set_weight(q.convert_weight(original.float()) + _lora_delta(flt.weight.detach()))
    assert result.merged_layers() == ["blk.proj"]
    q.weight = nn.Parameter(original.detach(), requires_grad=False)  # ComfyUI's unpatch
    assert result.merged_layers() == []


@pytest.mark.parametrize("bits", [8, 4])
def test_convert_weight_uses_the_codes_it_is_given(bits):
    """ComfyUI passes backed-up codes too (get_key_patches while a LoRA is merged): dequantize those."""
    flt, q, _ = _layer("linear", bits)
    original = q.weight.detach().clone()
    reference = q.dequantize_weight()
    q.set_weight(reference + _lora_delta(flt.weight.detach()))
    assert not torch.equal(q.weight, original)
    assert torch.equal(q.convert_weight(original.float(), inplace=True), reference)
    assert torch.equal(q.convert_weight(original), reference)


@pytest.mark.parametrize("bits", [8, 4])
def test_repeated_patch_unpatch_with_changing_strengths_is_bit_identical(bits):
    flt, q, x = _layer("linear", bits)
    original, base_out = q.weight.detach().clone(), q(x)
    dequant = q.convert_weight(original.float())
    delta = _lora_delta(flt.weight.detach())
    outs = {}
    for _ in range(3):
        for strength in (1.0, -1.0, 0.5, 0.0, 2.0):
            q.set_weight(dequant + strength * delta)  # what calculate_weight hands set_weight
            outs.setdefault(strength, q(x))
            assert torch.equal(outs[strength], q(x))  # same strength -> same result every time
            if strength == 0.0:
                assert torch.equal(q.weight, original)  # zero strength == no LoRA, exactly
            q.weight = nn.Parameter(original.clone(), requires_grad=False)  # ComfyUI's unpatch: restore backup
            assert torch.equal(q(x), base_out)
    assert not torch.equal(outs[1.0], outs[-1.0]) and not torch.equal(outs[1.0], base_out)


@pytest.mark.parametrize("patch_kind", [FakeLowVramPatch, FakeLowVramPatch080])
@pytest.mark.parametrize("bits", [8, 4])
def test_low_vram_weight_function_matches_merging(bits, patch_kind):
    """Low-VRAM mode: the patch runs per call on temporary codes; same result as merging, codes untouched.
    Both ComfyUI versions' LowVramPatch contracts."""
    flt, q, x = _layer("linear", bits)
    delta = _lora_delta(flt.weight.detach())
    original = q.weight.detach().clone()
    q.weight_function = [patch_kind("w", {"w": delta}, q.convert_weight, q.set_weight)]
    bias_delta = torch.randn(q.bias.shape) * 0.1
    q.bias_function = [lambda b: b + bias_delta]
    low_vram = q(x)
    assert torch.equal(q.weight, original)
    q.weight_function, q.bias_function = [], []
    q.set_weight(q.convert_weight(original.float()) + delta)
    q.bias = nn.Parameter(q.bias + bias_delta, requires_grad=False)  # set_attr_param on the bias key
    assert torch.equal(low_vram, q(x))
    # a plain weight wrapper (ComfyUI add_weight_wrapper) sees and returns a float weight
    q.weight = nn.Parameter(original.clone(), requires_grad=False)
    seen = []
    q.weight_function = [lambda w: seen.append(w.dtype) or w + delta]
    assert seen == [] and q(x) is not None and seen == [torch.float32]


def test_bias_is_a_frozen_parameter_so_bias_patches_are_not_dropped():
    _, q, x = _layer("conv", 8)
    assert dict(q.named_parameters()).keys() == {"weight", "bias"} and not q.bias.requires_grad
    before = q(x)
    q.bias = nn.Parameter(q.bias + 1.0, requires_grad=False)
    assert torch.allclose(q(x) - before, torch.ones_like(before), atol=1e-5)


# ---------------------------------------------------------------------- time lookups

class TimeMLP(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Linear(32, 64), nn.SiLU(), nn.Linear(64, 64))


def _lookup():
    torch.manual_seed(3)
    mlp = TimeMLP()
    inputs = torch.randn(4, 32)  # the "sinusoidal embeddings" of 4 known timesteps
    with torch.no_grad():
        table = mlp(inputs)
    ctx = StepContext()
    return mlp, inputs, TimeTableLookup(mlp, table, ctx), ctx


def test_time_lookup_keeps_the_float_keys_and_objects():
    mlp, _, lookup, _ = _lookup()
    assert set(lookup.state_dict()) == set(mlp.state_dict()) | {"time_table"}
    for key, tensor in mlp.state_dict(keep_vars=True).items():
        assert lookup.state_dict(keep_vars=True)[key] is tensor  # the same parameters: patches reach them
    assert lookup.get_submodule("0") is mlp[0]


def test_time_lookup_verifies_once_per_weights_epoch_and_falls_back_when_patched():
    mlp, inputs, lookup, ctx = _lookup()
    calls = []
    mlp[0].register_forward_hook(lambda *a: calls.append(1))
    ctx.time_rows = torch.tensor([1, 2])
    x = inputs[1:3]
    with torch.no_grad():
        expected = mlp(x)
        calls.clear()
        assert torch.equal(lookup(x), expected) and calls == [1]  # first call: float, verified against table
        assert lookup.table_verified and lookup.table_error < 1e-6  # measured 2e-7: batch-size-dependent GEMM rounding
        for _ in range(3):
            assert torch.allclose(lookup(x), expected, rtol=0, atol=1e-6)
        assert calls == [1]  # then the table only
        # a LoRA merged into the time MLP (ComfyUI replaces the parameter by key, set_attr_param)
        key_module = lookup.get_submodule("2")
        key_module.weight = nn.Parameter(key_module.weight + 0.01 * torch.randn_like(key_module.weight))
        ctx.weights_epoch += 1  # once per load (QuantizedModel.weights_changed)
        patched = mlp(x)
        assert not torch.allclose(patched, expected)
        assert torch.equal(lookup(x), patched) and lookup.table_verified is False
        assert torch.equal(lookup(x), patched)  # stays float while patched: never the stale table
    print(f"table vs patched MLP: relative difference {lookup.table_error:.4f}")


def test_time_lookup_wrapping_a_module_with_its_own_parameters():
    """diffusers' time_emb_proj is a bare Linear: a replaced parameter on the lookup must be used."""
    torch.manual_seed(4)
    lin, x = nn.Linear(16, 8), torch.randn(2, 16)
    ctx = StepContext()
    lookup = TimeTableLookup(lin, lin(x).detach(), ctx)
    assert set(lookup.state_dict()) == {"weight", "bias", "time_table"}
    new_weight = nn.Parameter(lin.weight.detach() * 2)
    lookup.weight = new_weight  # what set_attr_param does on the lookup's key
    ctx.time_rows = torch.tensor([0, 1])
    with torch.no_grad():
        out = lookup(x)
        assert torch.allclose(out, x @ new_weight.t() + lin.bias) and lookup.table_verified is False
    assert lin.weight is not new_weight  # the shared float module itself was not modified


# ---------------------------------------------------------------------- activation-range check

def _result(layer):
    return QuantizedModel({"blk.proj": layer}, [[999.0]], report={"layers": {}})


def test_range_check_runs_once_and_warns_when_a_patch_pushes_inputs_out_of_range(caplog, monkeypatch):
    _, q, x = _layer("linear", 8)
    result = _result(q)
    calls = []
    real = range_check.measure_range
    monkeypatch.setattr(range_check, "measure_range", lambda *a: calls.append(1) or real(*a))
    q(x)
    result.finish_call()
    assert calls == [] and "activation_range" not in result.report  # nothing armed: no work, no report

    result.weights_changed(patched=True)  # e.g. a LoRA load whose changes keep inputs in range
    q(x)
    result.finish_call()
    findings = result.report["activation_range"]
    assert calls == [1] and findings["checked_layers"] == 1 and not findings["outside"]
    assert findings["max_clipped_energy"] < CLIPPED_ENERGY_WARN

    result.weights_changed(patched=True)  # a patch upstream makes this layer's input 5x larger
    with caplog.at_level(logging.WARNING, logger="fidelityquant"):
        for _ in range(3):
            q(5 * x)
            result.finish_call()
    assert calls == [1, 1]  # measured once for the group, not per call
    findings = result.report["activation_range"]
    assert list(findings["outside"]) == ["blk.proj"] and findings["outside"]["blk.proj"]["ratio"] > 4
    warnings = [r.getMessage() for r in caplog.records if r.name == "fidelityquant"]
    assert len(warnings) == 1 and "blk.proj" in warnings[0] and "Calibrate & Quantize" in warnings[0]

    result.weights_changed(patched=False)  # unpatched again: no measuring
    q(5 * x)
    result.finish_call()
    assert calls == [1, 1]


@pytest.mark.parametrize("bits", [8, 4])
def test_weight_patch_under_inference_mode(bits):
    """ComfyUI's server runs nodes (and so LoRA merging at model load) under torch.inference_mode():
    the merged codes are inference tensors without a version counter. Patching, running and
    unpatching there must work and give the same outputs as outside it."""
    gen = torch.Generator().manual_seed(11)
    conv = torch.nn.Conv2d(64, 32, 3, padding=1)
    layer = QuantConv2d.from_float(conv, weight_bits=bits, act_scales=[0.05])
    x = torch.randn(1, 64, 8, 8, generator=gen)
    codes, plain = layer.weight.detach().clone(), layer(x)
    delta = torch.randn(conv.weight.shape, generator=gen) * 0.01
    with torch.inference_mode():
        layer.set_weight(layer.convert_weight(layer.weight.detach().clone()) + delta)
        patched_inside = layer(x)
    patched_outside = layer(x)
    assert torch.equal(patched_inside, patched_outside) and not torch.equal(patched_inside, plain)
    with torch.inference_mode():
        layer.weight = torch.nn.Parameter(codes.clone(), requires_grad=False)  # what ComfyUI's unpatch restores
        assert torch.equal(layer(x), plain)


def test_saving_while_a_patch_is_merged_writes_the_calibrated_weights(tmp_path):
    """ComfyUI unpatches lazily: after a LoRA run a runtime's codes may still be the merged ones. The
    calibration shares the calibrated codes with the runtime but is never written by a merge, so a file
    saved now holds the calibrated weights, not the LoRA."""
    from quant_core.artifact import load_result, save_result
    from quant_core.calibrate.pipeline import layer_state
    from quant_core.calibration import Calibration
    from quant_core.config import QuantConfig

    flt, _, x = _layer("linear", 8)
    fit_value = QuantLinear.from_float(flt, act_scales=[0.05]).weight_value()
    state = layer_state(flt, type("Fit", (), {"weight_bits": 8, "act_scales": torch.tensor([0.05]),
                                              "weight": fit_value})(), QuantConfig())
    calibration = Calibration("ldm", "sd1", QuantConfig(), {}, {"blk.proj": state}, [[999.0]], None, {},
                              {"blk.proj": 8}, {"layers": {}})
    runtime = calibration.runtime(kinds=comfy_layers.COMFY_LAYER_KINDS)
    q = runtime.layers["blk.proj"]
    calibrated_codes = state.tensors["weight"].clone()
    q.set_weight(q.convert_weight(q.weight.detach().clone()) * 1.1)
    assert runtime.merged_layers() == ["blk.proj"]
    assert torch.equal(state.tensors["weight"], calibrated_codes)  # the merge did not write the calibration
    save_result(calibration, tmp_path / "merged.safetensors")
    loaded = load_result(tmp_path / "merged.safetensors")
    assert torch.equal(loaded.layers["blk.proj"].tensors["weight"], calibrated_codes)
    merged_out = q(x)
    assert not torch.equal(loaded.runtime().layers["blk.proj"](x), merged_out)
    assert torch.equal(loaded.runtime().layers["blk.proj"](x), calibration.runtime().layers["blk.proj"](x))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_comfy_weight_patch_hooks_merge_and_restore_exactly(bits, kind):
    """convert_weight/set_weight (ComfyUI's LoRA path): merge changes the output, restoring is bit-exact."""
    torch.manual_seed(bits)
    if kind == "linear":
        float_layer, x = torch.nn.Linear(96, 64), torch.randn(10, 96)
        layer = QuantLinear.from_float(float_layer, weight_bits=bits, group_size=32, act_scales=[0.03])
    else:
        float_layer, x = torch.nn.Conv2d(16, 32, 3, padding=1), torch.randn(1, 16, 6, 6)
        layer = QuantConv2d.from_float(float_layer, weight_bits=bits, group_size=32, act_scales=[0.03])
    original = layer.weight.clone()
    base_out = layer(x)
    dequant = layer.convert_weight(original.float(), inplace=True)
    assert dequant.shape == float_layer.weight.shape
    assert torch.equal(dequant, layer.dequantize_weight())
    delta = torch.randn(dequant.shape) * dequant.abs().mean() * 0.5  # a LoRA-sized update
    for _ in range(3):  # repeated patch / unpatch never drifts
        layer.set_weight(dequant + delta)
        patched = layer(x)
        assert not torch.equal(patched, base_out)
        _check_requantized(layer, (dequant + delta).reshape(dequant.shape[0], -1), bits)
        layer.set_weight(dequant)
        assert torch.equal(layer.weight, original) and torch.equal(layer(x), base_out)
    assert torch.equal(layer.set_weight(dequant, return_weight=True), original)


def _check_requantized(layer, target, bits):
    """Codes inside the fixed range are within half a step of the target; the rest saturate at the range limit."""
    w8 = layer.int8_weight_2d().to(torch.int32)
    scale = layer.weight_scale.unsqueeze(1)
    if bits == 8:
        step = scale.expand_as(target)
        q, low, high = w8, -127, 127
    else:
        gs = layer.weight_group_scale.to(torch.int32).repeat_interleave(layer.group_size, dim=1)[:, :target.shape[1]]
        step = scale * gs
        q, low, high = w8 // gs, -8, 7
    got = w8.float() * scale
    inside = (q > low) & (q < high)
    assert bool(((got - target).abs()[inside] <= step[inside] / 2 + 1e-6).all())
    assert bool((((target > got) & (q == high)) | ((target < got) & (q == low)) | inside
                 | ((got - target).abs() <= step / 2 + 1e-6)).all())
