"""Number formats of LLM quantization, bit-exact: describe, cast (round to nearest), encode, decode.

One rounding routine serves every binary floating-point format, from FP32 down to FP4 E2M1,
so a learner can read exactly how each format rounds; the tests hold it to torch and ml_dtypes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

__all__ = ["Format", "FORMATS", "get_format", "cast", "encode", "decode"]


@dataclass(frozen=True)
class Format:
    """Bit layout of a number format and the values it can hold.

    `special` names how the all-ones exponent is used: "ieee" (inf and NaNs, as FP32/FP16/BF16/E5M2),
    "fn" (finite, one NaN code per sign: E4M3FN), "none" (every code is a number: E2M1),
    "ff_nan" (unsigned E8M0, code 0xFF is NaN). Integer formats are two's complement.
    """

    name: str
    bits: int
    kind: str  # "float" or "int"
    exponent_bits: int = 0
    mantissa_bits: int = 0
    bias: int = 0
    signed: bool = True
    special: str = "none"

    @property
    def sign_bits(self) -> int:
        return 1 if self.signed else 0

    @property
    def has_inf(self) -> bool:
        return self.special == "ieee"

    @property
    def has_nan(self) -> bool:
        return self.special in ("ieee", "fn", "ff_nan")

    @property
    def saturates(self) -> bool:
        """Out-of-range values clamp to the largest finite value (E4M3, E2M1, integers; E8M0 gives NaN)."""
        return self.kind == "int" or self.special in ("fn", "none")

    @property
    def min_exponent(self) -> int:
        """Unbiased exponent of the smallest normal number (E8M0 has no subnormals: -127)."""
        if self.special == "ff_nan":
            return -self.bias
        return 1 - self.bias

    @property
    def max_exponent(self) -> int:
        top = 2**self.exponent_bits - 1
        return (top - 1 if self.special in ("ieee", "ff_nan") else top) - self.bias

    @property
    def max(self) -> float:
        if self.kind == "int":
            return float(2 ** (self.bits - 1) - 1)
        m = self.mantissa_bits
        # E4M3FN gives its top code (S.1111.111) to NaN, so its largest mantissa is one step lower.
        top_mantissa = 2**m - (2 if self.special == "fn" else 1)
        return (1 + top_mantissa / 2**m) * 2.0**self.max_exponent

    @property
    def min(self) -> float:
        """Most negative finite value."""
        if self.kind == "int":
            return float(-(2 ** (self.bits - 1)))
        return -self.max if self.signed else self.min_normal

    @property
    def min_normal(self) -> float:
        return 1.0 if self.kind == "int" else 2.0**self.min_exponent

    @property
    def min_subnormal(self) -> float:
        """Smallest positive value (equal to min_normal for formats without subnormals)."""
        if self.kind == "int" or self.special == "ff_nan":
            return self.min_normal
        return 2.0 ** (self.min_exponent - self.mantissa_bits)

    @cached_property
    def values(self) -> torch.Tensor:
        """Every finite value, sorted, each once (formats of 8 bits or fewer)."""
        if self.bits > 8:
            raise ValueError(f"{self.name} has {2**self.bits} codes; list values only for formats of 8 bits or fewer")
        v = decode(torch.arange(2**self.bits), self)
        v = v[torch.isfinite(v)]
        return torch.unique(v + 0.0)  # + 0.0 folds -0 into 0

    def describe(self) -> dict:
        """One row of the format table: layout, bias, range, precision."""
        return {
            "format": self.name,
            "bits": self.bits,
            "sign": self.sign_bits,
            "exponent": self.exponent_bits,
            "mantissa": self.mantissa_bits,
            "bias": self.bias,
            "max": self.max,
            "min normal": self.min_normal,
            "min subnormal": self.min_subnormal,
            "inf": self.has_inf,
            "nan": self.has_nan,
        }


FORMATS: dict[str, Format] = {
    f.name: f
    for f in [
        Format("fp32", 32, "float", 8, 23, 127, special="ieee"),
        Format("fp16", 16, "float", 5, 10, 15, special="ieee"),
        Format("bf16", 16, "float", 8, 7, 127, special="ieee"),
        Format("fp8_e4m3", 8, "float", 4, 3, 7, special="fn"),
        Format("fp8_e5m2", 8, "float", 5, 2, 15, special="ieee"),
        Format("fp4_e2m1", 4, "float", 2, 1, 1, special="none"),
        Format("e8m0", 8, "float", 8, 0, 127, signed=False, special="ff_nan"),
        Format("int8", 8, "int"),
        Format("int4", 4, "int"),
    ]
}


def get_format(fmt: str | Format) -> Format:
    if isinstance(fmt, Format):
        return fmt
    try:
        return FORMATS[fmt]
    except KeyError:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}") from None


def _as_float(x) -> torch.Tensor:
    """Inputs of 32 bits or fewer compute in float32 (exact where `_float32_is_exact`); wider ones in float64."""
    x = torch.as_tensor(x)
    return x.float() if x.dtype in (torch.float32, torch.float16, torch.bfloat16) else x.double()


def cast(x, fmt: str | Format) -> torch.Tensor:
    """Round `x` to the nearest value of `fmt` (ties to even), returned as float32.

    Overflow goes to infinity in formats that have it (IEEE rule) and saturates to the largest
    finite value in those that do not (E4M3, E2M1, integers), as hardware "satfinite" conversions do.
    E8M0 holds only positive powers of two: zero, negatives and values past 2^127 become NaN.
    """
    f = get_format(fmt)
    x = _as_float(x)
    if f.kind == "int":
        if torch.isnan(x).any():
            raise ValueError(f"{f.name} has no NaN; remove NaNs before casting")
        return torch.round(x).clamp(f.min, f.max).float()
    if not f.has_nan and torch.isnan(x).any():
        raise ValueError(f"{f.name} has no NaN; remove NaNs before casting")

    return _round_by_exponent(x if _float32_is_exact(x, f) else x.double(), f)


def _float32_is_exact(x: torch.Tensor, f: Format) -> bool:
    """float32 arithmetic is exact for float32 inputs when every spacing 2**step is a normal float32."""
    return x.dtype == torch.float32 and f.signed and f.mantissa_bits >= 1 and f.min_exponent - f.mantissa_bits >= -126


def _floor_log2(a: torch.Tensor) -> torch.Tensor:
    """Exponent of the leading bit of |a| (exact; float32 zeros and subnormals give -127)."""
    if a.dtype == torch.float32:
        return ((a.view(torch.int32) >> 23) & 0xFF) - 127
    _, e = torch.frexp(a)
    return e - 1


def _exp2(e: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """2**e as exact powers of two in `like`'s dtype (float32: built from the exponent bits)."""
    if like.dtype == torch.float32:
        return ((e.to(torch.int32) + 127) << 23).view(torch.float32)
    return torch.ldexp(torch.ones_like(like), e)


def _round_by_exponent(x: torch.Tensor, f: Format) -> torch.Tensor:
    """Round the significand to `mantissa_bits` at the value's own exponent (the IEEE rule)."""
    a = x.abs()
    # exponent of each value's leading bit, raised to the subnormal range's exponent where needed
    e = torch.clamp(_floor_log2(a), min=f.min_exponent)
    step = _exp2(e - f.mantissa_bits, like=a)  # representable values around `a` are `step` apart
    q = torch.round(a / step) * step  # torch.round: half to even; both scalings are exact

    too_big = q > f.max
    if f.has_inf:
        q = torch.where(too_big, torch.inf, q)
    elif f.special == "ff_nan":
        q = torch.where(too_big, torch.nan, q)
    else:
        q = torch.where(too_big, f.max, q)
    if f.signed:
        q = torch.copysign(q, x)
    else:  # E8M0: no zero, no sign; below 2^-127 the smallest scale is kept (as ml_dtypes and torch do)
        q = torch.where(x > 0, torch.clamp(q, min=f.min_normal), torch.nan)
    if f.has_nan:
        q = torch.where(torch.isnan(x), torch.nan, q)
    return q.float()


def encode(x, fmt: str | Format) -> torch.Tensor:
    """Integer bit patterns (int64) of `x` after rounding to `fmt`; NaN gets the format's canonical NaN."""
    f = get_format(fmt)
    q = cast(x, f).double()
    if f.kind == "int":
        return q.long() & (2**f.bits - 1)

    m = f.mantissa_bits
    a = q.abs()
    _, e = torch.frexp(a)
    e = e - 1
    normal = a >= f.min_normal
    exponent_field = torch.where(normal, e + f.bias, torch.zeros_like(e)).long()
    significand = torch.where(normal, torch.ldexp(a, -e) - 1, a / f.min_normal)
    mantissa_field = torch.ldexp(significand, torch.full_like(e, m)).long()

    top = 2**f.exponent_bits - 1
    exponent_field = torch.where(torch.isinf(a), top, exponent_field)
    mantissa_field = torch.where(torch.isinf(a), 0, mantissa_field)
    nan = torch.isnan(q)
    if f.special == "ieee":  # quiet NaN: top mantissa bit set
        exponent_field = torch.where(nan, top, exponent_field)
        mantissa_field = torch.where(nan, 2 ** (m - 1), mantissa_field)
    elif f.special == "fn":
        exponent_field = torch.where(nan, top, exponent_field)
        mantissa_field = torch.where(nan, 2**m - 1, mantissa_field)
    elif f.special == "ff_nan":
        exponent_field = torch.where(nan, top, exponent_field)

    code = (exponent_field << m) | mantissa_field
    if f.signed:
        sign = torch.signbit(q) & ~nan
        code = code | (sign.long() << (f.bits - 1))
    return code


def decode(codes, fmt: str | Format) -> torch.Tensor:
    """Values (float32) of integer bit patterns in `fmt`."""
    f = get_format(fmt)
    c = torch.as_tensor(codes).long() & (2**f.bits - 1)
    if f.kind == "int":
        return torch.where(c >= 2 ** (f.bits - 1), c - 2**f.bits, c).float()

    m = f.mantissa_bits
    top = 2**f.exponent_bits - 1
    mantissa_field = c & (2**m - 1)
    exponent_field = (c >> m) & top
    subnormal = exponent_field == 0
    if f.special == "ff_nan":  # E8M0: every code but 0xFF is a power of two, code 0 included
        subnormal = torch.zeros_like(subnormal)
    significand = torch.where(subnormal, mantissa_field.double() / 2**m, 1 + mantissa_field.double() / 2**m)
    exponent = torch.where(subnormal, torch.full_like(c, f.min_exponent), exponent_field - f.bias)
    v = torch.ldexp(significand, exponent)

    if f.special == "ieee":
        v = torch.where((exponent_field == top) & (mantissa_field == 0), torch.inf, v)
        v = torch.where((exponent_field == top) & (mantissa_field != 0), torch.nan, v)
    elif f.special == "fn":
        v = torch.where((exponent_field == top) & (mantissa_field == 2**m - 1), torch.nan, v)
    elif f.special == "ff_nan":
        v = torch.where(exponent_field == top, torch.nan, v)
    if f.signed:
        v = torch.where(((c >> (f.bits - 1)) & 1).bool(), -v, v)
    return v.float()
