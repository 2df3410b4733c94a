"""Model-family adapters on seeded small UNets: diffusers UNet2DConditionModel, a miniature ldm UNet
and (with COMFYUI_PATH) ComfyUI's own UNetModel."""
import pytest
import torch
import torch.nn as nn

from quant_core.models.adapters import UNetAdapter, UnsupportedModelError, detect_adapter

from unets import comfyui_unet, diffusers_unet, ldm_unet

BUILDERS = {"diffusers": diffusers_unet, "ldm": ldm_unet}
CASES = [(family, variant) for family in BUILDERS for variant in ("sd1", "sd2", "sdxl")]


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny models: one intra-op thread is faster, and far faster on a shared, busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _linear_and_conv(unet):
    return [name for name, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def _check_layer_split(unet, adapter):
    quant, kept = adapter.quantizable_layers(unet), adapter.float_layers(unet)
    everything = _linear_and_conv(unet)
    assert not set(quant) & set(kept)
    assert set(quant) | set(kept) == set(everything)
    assert list(quant) == [n for n in everything if n in quant]  # module order
    assert all(isinstance(m, (nn.Linear, nn.Conv2d)) and m is unet.get_submodule(n) for n, m in quant.items())
    assert all(isinstance(r, str) and r for r in kept.values())
    time_roots = [adapter.time_embedding_name(unet)] + adapter.time_projection_names(unet)
    assert not [n for n in quant if any(n == r or n.startswith(r + ".") for r in time_roots)]
    return quant, kept


@pytest.mark.parametrize("family,variant", CASES)
def test_detection_and_layer_split(family, variant):
    unet = BUILDERS[family](variant)
    adapter = detect_adapter(unet)
    assert adapter == UNetAdapter(family, variant)
    quant, kept = _check_layer_split(unet, adapter)
    ldm = family == "ldm"
    conv_in, conv_out = ("input_blocks.0.0", "out.2") if ldm else ("conv_in", "conv_out")
    assert conv_in in kept and conv_out in kept and "conv_in" in kept[conv_in]
    assert adapter.time_embedding_name(unet) == ("time_embed" if ldm else "time_embedding")
    embed = adapter.time_embedding_name(unet)
    assert [n for n in kept if n.startswith(embed + ".")] and "time MLP" in kept[f"{embed}.{'0' if ldm else 'linear_1'}"]

    projections = adapter.time_projection_names(unet)
    resblocks = [m for m in unet.modules() if type(m).__name__ in ("_ResBlock", "ResnetBlock2D")]
    assert len(projections) == len(resblocks) > 0
    for name in projections:
        module = unet.get_submodule(name)
        if ldm:
            assert name.endswith(".emb_layers") and isinstance(module, nn.Sequential)
            assert isinstance(module[0], nn.SiLU) and f"{name}.1" in kept
        else:
            assert name.endswith(".time_emb_proj") and isinstance(module, nn.Linear) and name in kept

    sdxl = variant == "sdxl"
    assert adapter.emb_depends_only_on_t(unet) is (not sdxl)
    extra = [n for n in kept if n.split(".")[0] in ("label_emb", "add_embedding")]
    assert bool(extra) is sdxl
    # What gets quantized: ResBlock convs, skip convs, resampling convs, transformer projections, attention, FF.
    suffixes = ((".in_layers.2", ".out_layers.3", ".skip_connection", ".op", ".conv", ".proj_in", ".proj_out",
                 ".attn1.to_q", ".attn2.to_k", ".attn2.to_v", ".attn1.to_out.0", ".ff.net.0", ".ff.net.2") if ldm else
                (".conv1", ".conv2", ".conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", ".proj_in",
                 ".proj_out", ".attn1.to_q", ".attn2.to_k", ".attn2.to_v", ".attn1.to_out.0", ".ff.net.0.proj",
                 ".ff.net.2"))
    for suffix in suffixes:
        assert any(n.endswith(suffix) for n in quant), suffix
    assert sum(isinstance(m, nn.Conv2d) for m in quant.values()) >= 8
    assert sum(isinstance(m, nn.Linear) for m in quant.values()) >= 20


def test_subclasses_count_and_odd_layers_stay_float():
    class MyLinear(nn.Linear):
        pass

    unet = diffusers_unet("sd1")
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    attn.to_q = MyLinear(32, 32, bias=False)
    resnet = unet.down_blocks[0].resnets[0]
    resnet.conv1 = nn.Conv2d(32, 32, 3, padding=1, groups=2)
    resnet.conv2 = nn.Conv2d(32, 32, 3, padding=1, padding_mode="reflect")
    unet.up_blocks[0].resnets[0].conv_shortcut = nn.Conv2d(128, 8, 1)
    ip_adapter = nn.Module()  # an add-on attention processor holding its own projections
    ip_adapter.to_k_ip = nn.Linear(768, 32, bias=False)
    unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.processor = ip_adapter
    adapter = detect_adapter(unet)
    quant, kept = _check_layer_split(unet, adapter)
    assert quant["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"] is attn.to_q
    assert "grouped" in kept["down_blocks.0.resnets.0.conv1"]
    assert "padding" in kept["down_blocks.0.resnets.0.conv2"]
    assert "fewer than 16" in kept["up_blocks.0.resnets.0.conv_shortcut"]
    assert "add-on" in kept["down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_ip"]


@pytest.mark.parametrize("module,needles", [
    (nn.Sequential(nn.Linear(4, 4), nn.ReLU()), ["Sequential", "0, 1"]),
    (type("FluxLike", (nn.Module,), {})(), ["FluxLike"]),
])
def test_unsupported_model_message(module, needles):
    if type(module).__name__ == "FluxLike":
        module.x_embedder = nn.Linear(4, 8)
        module.transformer_blocks = nn.ModuleList([nn.Linear(8, 8)])
        needles = needles + ["x_embedder, transformer_blocks", "diffusion transformer"]
    with pytest.raises(UnsupportedModelError) as info:
        detect_adapter(module)
    message = str(info.value)
    for needle in needles + ["SD1.x / SD2.x / SDXL UNets", "ldm layout", "diffusers layout"]:
        assert needle in message
    assert isinstance(info.value, ValueError)


def test_unsupported_lookalikes():
    from diffusers import UNet2DModel

    with pytest.raises(UnsupportedModelError, match="no cross-attention"):
        detect_adapter(UNet2DModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                                   down_block_types=("DownBlock2D", "DownBlock2D"),
                                   up_block_types=("UpBlock2D", "UpBlock2D")))
    wrapper = nn.Module()
    wrapper.diffusion_model = ldm_unet("sd1")
    with pytest.raises(UnsupportedModelError, match=r"pass its \.diffusion_model"):
        detect_adapter(wrapper)
    video = ldm_unet("sd1")
    video.input_blocks[1][0].time_stack = nn.Linear(32, 32)
    with pytest.raises(UnsupportedModelError, match="video"):
        detect_adapter(video)
    with pytest.raises(UnsupportedModelError, match="not a torch.nn.Module"):
        detect_adapter(object())


def test_timesteps_from_call():
    ldm, diff = UNetAdapter("ldm", "sd1"), UNetAdapter("diffusers", "sd1")
    x = torch.zeros(3, 4, 8, 8)
    t3 = torch.tensor([999, 500, 1])
    expected = torch.tensor([999.0, 500.0, 1.0])
    for adapter, key in ((ldm, "timesteps"), (diff, "timestep")):
        forms = [((x, t3), {}), ((x,), {key: t3}), ((), {"x" if adapter is ldm else "sample": x, key: t3}),
                 ((x, t3.double()), {"context": None})]
        for args, kwargs in forms:
            t = adapter.timesteps_from_call(args, kwargs)
            assert t.dtype == torch.float32 and torch.equal(t, expected)
        for scalar in (torch.tensor(999), torch.tensor([999.0]), 999, 999.0):
            for args, kwargs in (((x, scalar), {}), ((x,), {key: scalar})):
                t = adapter.timesteps_from_call(args, kwargs)
                assert t.shape == (3,) and t.dtype == torch.float32 and bool((t == 999).all())
        with pytest.raises(ValueError, match="no timestep"):
            adapter.timesteps_from_call((x,), {})
    # the sdxl-style diffusers call keeps its other keywords out of the way
    kwargs = {"encoder_hidden_states": torch.zeros(3, 5, 8), "added_cond_kwargs": {"time_ids": torch.zeros(3, 6)}}
    assert torch.equal(diff.timesteps_from_call((x, torch.tensor(7)), kwargs), torch.full((3,), 7.0))


@pytest.mark.parametrize("variant", ["sd1", "sdxl"])
def test_comfyui_unet_model(variant):
    unet = comfyui_unet(variant)
    adapter = detect_adapter(unet)
    assert adapter == UNetAdapter("ldm", variant)
    quant, kept = _check_layer_split(unet, adapter)
    assert {type(m).__module__ for m in quant.values()} == {"comfy.ops"}  # comfy.ops subclasses are found
    assert "input_blocks.0.0" in kept and "out.2" in kept and "time_embed.0" in kept
    assert len(adapter.time_projection_names(unet)) == 8
    assert adapter.emb_depends_only_on_t(unet) is (variant == "sd1")
    assert ("label_emb.0.0" in kept) is (variant == "sdxl")
    assert len(quant) > 90
