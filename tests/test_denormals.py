"""Denormals flushed on the threads that run a quantized model's call, and every thread's flag restored after."""
import pytest
import torch
import torch.nn as nn

from quant_core import QuantConv2d, QuantLinear
from quant_core.runtime import denormals
from quant_core.runtime.denormals import FlushDenormals, thread_flushes
from quant_core.runtime.model import QuantizedModel

from reference import rel_err

if not torch.set_flush_denormal(False):
    pytest.skip("this CPU cannot flush denormals (torch.set_flush_denormal is unsupported)", allow_module_levels=True)

DENORMAL_BITS = 0x000A0000  # a float32 denormal (about 9e-40), built from bits: no float conversion to flush it
NORMAL_MIN = torch.finfo(torch.float32).tiny
ELEMENTS = 1 << 20  # split over every intra-op thread (grain 32768)


@pytest.fixture
def two_threads():
    """Two intra-op threads (CI runs with OMP_NUM_THREADS=1): the worker keeps its own FTZ/DAZ bits."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    torch.mul(torch.randn(ELEMENTS), 2.0)  # the worker exists before any flag is touched
    yield
    torch.set_num_threads(before)
    torch.set_flush_denormal(False)


def flushed_share() -> float:
    """Share of a large denormal tensor that a parallel multiply flushes: 1 = every thread flushes."""
    out = torch.full((ELEMENTS,), DENORMAL_BITS, dtype=torch.int32).view(torch.float32).mul_(1.0)
    return float((out == 0).float().mean())


def test_flush_reaches_the_pool_and_restores_every_thread(two_threads):
    if not denormals.pool_reached():
        pytest.skip("no OpenMP runtime with GOMP_parallel: only the calling thread is switched")
    torch.set_flush_denormal(False)
    assert flushed_share() == 0.0
    flush = FlushDenormals()
    flush.enter()
    assert thread_flushes() and flushed_share() == 1.0  # the worker flushes too, not only the caller
    flush.enter()  # a second enter before exit changes nothing
    flush.exit()
    assert not thread_flushes() and flushed_share() == 0.0
    flush.exit()  # a stray exit changes nothing either
    assert flushed_share() == 0.0


def test_a_thread_that_already_flushed_keeps_flushing(two_threads):
    torch.set_flush_denormal(True)  # the user's choice, on the calling thread only
    share = flushed_share()
    assert 0.0 < share < 1.0 or not denormals.pool_reached()
    with FlushDenormals():
        assert thread_flushes()
    assert thread_flushes() and flushed_share() == share  # each thread back to its own state


class Probe(nn.Module):
    """Records whether the thread running it flushes denormals."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(thread_flushes())
        return x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.lin = nn.Linear(16, 16)
        self.probe = Probe()

    def forward(self, x, t):
        h = self.conv(x)
        tiny = self.probe(h * 1e-37)  # about a fifth of these are denormals, unless flushed
        out = self.lin((torch.nn.functional.silu(h) + tiny).permute(0, 2, 3, 1))
        return out, tiny


def quantized(net):
    layers = {"conv": QuantConv2d.from_float(net.conv, act_scales=[0.05]),
              "lin": QuantLinear.from_float(net.lin, act_scales=[0.05])}
    return QuantizedModel(layers, [[999]], timesteps_from_call=lambda args, kwargs: torch.as_tensor(args[1]).reshape(-1))


def test_quantized_call_flushes_inside_restores_after_and_keeps_outputs():
    torch.set_flush_denormal(False)
    net = Net()
    runtime = quantized(net)
    model = runtime.apply(net)
    x = torch.randn(2, 8, 6, 6)
    flushed, h = model(x, torch.tensor([500.0]))
    assert (h != 0).any() and bool(((h.abs() < NORMAL_MIN) & (h != 0)).sum() == 0)  # denormals were flushed
    assert model.probe.seen == [True] and not thread_flushes()
    runtime.flush_denormals = False
    plain, h_plain = model(x, torch.tensor([500.0]))
    assert model.probe.seen == [True, False]
    assert ((h_plain.abs() < NORMAL_MIN) & (h_plain != 0)).any(), "the test input no longer makes denormals"
    assert rel_err(flushed, plain) < 1e-6  # denormals round to code 0 anyway: outputs unchanged


def test_a_raising_call_still_restores_the_flag():
    torch.set_flush_denormal(False)
    net = Net()
    model = quantized(net).apply(net)
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 7, 6, 6), torch.tensor([500.0]))  # wrong channel count
    assert not thread_flushes()


def test_flushing_is_left_alone_for_other_devices():
    runtime = quantized(Net())
    runtime.begin_call(torch.tensor([10.0]), torch.empty(1, device="meta"))
    assert not runtime._flush.active
    runtime.end_call()
