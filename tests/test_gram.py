"""Input Gram matrices for error-compensated rounding (quant_core/calibrate/gram.py) and the capture passes they
need: exact X^T X when every row is added (convs with padding and stride included), block-diagonal storage,
a memory budget smaller than one pass (more passes, every layer still covered), cancel in a later pass."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from quant_core import quantize
from quant_core.calibrate import capture, gram
from quant_core.config import preset
from quant_core.models.modeltree import weights_digest
from quant_core.report import rounding_coverage

from unets import LoopRunner, tiny_unet


class _ConvLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(5, 6, 3, stride=2, padding=1)
        self.proj = nn.Linear(6, 7)

    def forward(self, x, timesteps):
        h = self.conv(x)
        return self.proj(h.flatten(2).transpose(1, 2))


def _ts(args, kwargs):
    return args[1]


def _full_grams(model, inputs):
    """float64 X^T X of every row each layer sees: unfold for the conv, all tokens for the linear."""
    conv_rows, lin_rows = [], []
    for x in inputs:
        xd = x.double()
        conv_rows.append(F.unfold(xd, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 45))
        h = model.conv.double()(xd)
        model.conv.float()
        lin_rows.append(h.flatten(2).transpose(1, 2).reshape(-1, 6))
    xc, xl = torch.cat(conv_rows), torch.cat(lin_rows)
    return (xc.t() @ xc / xc.shape[0], xc.shape[0]), (xl.t() @ xl / xl.shape[0], xl.shape[0])


@pytest.mark.parametrize("block", [45, 18])
def test_gram_equals_xtx_of_all_rows_for_conv_with_padding_and_stride(block):
    torch.manual_seed(0)
    model = _ConvLinear()
    inputs = [torch.randn(2, 5, 9, 7) + 0.3 for _ in range(3)]  # odd sizes: padding and stride both matter
    grams = {"conv": gram.GramAccumulator(45, block, align=9), "proj": gram.GramAccumulator(6, block)}

    def runner(unet):
        for i, x in enumerate(inputs):
            unet(x, torch.full((2,), 900.0 - 300 * i))

    # a large cost budget adds every row of every call
    capture.capture(model, {"conv": model.conv, "proj": model.proj}, runner, _ts, 3, 2**20, grams=grams,
                    gram_cost=1e6)
    (h_conv, n_conv), (h_lin, n_lin) = _full_grams(model, inputs)
    assert grams["conv"].rows == n_conv == 3 * 2 * 5 * 4 and grams["proj"].rows == n_lin
    blocks = grams["conv"].blocks()
    assert [b.stop - b.start for b, _ in blocks] == ([45] if block == 45 else [18, 9, 18])  # whole channels (9 taps)
    for cols, h in blocks:
        torch.testing.assert_close(h.double(), h_conv[cols, cols], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grams["proj"].blocks()[0][1].double(), h_lin, rtol=1e-5, atol=1e-6)
    assert not model.conv._forward_pre_hooks and not model.proj._forward_pre_hooks


def test_subsampled_rows_follow_the_cost_budget_and_estimate_h():
    """With a small budget each call adds a seeded subset; H is still close to the all-rows H."""
    assert gram.rows_per_call(8192, 2880, 320, 960, 0.5) == 1366
    assert gram.rows_per_call(32, 23040, 1280, 1024, 0.5) == 32  # few rows: all of them
    torch.manual_seed(1)
    conv = nn.Conv2d(16, 4, 3, padding=1)
    # image 0 is nearly silent, image 1 carries the energy: the first rows alone would give H ~ 0
    x = torch.cat([0.01 * torch.randn(1, 16, 32, 32), torch.randn(1, 16, 32, 32) + 1.0])
    few = gram.GramAccumulator(144, 1024, align=9)
    rec = capture.Recorder(conv, {"c": conv}, None, {"c": 8}, grams={"c": few}, gram_cost=18.0, stats=False)
    rec._add_gram(few, rec.captures["c"], conv, x)
    assert few.rows == gram.rows_per_call(2048, 144, 4, 144, 18.0) == 1024
    rows = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 144)
    full = rows.t() @ rows / rows.shape[0]
    rel = float((few.blocks()[0][1] - full).norm() / full.norm())
    assert rel < 0.1  # a uniform subset of both images (measured 0.03); the first half alone is off by ~1


def test_block_bounds_cover_k_in_whole_channels():
    for k, block, align in ((23040, 1024, 9), (1280, 1024, 1), (320, 1024, 1), (2880, 1000, 9)):
        bounds = gram.block_bounds(k, block, align)
        assert bounds[0][0] == 0 and bounds[-1][1] == k
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert all((e - s) <= block and (e - s) % align == 0 for s, e in bounds)
    assert gram.gram_bytes(23040, 1024, 9) < 23040 ** 2 * 4 / 20


def test_plan_passes_respects_the_budget():
    sizes = {"a": 40, "b": 40, "c": 30, "big": 200, "d": 10}
    assert gram.plan_passes(sizes, 100) == [["a", "b"], ["c"], ["big"], ["d"]]
    assert gram.plan_passes(sizes, 10**6) == [list(sizes)]
    assert gram.plan_passes({}, 100) == [[]]


@pytest.fixture(scope="module")
def sd1():
    unet = tiny_unet("sd1")
    return unet, LoopRunner(unet, prompts=1, steps=3)


def test_budget_smaller_than_one_pass_still_covers_every_layer(sd1):
    unet, runner = sd1
    # every row of every call (no subsampling), so both runs see the same rows whatever the grouping
    fast = dict(workers=1, evaluate=False, consistency_pass=False, gram_cost=1e6)
    one = quantize(unet, runner, preset("W4A8", **fast))
    seen = []
    tight = quantize(unet, runner, preset("W4A8", gram_memory_mb=1, **fast), progress=lambda d, t: seen.append((d, t)))
    needed = sum(one.report["gram"]["bytes_per_pass"])
    assert one.report["gram"]["passes"] == 1 and needed > 3 * 2**20  # the tiny UNet needs several MiB
    passes = tight.report["gram"]["passes"]
    assert passes >= 3 and sum(tight.report["gram"]["bytes_per_pass"]) == needed
    assert tight.report["sampling_passes"] == passes
    assert rounding_coverage(one.report) == rounding_coverage(tight.report) == 1.0
    total = passes * runner.total_unet_calls
    assert seen[-1] == (total, total)
    # The same Gram matrices (same rows, accumulated in another grouping): the same codes.
    for name, state in one.layers.items():
        assert torch.equal(state.tensors["weight"], tight.layers[name].tensors["weight"]), name
    assert "error-compensated rounding on" in tight.summary()


def _cancel_inside_second_pass_leaves_model_untouched(sd1, config):
    """Cancel at the second call of the second sampling pass: weights bit-identical, no hook left anywhere."""
    unet, runner = sd1
    digest = weights_digest(unet)
    calls = runner.total_unet_calls

    class Cancelled(Exception):
        pass

    def progress(done, total):
        if done == calls + 2:
            raise Cancelled()

    with pytest.raises(Cancelled):
        quantize(unet, runner, config, progress=progress)
    assert weights_digest(unet) == digest
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in unet.modules())


def test_cancel_during_a_later_gram_pass_leaves_the_model_untouched(sd1):
    # a 1 MiB Gram budget: the second pass is a Gram-only capture pass
    _cancel_inside_second_pass_leaves_model_untouched(sd1, preset("W4A8", workers=1, gram_memory_mb=1))


def test_cancel_during_the_consistency_pass_with_its_evaluation_leaves_the_model_untouched(sd1):
    """The evaluation rides along in the consistency pass (float calls beside quantized ones): a cancel there
    leaves no hook on the float model or its modules, and its weights unchanged."""
    # one capture pass, so the second pass is the consistency pass
    _cancel_inside_second_pass_leaves_model_untouched(sd1, preset("W8A8", workers=1))


class _InferenceModeRunner:
    """The sampler of a host that samples under ``torch.inference_mode()`` (Forge does)."""

    def __init__(self, runner):
        self.runner, self.steps, self.total_unet_calls = runner, runner.steps, runner.total_unet_calls

    def __call__(self, unet):
        with torch.inference_mode():
            return self.runner(unet)


def test_calibration_sampled_under_inference_mode_keeps_error_compensated_rounding(sd1):
    """Gram sums made inside inference mode are normal tensors: the fit (outside it) normalizes them in place."""
    unet, runner = sd1
    fast = dict(workers=1, evaluate=False, consistency_pass=False)
    plain = quantize(unet, runner, preset("W4A8", **fast))
    inference = quantize(unet, _InferenceModeRunner(runner), preset("W4A8", **fast))
    assert rounding_coverage(inference.report) == 1.0
    for name, state in plain.layers.items():
        assert torch.equal(state.tensors["weight"], inference.layers[name].tensors["weight"]), name
