"""Unit tests for the calibration building blocks: capture, groups, fitting, planner, model tree."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from quant_core.calibrate import capture, fitting, planner, timegroups
from quant_core.models import modeltree
from quant_core.runtime import context as step_routing
from quant_core.config import QuantConfig, preset


# ---------------------------------------------------------------- timestep groups

def test_plan_groups_finds_the_range_jump():
    keys = [999.0, 800.0, 600.0, 400.0, 200.0, 1.0]
    # Layer ranges: large for the first three steps, small after; a second layer is constant.
    ranges = torch.tensor([[8.0, 8.0, 7.0, 1.0, 1.0, 0.9], [2.0] * 6])
    assert timegroups.plan_groups(keys, ranges, 2) == [[999.0, 800.0, 600.0], [400.0, 200.0, 1.0]]
    assert timegroups.plan_groups(keys, ranges, 1) == [keys]
    # Flat ranges: extra groups would not help, so fewer are used.
    assert len(timegroups.plan_groups(keys, torch.ones(3, 6), 4)) == 1


def test_group_of_maps_seen_and_unseen_timesteps_to_nearest_group():
    groups = [[999.0, 800.0], [600.0, 400.0], [200.0, 1.0]]
    thresholds = step_routing.group_thresholds(groups)
    assert thresholds == [700.0, 300.0]
    assert [step_routing.group_of(t, thresholds) for t in (999.0, 1500.0, 700.5, 650, 400, 250, 0.0)] == [0, 0, 0, 1, 1, 2, 2]


# ---------------------------------------------------------------- planner

def test_planner_respects_budget_and_promotes_most_sensitive_first():
    sizes = {"a": 100, "b": 100, "c": 100, "d": 100}
    errors = {"a": {4: 0.5, 8: 0.01}, "b": {4: 0.05, 8: 0.001}, "c": {4: 0.02, 8: 0.0005}, "d": {4: 0.3, 8: 0.2}}
    plan = planner.plan_precision(sizes, errors, base_bits=4, budget=5.0)
    assert plan == {"a": 8, "b": 4, "c": 4, "d": 4}
    assert planner.average_bits(plan, sizes) <= 5.0
    roomy = planner.plan_precision(sizes, errors, base_bits=4, budget=16.0)
    assert set(roomy.values()) == {16}


def test_random_plan_spends_the_same_budget_without_looking_at_errors():
    sizes = {f"l{i}": 100 * (i + 1) for i in range(12)}
    plan = planner.plan_random(sizes, base_bits=4, budget=5.0, seed=3)
    assert plan == planner.plan_random(sizes, base_bits=4, budget=5.0, seed=3)  # seeded
    assert set(plan.values()) == {4, 8} and planner.average_bits(plan, sizes) <= 5.0
    # nothing more fits: every remaining W4 layer would break the budget
    spare = 5.0 * sum(sizes.values()) - sum(plan[n] * sizes[n] for n in sizes)
    assert all(4 * sizes[n] > spare for n in sizes if plan[n] == 4)
    assert any(planner.plan_random(sizes, 4, 5.0, seed=s) != plan for s in range(4, 8))


# ---------------------------------------------------------------- fitting

def _layer_data(seed=0, k=128, n=64, rows=512):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    w[:, 3] *= 12  # an outlier input channel, as trained nets have
    x = torch.randn(rows, k, generator=gen)
    x[:, 7] *= 20  # an outlier activation channel
    return w, x


@pytest.mark.parametrize("bits", [8, 4])
def test_weight_clip_search_never_worse_than_minmax(bits):
    w, x = _layer_data()
    clip = fitting.search_weight_clip(w, x, bits, 64)
    assert clip.shape == (64,) and float(clip.min()) >= 0.5 and float(clip.max()) <= 1.0

    def out_err(c):
        return float((x @ (w - fitting.fake_quant_weight(w, bits, 64, c)).t()).pow(2).sum())
    searched, minmax = out_err(clip), out_err(None)
    assert searched <= minmax
    if bits == 4:
        assert searched < 0.9 * minmax  # 4-bit clipping pays off clearly on Gaussian weights


def test_act_scale_search_beats_amax_with_outliers():
    w, x = _layer_data(1)
    x[0, 0] = 400.0  # one extreme value sets amax
    wq = fitting.fake_quant_weight(w, 8, 64)
    amax = float(x.abs().max())
    scale, rel = fitting.search_act_scale(x, amax, w, wq)
    _, rel_amax = fitting.search_act_scale(x, amax, w, wq, candidates=(1.0,))
    assert scale < amax / 127 and rel < rel_amax


def test_fit_all_is_order_free_and_deterministic():
    cfg = QuantConfig(weight_bits=4, timestep_groups=2, workers=2)
    caps, weights = {}, {}
    for i, name in enumerate(["b.layer", "a.layer", "c.layer"]):
        w, x = _layer_data(i)
        weights[name] = w
        cap = capture.LayerCapture(name, "linear", w.shape[1], 64)
        for key, part in ((900.0, x[:256]), (100.0, x[256:] * 0.3)):
            cap.steps[key] = capture.StepRecord(amax=float(part.abs().max()), rows=part.half(),
                                                priorities=torch.rand(part.shape[0]))
        caps[name] = cap
    groups = [[900.0], [100.0]]
    first = fitting.fit_all(weights, caps, groups, (4,), cfg)
    reordered = fitting.fit_all(dict(reversed(list(weights.items()))), caps, groups, (4,), QuantConfig(
        weight_bits=4, timestep_groups=2, workers=1))
    for name in weights:
        a, b = first[name][4], reordered[name][4]
        assert torch.equal(a.clip, b.clip) and torch.equal(a.act_scales, b.act_scales)
        assert a.act_scales[1] < a.act_scales[0]  # the quieter group gets the finer scale


# ---------------------------------------------------------------- capture

class _TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.proj = nn.Linear(8, 16)

    def forward(self, x, timesteps):
        h = self.conv(x)
        return self.proj(h.flatten(2).transpose(1, 2))


def _ts(args, kwargs):
    return args[1]


def test_conv_patch_sampling_equals_unfold():
    conv = nn.Conv2d(4, 8, 3, stride=2, padding=1, dilation=1)
    x = torch.randn(2, 4, 9, 7)
    cols = F.unfold(x, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 36)
    out_h, out_w = 5, 4
    index = torch.tensor([0, 3, 7, 19, 20, 39])
    patches = capture._sample_conv_patches(x, conv, index, out_w, out_h * out_w)
    assert torch.equal(patches, cols[index])


def test_capture_records_steps_bounded_rows_and_removes_hooks():
    torch.manual_seed(0)
    model = _TwoLayer()
    layers = {"conv": model.conv, "proj": model.proj}
    seen = []

    def runner(unet):
        for prompt in range(3):
            for t in (900.0, 500.0, 100.0):
                unet(torch.randn(2, 4, 16, 16) * (t / 100), torch.full((2,), t))

    result = capture.capture(model, layers, runner, _ts, steps_hint=3, memory_limit_bytes=4096,
                             progress=lambda d, t: seen.append(d), total_calls=9)
    assert result.timesteps == [900.0, 500.0, 100.0] and result.unet_calls == 9 and seen == list(range(1, 10))
    conv_cap = result.layers["conv"]
    assert conv_cap.kind == "conv" and conv_cap.reduce_dim == 36
    for key in result.timesteps:
        rec = conv_cap.steps[key]
        assert rec.calls == 3 and rec.rows.shape[0] == conv_cap.rows_per_step
    assert conv_cap.steps[900.0].amax > conv_cap.steps[100.0].amax
    assert result.bytes > 0
    assert not model._forward_pre_hooks and not model.conv._forward_pre_hooks and not model.proj._forward_pre_hooks
    # Seeded: the same run gives the same reservoirs.
    twin = _TwoLayer()
    twin.load_state_dict(model.state_dict())
    torch.manual_seed(1)
    first = capture.capture(model, layers, runner, _ts, 3, 4096)
    torch.manual_seed(1)
    again = capture.capture(twin, {"conv": twin.conv, "proj": twin.proj}, runner, _ts, 3, 4096)
    for name in layers:
        for key in result.timesteps:
            assert torch.equal(again.layers[name].steps[key].rows, first.layers[name].steps[key].rows)


def test_capture_cancel_removes_hooks():
    model = _TwoLayer()

    def cancel(done, total):
        if done == 2:
            raise KeyboardInterrupt("cancelled by user")

    def runner(unet):
        for t in (900.0, 500.0, 100.0):
            unet(torch.randn(1, 4, 8, 8), torch.tensor([t]))

    with pytest.raises(KeyboardInterrupt):
        capture.capture(model, {"conv": model.conv, "proj": model.proj}, runner, _ts, 3, 2**20, progress=cancel)
    assert not model._forward_pre_hooks and not model.conv._forward_pre_hooks and not model.proj._forward_pre_hooks


def test_capture_without_unet_calls_is_a_clear_error():
    model = _TwoLayer()
    with pytest.raises(RuntimeError, match="never called the UNet"):
        capture.capture(model, {"proj": model.proj}, lambda unet: None, _ts, 3, 2**20)


def test_reservoir_budget_scales_with_memory_limit():
    layers = {"a": nn.Linear(320, 320), "b": nn.Conv2d(320, 320, 3)}
    small = capture.rows_per_step_budget(layers, 20, 1 << 20)
    large = capture.rows_per_step_budget(layers, 20, 256 << 20)
    assert small["a"] < large["a"] and small["b"] <= large["b"]
    assert all(capture.MIN_ROWS_PER_STEP <= v <= capture.MAX_ROWS_PER_STEP for v in {**small, **large}.values())


# ---------------------------------------------------------------- model tree and config

def test_clone_module_tree_shares_weights_and_isolates_swaps():
    model = _TwoLayer()
    digest = modeltree.weights_digest(model)
    clone = modeltree.clone_module_tree(model)
    assert clone.conv.weight is model.conv.weight
    modeltree.set_submodule(clone, "proj", nn.Identity())
    clone.register_forward_pre_hook(lambda m, a: None)
    assert isinstance(model.proj, nn.Linear) and not model._forward_pre_hooks
    assert modeltree.weights_digest(model) == digest
    with pytest.raises(KeyError):
        modeltree.set_submodule(clone, "missing", nn.Identity())


def test_fingerprint_matches_across_dtypes_but_not_finetunes():
    torch.manual_seed(0)
    layers = {"a": nn.Linear(64, 64), "b": nn.Conv2d(8, 8, 3)}
    base = modeltree.fingerprint(layers)
    half = modeltree.fingerprint({n: _copy(m).half() for n, m in layers.items()})
    bf16 = modeltree.fingerprint({n: _copy(m).bfloat16() for n, m in layers.items()})
    assert modeltree.fingerprints_match(base, half) and modeltree.fingerprints_match(base, bf16)
    tuned = {n: _copy(m) for n, m in layers.items()}
    with torch.no_grad():
        tuned["a"].weight.mul_(1.01)
    assert not modeltree.fingerprints_match(base, modeltree.fingerprint(tuned))


def _copy(module):
    import copy
    return copy.deepcopy(module)


def test_presets_and_config_validation():
    assert preset("W4A8-mixed").mixed_precision and preset("naive-W8A8").timestep_groups == 1
    with pytest.raises(ValueError, match="unknown preset"):
        preset("W3A3")
    with pytest.raises(ValueError, match="weight_bits"):
        QuantConfig(weight_bits=6)
    assert QuantConfig.from_dict(QuantConfig(timestep_groups=3).to_dict()).timestep_groups == 3


# ---------------------------------------------------------------- metrics

def test_psnr_ssim_known_values():
    from quant_core import metrics
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 32, 32, generator=gen)
    assert torch.isinf(metrics.psnr(a, a)).all() and torch.allclose(metrics.ssim(a, a), torch.ones(2, dtype=torch.float64))
    b = (a + 0.1).clamp(0, 1)
    expected = 10 * torch.log10(1 / ((a - b) ** 2).flatten(1).mean(1).double())
    assert torch.allclose(metrics.psnr(a, b), expected)
    noisy = (a + 0.2 * torch.randn(a.shape, generator=gen)).clamp(0, 1)
    s_noisy, s_shift = metrics.ssim(a, noisy), metrics.ssim(a, b)
    assert bool((s_noisy < 0.9).all()) and bool((s_noisy < s_shift).all())  # structure loss < brightness shift
    with pytest.raises(ValueError, match="same shape"):
        metrics.psnr(a, a[:, :, :16])


def test_memory_gate_lets_large_fit_jobs_take_turns_and_small_ones_overlap():
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from quant_core.calibrate.host_memory import MemoryGate

    gate, lock = MemoryGate(1000), threading.Lock()
    state = {"now": 0, "peak": 0}

    def job(nbytes):
        with gate.hold(nbytes):
            with lock:
                state["now"] += nbytes
                state["peak"] = max(state["peak"], state["now"])
            time.sleep(0.02)
            with lock:
                state["now"] -= nbytes

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(job, [600, 600, 1500, 600]))  # each pair of these exceeds the budget
    assert state["peak"] == 1500  # the oversized job ran, alone
    state.update(now=0, peak=0)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(job, [300] * 8))
    assert 600 <= state["peak"] <= 900  # small jobs overlap, never past the budget
