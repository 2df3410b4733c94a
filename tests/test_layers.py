"""QuantLinear / QuantConv2d against float64 references, on every backend this machine can run."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load, save

from quant_core import QuantConv2d, QuantLinear, StepContext
from quant_core.runtime import kernels, onednn_ops

from reference import (fake_quant_act, fake_quant_act_per_row, fake_quant_w4, fake_quant_w8, rel_err)

F64 = torch.float64
# Tolerance vs the float64 reference of the *same quantized math*: float32 rounding (a rare one-code
# flip where x/s lands on .5), accumulation and
# output-dtype rounding only. A wrong scale or transposed weight is off by O(1).
OUT_TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def linear_backends():
    names = ["float"]
    if kernels.cpu_has_fast_int8() and kernels.cpu_int_mm_available():
        names.append("int_mm")
    if onednn_ops.available():  # runs (slowly) even without int8 dot-product instructions
        names.append("onednn")
    return names


def conv_backends():
    names = ["float"]
    if kernels.cpu_has_fast_int8():
        names.append("im2col")
        if kernels.onednn_conv_available():
            names.append("onednn")
    return names


def fake_w(weight, bits, group_size=64):
    return fake_quant_w8(weight) if bits == 8 else fake_quant_w4(weight, group_size)


def seeded_linear(k, n, seed, bias=True):
    torch.manual_seed(seed)
    layer = torch.nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        layer.weight.normal_(0, 0.05)
        if bias:
            layer.bias.normal_(0, 0.5)  # large enough that a dropped or doubled bias is caught
    return layer


LINEAR_SHAPES = [  # (input shape, K, N)
    ((2, 77, 320), 320, 1280),
    ((5, 64), 64, 128),        # M <= 16
    ((1, 9, 40), 40, 24),
    ((13, 33), 33, 17),        # K and N not multiples of 8
    ((3, 4, 96), 96, 96),      # square: a transposed weight would still run
]


@pytest.mark.parametrize("backend", linear_backends())
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape,k,n", LINEAR_SHAPES)
def test_quant_linear_static_matches_float64_reference(backend, bits, shape, k, n):
    float_layer = seeded_linear(k, n, seed=k * n + bits)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(7)) * 2 + 0.3
    scale = float(x.abs().max()) / 127 * 0.9  # some saturation on purpose
    layer = QuantLinear.from_float(float_layer, weight_bits=bits, act_scales=[scale])
    layer.use_backend(backend)
    y = layer(x)
    assert y.shape == (*shape[:-1], n) and y.dtype == torch.float32
    expected = F.linear(fake_quant_act(x, scale), fake_w(float_layer.weight, bits), float_layer.bias.to(F64))
    assert rel_err(y, expected) < OUT_TOL[torch.float32]
    # And close to the unquantized layer (catches a scale that is consistently wrong in both).
    full = F.linear(x.to(F64), float_layer.weight.to(F64), float_layer.bias.to(F64))
    assert rel_err(y, full) < (0.05 if bits == 8 else 0.15)


@pytest.mark.parametrize("backend", linear_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_quant_linear_half_inputs_return_input_dtype(backend, dtype):
    float_layer = seeded_linear(128, 64, seed=3)
    x = (torch.randn(4, 20, 128, generator=torch.Generator().manual_seed(3)) * 3).to(dtype)
    scale = float(x.float().abs().max()) / 127
    layer = QuantLinear.from_float(float_layer, act_scales=[scale])
    layer.use_backend(backend)
    y = layer(x)
    assert y.dtype == dtype
    expected = F.linear(fake_quant_act(x, scale), fake_quant_w8(float_layer.weight), float_layer.bias.to(F64))
    assert rel_err(y, expected) < OUT_TOL[dtype]


@pytest.mark.parametrize("backend", linear_backends())
@pytest.mark.parametrize("bits", [8, 4])
def test_quant_linear_dynamic_per_token(backend, bits):
    float_layer = seeded_linear(256, 96, seed=11, bias=False)
    x = torch.randn(6, 256, generator=torch.Generator().manual_seed(5))
    x[2] *= 50  # one loud token must not crush the others' resolution
    layer = QuantLinear.from_float(float_layer, weight_bits=bits)
    layer.use_backend(backend)
    assert layer.is_dynamic
    expected = F.linear(fake_quant_act_per_row(x), fake_w(float_layer.weight, bits))
    assert rel_err(layer(x), expected) < OUT_TOL[torch.float32]


def test_timestep_group_selects_activation_scale():
    float_layer = seeded_linear(64, 32, seed=2)
    x = torch.randn(10, 64, generator=torch.Generator().manual_seed(2))
    scales = [0.002, 0.01, 0.05]
    layer = QuantLinear.from_float(float_layer, act_scales=scales)
    shared = StepContext()
    layer.context = shared
    for index, scale in enumerate(scales):
        shared.step_group = index
        expected = F.linear(fake_quant_act(x, scale), fake_quant_w8(float_layer.weight), float_layer.bias.to(F64))
        assert rel_err(layer(x), expected) < OUT_TOL[torch.float32]


CONV_CASES = [  # (input shape, out channels, kernel, stride, padding)
    ((2, 64, 16, 16), 64, 3, 1, 1),
    ((1, 24, 9, 7), 40, 3, 2, 1),      # odd sizes, stride 2 (SD downsample)
    ((2, 64, 8, 8), 32, 1, 1, 0),      # 1x1 (SD1.x proj_in / skip connections)
    ((1, 20, 6, 6), 12, 3, 1, 1),      # channels not multiples of 8
]


@pytest.mark.parametrize("backend", conv_backends())
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape,n,kernel,stride,padding", CONV_CASES)
def test_quant_conv_matches_float64_reference(backend, bits, shape, n, kernel, stride, padding):
    torch.manual_seed(sum(shape) + n)
    conv = torch.nn.Conv2d(shape[1], n, kernel, stride, padding)
    with torch.no_grad():
        conv.bias.normal_(0, 0.5)
    x = torch.randn(*shape) * 1.5 - 0.2
    scale = float(x.abs().max()) / 127 * 0.9
    layer = QuantConv2d.from_float(conv, weight_bits=bits, group_size=32, act_scales=[scale])
    layer.use_backend(backend)
    y = layer(x)
    expected = F.conv2d(fake_quant_act(x, scale), fake_w(conv.weight, bits, 32), conv.bias.to(F64), stride, padding)
    assert y.shape == expected.shape and y.dtype == torch.float32
    assert rel_err(y, expected) < OUT_TOL[torch.float32]
    full = F.conv2d(x.to(F64), conv.weight.to(F64), conv.bias.to(F64), stride, padding)
    assert rel_err(y, full) < (0.05 if bits == 8 else 0.15)


@pytest.mark.parametrize("backend", conv_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quant_conv_channels_last_and_half_inputs(backend, dtype):
    torch.manual_seed(4)
    conv = torch.nn.Conv2d(32, 48, 3, 1, 1)
    x = torch.randn(2, 32, 10, 12).to(dtype).contiguous(memory_format=torch.channels_last)
    scale = float(x.float().abs().max()) / 127
    layer = QuantConv2d.from_float(conv, act_scales=[scale])
    layer.use_backend(backend)
    y = layer(x)
    assert y.dtype == dtype
    expected = F.conv2d(fake_quant_act(x, scale), fake_quant_w8(conv.weight), conv.bias.to(F64), 1, 1)
    assert rel_err(y, expected) < OUT_TOL[dtype]


@pytest.mark.parametrize("backend", conv_backends())
def test_quant_conv_dynamic_and_groups(backend):
    torch.manual_seed(8)
    conv = torch.nn.Conv2d(16, 16, 3, 1, 1)
    x = torch.randn(1, 16, 8, 8) * 4
    dynamic = QuantConv2d.from_float(conv)
    dynamic.use_backend(backend)
    amax_scale = float(x.abs().max()) / 127
    expected = F.conv2d(fake_quant_act(x, amax_scale), fake_quant_w8(conv.weight), conv.bias.to(F64), 1, 1)
    assert rel_err(dynamic(x), expected) < OUT_TOL[torch.float32]

    scales = [0.01, 0.1]
    grouped = QuantConv2d.from_float(conv, act_scales=scales)
    grouped.use_backend(backend)
    for index, scale in enumerate(scales):
        grouped.context.step_group = index
        expected = F.conv2d(fake_quant_act(x, scale), fake_quant_w8(conv.weight), conv.bias.to(F64), 1, 1)
        assert rel_err(grouped(x), expected) < OUT_TOL[torch.float32]


@pytest.mark.parametrize("bits", [8, 4])
def test_state_dict_round_trip_gives_identical_outputs(bits):
    torch.manual_seed(5)
    lin, conv = torch.nn.Linear(96, 40), torch.nn.Conv2d(24, 32, 3, padding=1)
    qlin = QuantLinear.from_float(lin, weight_bits=bits, group_size=32, act_scales=[0.02, 0.03])
    qconv = QuantConv2d.from_float(conv, weight_bits=bits, group_size=32, act_scales=[0.05])
    # Through safetensors bytes, as the artifact will be stored.
    lin_state = load(save(qlin.state_dict()))
    conv_state = load(save(qconv.state_dict()))
    lin2 = QuantLinear(96, 40, weight_bits=bits, group_size=32, act_groups=2)
    conv2 = QuantConv2d(24, 32, 3, padding=1, weight_bits=bits, group_size=32, act_groups=1)
    lin2.load_state_dict(lin_state)
    conv2.load_state_dict(conv_state)
    x, xc = torch.randn(7, 96), torch.randn(2, 24, 9, 9)
    for index in (0, 1):
        qlin.context.step_group = lin2.context.step_group = index
        assert torch.equal(qlin(x), lin2(x))
    assert torch.equal(qconv(xc), conv2(xc))


@pytest.mark.parametrize("bits", [8, 4])
def test_layers_hold_no_float_weight_and_report_real_bytes(bits):
    lin = torch.nn.Linear(1280, 640).half()
    layer = QuantLinear.from_float(lin, weight_bits=bits, act_scales=[0.1])
    state = layer.state_dict()
    expected_keys = {"weight", "weight_scale", "act_scale", "bias"} | ({"weight_group_scale"} if bits == 4 else set())
    assert set(state) == expected_keys
    assert state["weight"].dtype == (torch.int8 if bits == 8 else torch.uint8)
    # frozen codes and bias: ComfyUI loads, moves and weight-patches (LoRA) only parameters
    assert [name for name, _ in layer.named_parameters()] == ["weight", "bias"]
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    weight_bytes = sum(state[k].numel() * state[k].element_size()
                       for k in ("weight", "weight_scale", "weight_group_scale") if k in state)
    ratio = weight_bytes / (1280 * 640 * 2)
    assert ratio <= (0.52 if bits == 8 else 0.30)
    deq = layer.dequantize_weight()
    assert deq.shape == lin.weight.shape and deq.dtype == torch.float32
    assert rel_err(deq, lin.weight.float()) < (0.02 if bits == 8 else 0.15)


def test_w4_keep_unpacked_cache_follows_weight_updates():
    torch.manual_seed(6)
    lin_a, lin_b = torch.nn.Linear(64, 32), torch.nn.Linear(64, 32)
    layer = QuantLinear.from_float(lin_a, weight_bits=4, group_size=32, act_scales=[0.02])
    layer.keep_unpacked = True
    x = torch.randn(5, 64)
    first = layer(x)
    assert torch.equal(layer.int8_weight_2d(), layer.int8_weight_2d())
    layer.set_float_weight(lin_b.weight)
    expected = F.linear(fake_quant_act(x, 0.02), fake_quant_w4(lin_b.weight, 32), lin_a.bias.to(F64))
    second = layer(x)
    assert not torch.equal(first, second)
    assert rel_err(second, expected) < OUT_TOL[torch.float32]


def test_conv_prepack_cache_follows_weight_updates():
    torch.manual_seed(9)
    conv_a, conv_b = torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.Conv2d(16, 16, 3, padding=1)
    layer = QuantConv2d.from_float(conv_a, act_scales=[0.02])
    x = torch.randn(1, 16, 8, 8)
    layer(x)
    layer.set_float_weight(conv_b.weight)
    expected = F.conv2d(fake_quant_act(x, 0.02), fake_quant_w8(conv_b.weight), conv_a.bias.to(F64), 1, 1)
    assert rel_err(layer(x), expected) < OUT_TOL[torch.float32]


@pytest.mark.skipif(not onednn_ops.available(), reason="this torch has no oneDNN prepacked int8 linear")
@pytest.mark.parametrize("bits", [8, 4])
def test_linear_prepack_cache_follows_weight_updates(bits):
    torch.manual_seed(10)
    lin_a, lin_b = seeded_linear(64, 48, seed=1), seeded_linear(64, 48, seed=2)
    layer = QuantLinear.from_float(lin_a, weight_bits=bits, group_size=32, act_scales=[0.02])
    layer.use_backend("onednn")
    x = torch.randn(5, 64)
    first = layer(x)
    assert layer._cached("onednn", ("cpu",), lambda: None) is not None  # packed once, reused
    layer.set_float_weight(lin_b.weight)  # in-place copy: the version counter moves
    fake_b = fake_quant_w8(lin_b.weight) if bits == 8 else fake_quant_w4(lin_b.weight, 32)
    second = layer(x)
    assert not torch.equal(first, second)
    assert rel_err(second, F.linear(fake_quant_act(x, 0.02), fake_b, lin_a.bias.to(F64))) < OUT_TOL[torch.float32]
    # A replaced tensor (what a host's unpatch does): lin_a's codes again, in a new Parameter.
    calibrated_a = QuantLinear.from_float(lin_a, weight_bits=bits, group_size=32, act_scales=[0.02])
    layer.weight = torch.nn.Parameter(calibrated_a.weight.detach().clone(), requires_grad=False)
    layer._buffers["weight_scale"] = calibrated_a.weight_scale.clone()
    if bits == 4:
        layer.weight_group_scale.copy_(calibrated_a.weight_group_scale)
    assert torch.equal(layer(x), first)


def test_cpu_linear_choice_names_a_backend_and_its_reason():
    backend, reason = kernels.cpu_linear_choice()
    assert backend in QuantLinear.BACKENDS and reason
    if kernels.cpu_has_fast_int8() and onednn_ops.available() and kernels.cpu_int_mm_available():
        assert "onednn" in reason and "int_mm" in reason and " ms" in reason  # both were measured


def test_model_summary_names_the_kernels_and_the_linear_choice():
    from quant_core.runtime.model import QuantizedModel

    layers = {"lin": QuantLinear.from_float(torch.nn.Linear(64, 64), act_scales=[0.1]),
              "conv": QuantConv2d.from_float(torch.nn.Conv2d(8, 8, 3), act_scales=[0.1])}
    line = QuantizedModel(layers, [[999]]).summary()
    assert f"linear {layers['lin'].backend} x1 (cpu)" in line and f"conv {layers['conv'].backend} x1 (cpu)" in line
    if layers["lin"].backend != "float":
        assert kernels.cpu_linear_choice()[1] in line
    assert "linear int_mm x1 (cuda)" in QuantizedModel(layers, [[999]]).kernel_summary("cuda")


def test_bad_input_gets_clear_errors():
    with pytest.raises(ValueError, match="groups=2"):
        QuantConv2d.from_float(torch.nn.Conv2d(8, 8, 3, groups=2))
    with pytest.raises(ValueError, match="padding"):
        QuantConv2d.from_float(torch.nn.Conv2d(8, 8, 3, padding="same"))
    with pytest.raises(TypeError, match="nn.Linear"):
        QuantLinear.from_float(torch.nn.Conv2d(8, 8, 1))
    with pytest.raises(ValueError, match="weight_bits"):
        QuantLinear(8, 8, weight_bits=3)
    with pytest.raises(ValueError, match="positive"):
        QuantLinear.from_float(torch.nn.Linear(8, 8), act_scales=[0.0])
    with pytest.raises(ValueError, match="backends"):
        QuantLinear(8, 8).use_backend("im2col")


def test_backend_choice_is_visible():
    layer = QuantLinear.from_float(torch.nn.Linear(64, 64), act_scales=[0.1])
    assert layer.backend == (kernels.cpu_linear_choice()[0] if kernels.cpu_has_fast_int8() else "float")
    conv = QuantConv2d.from_float(torch.nn.Conv2d(8, 8, 3), act_scales=[0.1])
    assert conv.backend in QuantConv2d.BACKENDS
    assert "W8A8" in repr(layer)


def test_forced_float_backend(monkeypatch):
    monkeypatch.setenv("FIDELITYQUANT_BACKEND", "float")
    kernels._forced_backend.cache_clear()
    try:
        assert kernels.linear_backend(torch.device("cpu"), 64, 64) == "float"
        assert kernels.conv_backend(torch.device("cpu"), 64, 64, 100) == "float"
    finally:
        monkeypatch.delenv("FIDELITYQUANT_BACKEND")
        kernels._forced_backend.cache_clear()
