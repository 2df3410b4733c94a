"""Weight formats: int4 packing, int8 per-channel and two-level grouped int4 scales."""
import pytest
import torch

from quant_core.runtime import formats

from reference import fake_quant_w4, fake_quant_w8


@pytest.mark.parametrize("block", [None, 32, 64])
def test_int4_pack_unpack_is_exact_for_every_code(block):
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(-8, 8, (37, 128), generator=gen, dtype=torch.int8)
    codes[0, :16] = torch.arange(-8, 8, dtype=torch.int8)  # every value at least once
    packed = formats.pack_int4(codes, block)
    assert packed.dtype == torch.uint8 and packed.shape == (37, 64)
    assert torch.equal(formats.unpack_int4(packed, block), codes)


def test_int4_pack_layout_halves_per_block():
    codes = torch.tensor([[1, 7, -2, -8, 3, 0, -1, 5]], dtype=torch.int8)
    # block 4: byte j holds element j (low nibble) and element j + 2 (high nibble) of its block.
    packed = formats.pack_int4(codes, 4)
    assert packed.tolist() == [[0xE1, 0x87, 0xF3, 0x50]]


def test_int4_pack_rejects_bad_block():
    with pytest.raises(ValueError, match="even block"):
        formats.pack_int4(torch.zeros(2, 6, dtype=torch.int8), 4)


def test_int8_per_channel_matches_reference_and_bounds():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(64, 96, generator=gen) * torch.logspace(-2, 1, 64).unsqueeze(1)  # very different rows
    codes, scale = formats.quantize_int8_per_channel(w)
    assert codes.dtype == torch.int8 and scale.shape == (64,)
    deq = codes.double() * scale.double().unsqueeze(1)
    assert torch.allclose(deq, fake_quant_w8(w), rtol=0, atol=1e-6 * float(w.abs().max()))
    # Every element within half a step of the original: catches a wrong or shared scale.
    assert bool(((deq - w.double()).abs() <= scale.double().unsqueeze(1) / 2 + 1e-9).all())


def test_int8_clip_ratio_saturates_outliers():
    w = torch.tensor([[0.1, -0.2, 0.3, 10.0], [1.0, -1.0, 0.5, 0.25]])
    codes, scale = formats.quantize_int8_per_channel(w, clip=torch.tensor([0.05, 1.0]))
    assert scale[0].item() == pytest.approx(0.5 / 127, rel=1e-6)
    assert codes[0, 3].item() == 127  # the outlier saturates
    assert scale[1].item() == pytest.approx(1.0 / 127, rel=1e-6)
    with pytest.raises(ValueError, match="clip"):
        formats.quantize_int8_per_channel(w, clip=1.5)


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("in_features", [256, 200])  # 200: not a multiple of any group size
def test_int4_two_level_is_exact_int8_and_matches_reference(group_size, in_features):
    gen = torch.Generator().manual_seed(group_size + in_features)
    # Groups with very different magnitudes: an off-by-one group boundary would mis-scale them.
    w = torch.randn(48, in_features, generator=gen)
    w *= torch.rand(48, in_features // 8 + 1, generator=gen).repeat_interleave(8, dim=1)[:, :in_features] * 4
    q = formats.quantize_int4_grouped(w, group_size)
    assert q.packed.dtype == torch.uint8 and q.group_scale.dtype == torch.uint8
    assert int(q.group_scale.min()) >= 1 and int(q.group_scale.max()) <= 16
    w8 = q.to_int8()
    assert w8.dtype == torch.int8 and w8.shape == (48, in_features)
    # Two-level scales reproduce int8 values exactly: w8 == q4 * group_scale.
    codes = formats.unpack_int4(q.packed, group_size).view(48, -1, group_size).to(torch.int32)
    exact = (codes * q.group_scale.to(torch.int32).unsqueeze(2)).view(48, -1)[:, :in_features]
    assert torch.equal(w8.to(torch.int32), exact)
    deq = w8.double() * q.channel_scale.double().unsqueeze(1)
    assert torch.allclose(deq, fake_quant_w4(w, group_size), rtol=0, atol=1e-6)


def test_int4_rejects_unsupported_group_size():
    with pytest.raises(ValueError, match="group_size"):
        formats.quantize_int4_grouped(torch.randn(4, 64), group_size=48)
