"""labs_lib.formats against torch's and ml_dtypes' own casts: every code, and a million values."""

import ml_dtypes
import numpy as np
import pytest
import torch

from labs_lib.formats import FORMATS, cast, decode, encode, get_format

TORCH_DTYPES = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}
UINT_VIEW = {32: torch.int32, 16: torch.int16, 8: torch.uint8}
ML_DTYPES = {"fp4_e2m1": ml_dtypes.float4_e2m1fn, "e8m0": ml_dtypes.float8_e8m0fnu}


def reference_decode(codes: torch.Tensor, name: str) -> torch.Tensor:
    """Values of bit patterns according to torch (or ml_dtypes for E2M1 and E8M0)."""
    f = FORMATS[name]
    if name in TORCH_DTYPES:
        raw = codes.to(torch.int64)
        if f.bits == 32:
            raw = torch.where(raw >= 2**31, raw - 2**32, raw)
        elif f.bits == 16:
            raw = torch.where(raw >= 2**15, raw - 2**16, raw)
        return raw.to(UINT_VIEW[f.bits]).view(TORCH_DTYPES[name]).float()
    return torch.from_numpy(codes.numpy().astype(np.uint8).view(ML_DTYPES[name]).astype(np.float32))


def reference_cast(x: torch.Tensor, name: str) -> torch.Tensor:
    if name in TORCH_DTYPES:
        return x.to(TORCH_DTYPES[name]).float()
    return torch.from_numpy(x.numpy().astype(ML_DTYPES[name]).astype(np.float32))


def same(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Bitwise equality of float32 values, NaN == NaN, -0 != +0."""
    both_nan = torch.isnan(a) & torch.isnan(b)
    return both_nan | (a.view(torch.int32) == b.view(torch.int32))


def all_codes(name: str) -> torch.Tensor:
    f = FORMATS[name]
    if f.bits <= 16:
        return torch.arange(2**f.bits)
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 2**32, (1_000_000,), generator=g, dtype=torch.int64)


@pytest.mark.parametrize("name", list(TORCH_DTYPES) + list(ML_DTYPES))
def test_decode_every_code(name):
    codes = all_codes(name)
    ours, ref = decode(codes, name), reference_decode(codes, name)
    assert same(ours, ref).all(), codes[~same(ours, ref)][:10]


@pytest.mark.parametrize("name", list(TORCH_DTYPES) + list(ML_DTYPES))
def test_encode_inverts_decode(name):
    codes = all_codes(name)
    values = decode(codes, name)
    keep = ~torch.isnan(values)
    assert (encode(values[keep], name) == codes[keep]).all()
    if FORMATS[name].has_nan:
        assert torch.isnan(decode(encode(torch.tensor([float("nan")]), name), name)).all()


def hard_values(name: str, n: int = 1_100_000) -> torch.Tensor:
    """Random values of every magnitude, plus exact ties, subnormals and overflow of the format."""
    f = FORMATS[name]
    g = torch.Generator().manual_seed(1)
    lo, hi = np.log2(f.min_subnormal) - 3, np.log2(f.max) + 2
    mags = torch.exp2(torch.rand(n, generator=g, dtype=torch.float64) * (hi - lo) + lo)
    random = mags * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    if not f.signed:
        random = mags
    # midpoints between neighbouring representable values are the round-half-to-even cases
    grid = decode(all_codes(name) if f.bits <= 16 else torch.arange(0, 2**32, 4099), name).double()
    grid = torch.unique(grid[torch.isfinite(grid)])
    ties = (grid[1:] + grid[:-1]) / 2
    near = torch.cat([ties, torch.nextafter(ties, grid[1:]), torch.nextafter(ties, grid[:-1])])
    x = torch.cat([random, near, grid, torch.tensor([0.0, -0.0, f.max * 1.01, -f.max * 4, 1e30, -1e30])])
    if f.bits < 32:
        x = x.float().double()  # the reference casts take float32 inputs
    return x


@pytest.mark.parametrize("input_dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", list(TORCH_DTYPES) + list(ML_DTYPES))
def test_cast_matches_reference(name, input_dtype):
    f = FORMATS[name]
    x = hard_values(name)
    if name == "e8m0":
        x = x.abs()
        # E8M0 holds positive scales only (see test_e8m0_rejects_zero_and_negative); float32
        # subnormal inputs are a known quirk of both libraries (see test_e8m0_library_quirk)
        x = x[(x > 0) & ((x >= 2.0**-126) | (x <= 2.0**-127))]
    assert len(x) >= 1_000_000
    ours = cast(x.to(input_dtype), name)
    xf = x.float()
    if f.saturates:  # satfinite: clamp, then round (torch >= 2.13 does this itself, older torch gives NaN)
        xf = xf.clamp(f.min, f.max)
    expected = reference_cast(xf, name)
    mismatch = ~same(ours, expected)
    assert not mismatch.any(), (x[mismatch][:5], ours[mismatch][:5], expected[mismatch][:5])


def test_fp32_cast_from_float64_rounds_once():
    g = torch.Generator().manual_seed(2)
    binades = torch.exp2(torch.randint(-140, 120, (1_000_000,), generator=g)).double()
    x = torch.randn(1_000_000, generator=g, dtype=torch.float64) * binades
    assert same(cast(x, "fp32"), x.float()).all()


def test_e2m1_layout_and_values():
    f = get_format("fp4_e2m1")
    assert (f.sign_bits, f.exponent_bits, f.mantissa_bits, f.bias) == (1, 2, 1, 1)
    assert f.values.tolist() == [-6, -4, -3, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert cast(torch.tensor([0.25, 0.75, 2.5, 5.0, 7.0, -100.0]), f).tolist() == [0.0, 1.0, 2.0, 4.0, 6.0, -6.0]


def test_published_ranges():
    assert (FORMATS["fp8_e4m3"].max, FORMATS["fp8_e4m3"].min_subnormal) == (448.0, 2.0**-9)
    assert (FORMATS["fp8_e5m2"].max, FORMATS["fp8_e5m2"].min_subnormal) == (57344.0, 2.0**-16)
    assert FORMATS["fp16"].max == 65504.0
    assert FORMATS["bf16"].max == float(torch.finfo(torch.bfloat16).max)
    assert FORMATS["e8m0"].max == 2.0**127 and FORMATS["e8m0"].min_subnormal == 2.0**-127
    assert len(FORMATS["fp8_e4m3"].values) == 253  # 256 codes - 2 NaN - one duplicate zero


def test_e8m0_rejects_zero_and_negative():
    assert torch.isnan(cast(torch.tensor([0.0, -1.0, 2.0**128]), "e8m0")).all()


def test_e8m0_library_quirk():
    """torch and ml_dtypes round E8M0 from float32 bits: inputs in (2^-127, 2^-126), which float32
    holds only as subnormals, go up to 2^-126 even below the midpoint. labs_lib rounds to nearest."""
    x = torch.tensor([6.2e-39, 8.9e-39])  # midpoint of 2^-127 and 2^-126 is 8.8e-39
    assert reference_cast(x, "e8m0").tolist() == [2.0**-126, 2.0**-126]
    assert cast(x, "e8m0").tolist() == [2.0**-127, 2.0**-126]


def test_integers_round_half_even_and_saturate():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -7.6, 8.0, 100.0, -9.0])
    assert cast(x, "int4").tolist() == [0, 2, 2, -0, -8, 7, 7, -8]
    assert encode(torch.tensor([-1.0, -8.0, 7.0]), "int4").tolist() == [15, 8, 7]
    assert decode(torch.arange(256), "int8").tolist() == list(range(0, 128)) + list(range(-128, 0))


def test_nan_into_format_without_nan_is_an_error():
    with pytest.raises(ValueError, match="no NaN"):
        cast(torch.tensor([float("nan")]), "fp4_e2m1")


def test_unknown_format_names_the_choices():
    with pytest.raises(ValueError, match="fp8_e4m3"):
        get_format("fp7")
