"""NVFP4 / MXFP4 / INT4 block quantization: layout, round trips, storage, and Model Optimizer agreement."""

import pytest
import torch

from labs_lib.blockquant import MXFP4, NVFP4, IntGroup, PerTensor, pack_nibbles, unpack_nibbles
from labs_lib.formats import cast

modelopt_qtensor = pytest.importorskip("modelopt.torch.quantization.qtensor")


def test_nibble_order_low_is_even_element():
    codes = torch.tensor([[0x1, 0xA, 0x7, 0x0]])
    assert pack_nibbles(codes).tolist() == [[0xA1, 0x07]]
    assert torch.equal(unpack_nibbles(pack_nibbles(codes)), codes.to(torch.uint8))


def test_nvfp4_bytes_equal_model_optimizer(bf16_weight):
    ours = NVFP4().quantize(bf16_weight)
    packed, scale, scale_2 = modelopt_qtensor.NVFP4QTensor.quantize(bf16_weight.clone(), 16)
    assert torch.equal(ours["weight"], packed._quantized_data)
    assert torch.equal(ours["weight_scale"].view(torch.uint8), scale.view(torch.uint8))
    assert torch.equal(ours["weight_scale_2"], scale_2)


def test_nvfp4_layout_and_scales(bf16_weight):
    q = NVFP4().quantize(bf16_weight)
    assert q["weight"].dtype == torch.uint8 and q["weight"].shape == (64, 128)
    assert q["weight_scale"].dtype == torch.float8_e4m3fn and q["weight_scale"].shape == (64, 16)
    assert q["weight_scale_2"].item() == pytest.approx(bf16_weight.abs().max().item() / (6 * 448), rel=1e-6)
    assert q["weight_scale"].float().max().item() == 448.0  # the largest block scale lands on E4M3's max


def test_fake_quantize_equals_dequantize_of_quantize(bf16_weight):
    schemes = [NVFP4(), MXFP4(), MXFP4(scale_rule="ceil"), IntGroup(4, 64), IntGroup(4, 32, symmetric=False),
               PerTensor("fp8_e4m3")]
    for scheme in schemes:
        round_trip = scheme.dequantize(scheme.quantize(bf16_weight)).reshape(bf16_weight.shape)
        assert torch.equal(scheme.fake_quantize(bf16_weight), round_trip), scheme


def test_nvfp4_values_lie_on_the_grid(bf16_weight):
    q = NVFP4().quantize(bf16_weight)
    deq = NVFP4().dequantize(q).reshape(64, 16, 16)
    scale = (q["weight_scale"].float() * q["weight_scale_2"]).unsqueeze(-1)
    ratio = deq / scale  # back on the E2M1 grid, up to float32 rounding of the multiply and divide
    assert torch.allclose(cast(ratio, "fp4_e2m1"), ratio, rtol=1e-6, atol=0)


def test_mxfp4_ocp_scale_rule():
    w = torch.tensor([[5.0] + [0.1] * 31, [0.75] + [0.0] * 31, [7.9] + [1.0] * 31])
    q = MXFP4().quantize(w)
    # floor(log2 5) - 2 = 0, floor(log2 .75) - 2 = -3, floor(log2 7.9) - 2 = 0  (E8M0 bias 127)
    assert q["weight_scale"].flatten().tolist() == [127, 124, 127]
    assert MXFP4().dequantize(q)[2, 0].item() == 6.0  # 7.9 saturates to 6 x 2^0 under the OCP rule


def test_mxfp4_ceil_exponent_is_exact_at_powers_of_two(mxfp4_ceil_blocks):
    blocks, expected = mxfp4_ceil_blocks
    assert MXFP4(scale_rule="ceil").scale_exponents(blocks).flatten().tolist() == expected


def test_mxfp4_ceil_matches_model_optimizer_except_at_ties(bf16_weight):
    packed, scales = modelopt_qtensor.MXFP4QTensor.quantize(bf16_weight.clone(), 32)
    scheme = MXFP4(scale_rule="ceil")
    ours = scheme.quantize(bf16_weight)
    assert torch.equal(scales.flatten(), ours["weight_scale"].flatten())
    theirs = packed.dequantize(torch.float32, scale=scales, block_sizes={-1: 32})
    exponent = scheme.scale_exponents(bf16_weight).unsqueeze(-1)
    scaled = torch.ldexp(bf16_weight.double().reshape(64, -1, 32), -exponent).reshape(bf16_weight.shape)
    tie = torch.isin(scaled.abs(), torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=torch.float64))
    differ = theirs != scheme.dequantize(ours)
    assert (differ <= tie).all()  # Model Optimizer rounds ties toward zero, we round them to even


def test_int4_group_symmetric_and_asymmetric(bf16_weight):
    sym = IntGroup(4, 64).quantize(bf16_weight)
    assert sym["codes"].min() >= -8 and sym["codes"].max() <= 7 and sym["scale"].dtype == torch.float16
    asym = IntGroup(4, 64, symmetric=False).quantize(bf16_weight)
    assert asym["codes"].min() >= 0 and asym["codes"].max() <= 15
    def err(s):
        return (s.fake_quantize(bf16_weight) - bf16_weight.float()).norm()

    assert err(IntGroup(4, 32)) < err(IntGroup(4, 128))  # smaller groups, smaller error


def test_group_size_must_divide_width():
    with pytest.raises(ValueError, match="576 is not a multiple of the block size 128"):
        IntGroup(4, 128).quantize(torch.zeros(4, 576))


def test_bits_per_weight_counts_scales():
    assert NVFP4().bits_per_weight() == 4.5
    assert MXFP4().bits_per_weight() == 4.25
    assert IntGroup(4, 128).bits_per_weight() == 4.125
    assert IntGroup(4, 128, symmetric=False).bits_per_weight() == 4 + 20 / 128
    assert NVFP4().storage_bytes((576, 1536)) == pytest.approx(576 * 1536 * 4.5 / 8 + 4)


def test_nvfp4_fake_quantize_is_fast():
    import time

    w = torch.randn(576, 1536)
    NVFP4().fake_quantize(w)
    start = time.perf_counter()
    NVFP4().fake_quantize(w)
    assert time.perf_counter() - start < 0.5  # milliseconds in practice; generous for a busy CI machine


def test_static_global_amax_saturates_larger_inputs():
    x = torch.tensor([[1.0] * 15 + [10.0]])
    assert PerTensor("fp8_e4m3").fake_quantize(x, global_amax=torch.tensor(4.0)).max().item() == 4.0
    assert NVFP4().fake_quantize(x, global_amax=torch.tensor(10.0)).max().item() == pytest.approx(10.0)
