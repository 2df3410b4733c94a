"""Error-compensating weight rounding (quant_core/calibrate/rounding.py) and its use in fitting and layer building."""
import pytest
import torch

from quant_core.calibrate import fitting, rounding
from quant_core.runtime import formats
from quant_core.config import QuantConfig
from quant_core.runtime.layers import QuantLinear


def _correlated_inputs(n, k, seed):
    """Rows with strongly correlated channels and a few outlier channels, like real activations."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=gen) / k ** 0.5 + torch.eye(k)
    x = torch.randn(n, k, generator=gen) @ mix
    x[:, :4] *= 8.0
    return x


def _output_error(x, w, w_hat):
    return float((x @ (w - w_hat).t()).norm() / (x @ w.t()).norm())


@pytest.mark.parametrize("bits", [4, 8])
def test_codes_lie_on_the_format_grid_and_beat_round_to_nearest(bits):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(48, 192, generator=gen)
    x = _correlated_inputs(1024, 192, 2)
    h = rounding.input_gram(x)
    grid = formats.quantize_weight(w, bits, 64)
    step, qmin, qmax = grid.grid_step(), grid.qmin, grid.qmax
    codes = rounding.round_with_error_feedback(w, step, qmin, qmax, h)
    assert codes.dtype == torch.int32 and int(codes.min()) >= qmin and int(codes.max()) <= qmax
    rtn = torch.clamp(torch.round(w / step), qmin, qmax)
    assert float((codes != rtn).float().mean()) > 0.02  # it changes roundings (same grid, other codes)
    err_gptq = _output_error(x, w, codes * step)
    err_rtn = _output_error(x, w, rtn * step)
    print(f"W{bits}: output error RTN {err_rtn:.4f} vs error-compensated {err_gptq:.4f}")
    assert err_gptq < 0.8 * err_rtn  # measured ~0.55-0.6x on these inputs
    # the per-channel error helper equals the direct computation
    direct = ((x.double() @ (w - codes * step).double().t()) ** 2).mean(0)
    torch.testing.assert_close(rounding.output_error_per_channel(w - codes * step, h).double(), direct, rtol=1e-4, atol=1e-9)


def test_identity_inputs_reduce_to_round_to_nearest():
    """With uncorrelated unit inputs there is nothing to compensate: the result is plain rounding."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(16, 64, generator=gen)
    grid = formats.quantize_weight(w, 4, 32)
    step, qmin, qmax = grid.grid_step(), grid.qmin, grid.qmax
    codes = rounding.round_with_error_feedback(w, step, qmin, qmax, torch.eye(64, dtype=torch.float64))
    assert torch.equal(codes, torch.clamp(torch.round(w / step), qmin, qmax).to(torch.int32))


def test_dead_input_channels_do_not_break_the_factorisation():
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(8, 64, generator=gen)
    x = _correlated_inputs(256, 64, 5)
    x[:, 10] = 0  # a channel that never fires
    grid = formats.quantize_weight(w, 8, 64)
    step, qmin, qmax = grid.grid_step(), grid.qmin, grid.qmax
    codes = rounding.round_with_error_feedback(w, step, qmin, qmax, rounding.input_gram(x))
    assert torch.isfinite(codes.float()).all()


def test_fitted_codes_are_what_the_built_layer_holds():
    """search_clip_error_feedback's weight survives the pipeline's layer construction bit for bit."""
    from quant_core.calibrate.pipeline import layer_state

    gen = torch.Generator().manual_seed(6)
    linear = torch.nn.Linear(200, 40)  # K not a multiple of the group size: padding path
    with torch.no_grad():
        linear.weight.copy_(torch.randn(40, 200, generator=gen) * 0.05)
    x = _correlated_inputs(512, 200, 7)
    h = rounding.input_gram(x)
    for bits in (4, 8):
        rounder = rounding.BlockRounder([(slice(0, 200), h)])
        clip, value = fitting.search_clip_error_feedback(linear.weight.detach(), rounder, bits, 64)
        w8, scale = value.to_int8(), value.channel_scale
        assert all(any(abs(c - g) < 1e-6 for g in fitting.GPTQ_CLIP_CANDIDATES) for c in clip.tolist())
        fit = fitting.LayerFit(value, clip, torch.ones(1), 0.0, "gptq")
        layer = layer_state(linear, fit, QuantConfig(weight_bits=bits, group_size=64)).build()
        assert torch.equal(layer.int8_weight_2d(), w8)
        torch.testing.assert_close(layer.weight_scale, scale)
        # and its output error is below the round-to-nearest layer's with the same clip
        rtn = QuantLinear.from_float(linear, weight_bits=bits, group_size=64, weight_clip=clip)
        w = linear.weight.detach()
        assert _output_error(x, w, layer.dequantize_weight()) < _output_error(x, w, rtn.dequantize_weight())


def test_config_rejects_unknown_rounding():
    with pytest.raises(ValueError, match="weight_rounding"):
        QuantConfig(weight_rounding="stochastic")


def _gram_of(x: torch.Tensor, block: int):
    from quant_core.calibrate.gram import GramAccumulator

    acc = GramAccumulator(x.shape[1], block)
    acc.add(x)
    return acc


def test_rounding_plan_follows_the_row_threshold_and_names_the_reason():
    """gptq_min_rows decides between damped error-compensated rounding and a named round-to-nearest fallback."""
    x = _correlated_inputs(64, 128, 9)
    few = _gram_of(x, 1024)
    assert fitting.rounding_plan(few, QuantConfig(weight_bits=4))[0] is not None  # default: damped, never dropped
    rounder, reason = fitting.rounding_plan(few, QuantConfig(weight_bits=4, gptq_min_rows=1.0))
    assert rounder is None and "64 captured rows < 1 x 128" in reason
    assert fitting.rounding_plan(None, QuantConfig(weight_bits=4))[1] == "no input rows were captured for it"
    assert fitting.rounding_plan(few, QuantConfig(weight_bits=4, weight_rounding="nearest")) == (None, "")


def test_block_rounder_with_one_block_is_the_full_rounder_and_blocks_compensate_within():
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(24, 192, generator=gen) * 0.05
    x = _correlated_inputs(1024, 192, 12)
    grid = formats.quantize_weight(w, 4, 64)
    step, qmin, qmax = grid.grid_step(), grid.qmin, grid.qmax
    full = rounding.round_with_error_feedback(w, step, qmin, qmax, rounding.input_gram(x))
    one = rounding.BlockRounder(_gram_of(x, 192).blocks()).round(w, step, qmin, qmax)
    assert torch.equal(one, full)
    blocked = rounding.BlockRounder(_gram_of(x, 64).blocks())
    assert len(blocked.parts) == 3
    codes = blocked.round(w, step, qmin, qmax)
    rtn = torch.clamp(torch.round(w / step), qmin, qmax)
    # Block-diagonal H keeps most of the gain: between the full rounding and round-to-nearest.
    assert _output_error(x, w, full * step) < _output_error(x, w, codes * step) < _output_error(x, w, rtn * step)
