"""The same kernel checks on CUDA; skipped (with the reason) on machines without a GPU."""
import pytest
import torch
import torch.nn.functional as F

from quant_core import QuantConv2d, QuantLinear

from reference import fake_quant_act, fake_quant_w4, fake_quant_w8, rel_err

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")]
F64 = torch.float64


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows,k,n", [(5, 64, 128), (17, 320, 1280), (300, 768, 320), (9, 40, 20)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_linear_matches_reference(bits, rows, k, n, dtype):
    torch.manual_seed(rows + k)
    lin = torch.nn.Linear(k, n)
    x = torch.randn(rows, k) * 2
    scale = float(x.abs().max()) / 127
    layer = QuantLinear.from_float(lin, weight_bits=bits, act_scales=[scale]).cuda()
    expected_backend = "int_mm" if k % 8 == 0 and n % 8 == 0 else "float"
    assert layer.backend == expected_backend
    y = layer(x.to("cuda", dtype))
    assert y.dtype == dtype and y.device.type == "cuda"
    w = fake_quant_w8(lin.weight) if bits == 8 else fake_quant_w4(lin.weight, 64)
    expected = F.linear(fake_quant_act(x.to(dtype), scale), w, lin.bias.to(F64))
    assert rel_err(y.cpu(), expected) < {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]


@pytest.mark.parametrize("shape", [(2, 320, 16, 16), (2, 64, 64, 64)])
def test_cuda_conv_matches_reference(shape):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(shape[1], shape[1], 3, padding=1)
    x = torch.randn(*shape)
    scale = float(x.abs().max()) / 127
    layer = QuantConv2d.from_float(conv, act_scales=[scale]).cuda()
    y = layer(x.cuda().half())
    expected = F.conv2d(fake_quant_act(x.half(), scale), fake_quant_w8(conv.weight), conv.bias.to(F64), 1, 1)
    assert rel_err(y.cpu(), expected) < 2e-3


def test_cuda_layer_left_on_cpu_runs_on_gpu_input():
    """ComfyUI low-VRAM mode can leave a layer in system RAM: forward must still work."""
    lin = torch.nn.Linear(64, 64)
    layer = QuantLinear.from_float(lin, act_scales=[0.05])
    x = torch.randn(20, 64)
    y = layer(x.cuda())
    assert y.device.type == "cuda" and layer.weight.device.type == "cpu"
    assert torch.allclose(y.cpu(), layer(x), atol=1e-5)
