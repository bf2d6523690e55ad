"""Scaled low-bit formats for weights and activations: NVFP4, MXFP4, integer groups, per-tensor.

Each scheme is one small class with the same interface: `quantize` gives the tensors a checkpoint
stores (NVFP4 in the exact layout of Model Optimizer's Hugging Face export), `dequantize` reverses
it, `fake_quantize` does both at once for evaluation, and `bits_per_weight` counts the scales too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .formats import FORMATS, cast, decode, encode

__all__ = ["Scheme", "NVFP4", "MXFP4", "IntGroup", "PerTensor", "PerChannel", "pack_nibbles", "unpack_nibbles"]

E2M1_MAX = FORMATS["fp4_e2m1"].max  # 6
E4M3_MAX = FORMATS["fp8_e4m3"].max  # 448


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte along the last axis: element 2i in the low nibble, 2i+1 in the high."""
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    out = torch.stack([packed & 0x0F, packed >> 4], dim=-1)
    return out.flatten(-2)


def _blocks(w: torch.Tensor, size: int) -> torch.Tensor:
    if w.shape[-1] % size:
        raise ValueError(
            f"last dimension {w.shape[-1]} is not a multiple of the block size {size}; "
            f"choose a block size that divides it (e.g. {_divisor_hint(w.shape[-1])})"
        )
    return w.float().reshape(*w.shape[:-1], w.shape[-1] // size, size)


def _divisor_hint(n: int) -> str:
    return ", ".join(str(g) for g in (16, 32, 64, 128, 256) if n % g == 0) or "1"


class Scheme:
    """A weight/activation quantization scheme: subclasses set `name` and implement three methods."""

    name: str = "scheme"

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def dequantize(self, q: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def fake_quantize(self, w: torch.Tensor) -> torch.Tensor:
        """Round trip through the format, in float32: what a matmul on the quantized tensor sees."""
        return self.dequantize(self.quantize(w)).reshape(w.shape)

    def bits_per_weight(self, shape: tuple[int, ...]) -> float:
        raise NotImplementedError

    def storage_bytes(self, shape: tuple[int, ...]) -> float:
        return self.bits_per_weight(shape) * torch.Size(shape).numel() / 8

    def __repr__(self) -> str:
        return self.name


@dataclass(repr=False)
class NVFP4(Scheme):
    """E2M1 values, one E4M3 scale per 16 values, one FP32 scale per tensor (amax / (6 * 448)).

    The per-tensor scale lets the E4M3 block scales use their whole range; `global_amax` can be a
    calibrated value (activations) instead of this tensor's own maximum (weights).
    """

    block_size: int = 16

    @property
    def name(self) -> str:
        return "NVFP4" if self.block_size == 16 else f"NVFP4-b{self.block_size}"

    def scales(self, w: torch.Tensor, global_amax: torch.Tensor | None = None):
        """Per-tensor FP32 scale and per-block E4M3 scales, computed as Model Optimizer does."""
        blocks = _blocks(w, self.block_size)
        amax = w.abs().amax().float() if global_amax is None else torch.as_tensor(global_amax).float()
        global_scale = amax / (E2M1_MAX * E4M3_MAX)
        block_scale = blocks.abs().amax(-1) / (E2M1_MAX * global_scale)
        block_scale = torch.where(block_scale == 0, 1.0, block_scale)  # all-zero block: any scale works
        block_scale = cast(block_scale.clamp(FORMATS["fp8_e4m3"].min_subnormal, E4M3_MAX), "fp8_e4m3")
        return global_scale, block_scale

    def _scaled(self, w, global_amax=None):
        global_scale, block_scale = self.scales(w, global_amax)
        scaled = _blocks(w, self.block_size) / (block_scale * global_scale).unsqueeze(-1)
        return scaled, block_scale, global_scale

    def quantize(self, w: torch.Tensor, global_amax: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        scaled, block_scale, global_scale = self._scaled(w, global_amax)
        codes = encode(scaled.reshape(w.shape), "fp4_e2m1")
        return {
            "weight": pack_nibbles(codes),
            "weight_scale": block_scale.to(torch.float8_e4m3fn),
            "weight_scale_2": global_scale,
        }

    def dequantize(self, q: dict[str, torch.Tensor]) -> torch.Tensor:
        values = decode(unpack_nibbles(q["weight"]), "fp4_e2m1")
        scale = q["weight_scale"].float() * q["weight_scale_2"]
        return (_blocks(values, self.block_size) * scale.unsqueeze(-1)).flatten(-2)

    def fake_quantize(self, w: torch.Tensor, global_amax: torch.Tensor | None = None) -> torch.Tensor:
        scaled, block_scale, global_scale = self._scaled(w, global_amax)
        deq = cast(scaled, "fp4_e2m1") * (block_scale * global_scale).unsqueeze(-1)
        return deq.reshape(w.shape)

    def bits_per_weight(self, shape=None) -> float:
        n = torch.Size(shape).numel() if shape else None
        return 4 + 8 / self.block_size + (32 / n if n else 0)


@dataclass(repr=False)
class MXFP4(Scheme):
    """OCP MX: E2M1 values with one E8M0 (power-of-two) scale per 32 values, no per-tensor scale.

    scale_rule "floor" is the OCP v1.0 rule, 2^(floor(log2 amax) - 2): the block maximum lands in
    [4, 8) and values above 6 saturate. "ceil" (Model Optimizer's) picks 2^ceil(log2(amax / 6)):
    nothing saturates, but some blocks lose a binade of resolution.
    """

    block_size: int = 32
    scale_rule: str = "floor"

    def __post_init__(self):
        if self.scale_rule not in ("floor", "ceil"):
            raise ValueError("scale_rule must be 'floor' (OCP MX v1.0) or 'ceil' (Model Optimizer)")

    @property
    def name(self) -> str:
        return "MXFP4" if self.scale_rule == "floor" else "MXFP4-ceil"

    def scale_exponents(self, w: torch.Tensor) -> torch.Tensor:
        amax = _blocks(w, self.block_size).abs().amax(-1).double()
        if self.scale_rule == "floor":
            _, e = torch.frexp(amax)  # floor(log2 amax) = e - 1, exact
            exponent = (e - 1 - FORMATS["fp4_e2m1"].max_exponent).double()
        else:  # ceil(log2(amax / 6)) from amax = m * 2^e, m in [0.5, 1): 6 * 2^k = 0.75 * 2^(k+3), so k = e - 3 where
            # m <= 0.75, else e - 2. Exact on every device (CUDA's log2 is not: some amax = 0.75 came out above -3)
            mantissa, e = torch.frexp(amax)
            exponent = (e - 3 + (mantissa > 0.75).int()).double()
        exponent = torch.where(amax == 0, -127.0, exponent)  # an all-zero block takes the smallest scale
        return exponent.clamp(-127, 127)

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        exponent = self.scale_exponents(w)
        scaled = torch.ldexp(_blocks(w, self.block_size).double(), -exponent.unsqueeze(-1))
        codes = encode(scaled.reshape(w.shape), "fp4_e2m1")
        return {"weight": pack_nibbles(codes), "weight_scale": encode(torch.exp2(exponent), "e8m0").to(torch.uint8)}

    def dequantize(self, q: dict[str, torch.Tensor]) -> torch.Tensor:
        values = decode(unpack_nibbles(q["weight"]), "fp4_e2m1")
        scale = decode(q["weight_scale"], "e8m0")
        return (_blocks(values, self.block_size) * scale.unsqueeze(-1)).flatten(-2)

    def fake_quantize(self, w: torch.Tensor) -> torch.Tensor:
        scale = torch.exp2(self.scale_exponents(w)).unsqueeze(-1)
        return (cast(_blocks(w, self.block_size).double() / scale, "fp4_e2m1") * scale).reshape(w.shape).float()

    def bits_per_weight(self, shape=None) -> float:
        return 4 + 8 / self.block_size


@dataclass(repr=False)
class IntGroup(Scheme):
    """Integer codes with one FP16 scale (and, if asymmetric, one integer zero point) per group.

    Symmetric: scale = amax / (2^(b-1) - 1), codes in [-(2^(b-1)), 2^(b-1) - 1].
    Asymmetric: scale = (max - min) / (2^b - 1), zero = round(-min / scale), codes in [0, 2^b - 1].
    `group_size=None` means one group per output row (per-channel). `scale_bits` only counts bytes: a checkpoint
    may store the FP16-representable scales wider (Model Optimizer's AWQ export writes them as FP32).
    """

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = True
    scale_bits: int = 16

    @property
    def name(self) -> str:
        group = f"g{self.group_size}" if self.group_size else "per-channel"
        return f"INT{self.bits}-{group}{'' if self.symmetric else '-asym'}"

    def groups(self, w: torch.Tensor) -> torch.Tensor:
        """w viewed as (..., n_groups, group_size), in float32."""
        return _blocks(w, self.group_size or w.shape[-1])

    def params(self, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scale (FP16-representable) and zero point of each group along the last axis."""
        if self.symmetric:
            scale = (groups.abs().amax(-1) / (2 ** (self.bits - 1) - 1)).half().float()
            return torch.where(scale == 0, 1.0, scale), None
        qmax = 2**self.bits - 1
        lo, hi = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
        scale = ((hi - lo) / qmax).half().float()
        scale = torch.where(scale == 0, 1.0, scale)
        return scale, torch.round(-lo / scale).clamp(0, qmax)

    def codes(self, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
        """Round x / scale (+ zero) to the nearest integer code, clamped to the code range."""
        if zero is None:
            return torch.round(x / scale).clamp(-(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1)
        return (torch.round(x / scale) + zero).clamp(0, 2**self.bits - 1)

    def round_trip(self, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
        """x quantized with given group parameters and dequantized again (what GPTQ's loop needs)."""
        codes = self.codes(x, scale, zero)
        return (codes if zero is None else codes - zero) * scale

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.quantize_with(w, *self.params(self.groups(w)))

    def quantize_with(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The stored tensors of w for given group parameters, (..., n_groups) each (GPTQ picks its own)."""
        zero_column = None if zero is None else zero.unsqueeze(-1)
        codes = self.codes(self.groups(w), scale.unsqueeze(-1), zero_column).flatten(-2)
        if zero is None:
            return {"codes": codes.to(torch.int8), "scale": scale.half()}
        return {"codes": codes.to(torch.uint8), "scale": scale.half(), "zero": zero.to(torch.uint8)}

    def dequantize(self, q: dict[str, torch.Tensor]) -> torch.Tensor:
        codes = self.groups(q["codes"].float())
        if "zero" in q:
            codes = codes - q["zero"].float().unsqueeze(-1)
        return (codes * q["scale"].float().unsqueeze(-1)).flatten(-2)

    def bits_per_weight(self, shape=None) -> float:
        group = self.group_size or (shape[-1] if shape else None)
        if group is None:
            raise ValueError("a per-channel scheme needs the weight shape to count its scale bits")
        return self.bits + (self.scale_bits + (0 if self.symmetric else self.bits)) / group


@dataclass(repr=False)
class PerTensor(Scheme):
    """A plain cast to `fmt`, after one FP32 scale per tensor (amax / fmt max) when `scaled`."""

    fmt: str = "fp8_e4m3"
    scaled: bool = True

    @property
    def name(self) -> str:
        return f"{self.fmt}{' per-tensor' if self.scaled else ''}"

    def scale(self, w: torch.Tensor, global_amax: torch.Tensor | None = None) -> torch.Tensor:
        """amax / format max; a calibrated `global_amax` makes it static (larger inputs saturate)."""
        if not self.scaled:
            return torch.tensor(1.0)
        amax = w.abs().amax().float() if global_amax is None else torch.as_tensor(global_amax).float()
        scale = amax / FORMATS[self.fmt].max
        return torch.where(scale == 0, 1.0, scale)

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        scale = self.scale(w)
        return {"codes": encode(w.float() / scale, self.fmt), "scale": scale}

    def dequantize(self, q: dict[str, torch.Tensor]) -> torch.Tensor:
        return decode(q["codes"], self.fmt) * q["scale"]

    def fake_quantize(self, w: torch.Tensor, global_amax: torch.Tensor | None = None) -> torch.Tensor:
        scale = self.scale(w, global_amax)
        return cast(w.float() / scale, self.fmt) * scale

    def bits_per_weight(self, shape=None) -> float:
        n = torch.Size(shape).numel() if shape else None
        return FORMATS[self.fmt].bits + (32 / n if (n and self.scaled) else 0)



@dataclass(repr=False)
class PerChannel(PerTensor):
    """A cast to `fmt` after one FP32 scale per output row (row amax / fmt max): FP8 weights' usual layout."""

    @property
    def name(self) -> str:
        return f"{self.fmt} per-channel"

    def scale(self, w: torch.Tensor, global_amax: torch.Tensor | None = None) -> torch.Tensor:
        scale = w.abs().amax(dim=-1, keepdim=True).float() / FORMATS[self.fmt].max
        return torch.where(scale == 0, 1.0, scale)

    def bits_per_weight(self, shape=None) -> float:
        if not shape:
            raise ValueError("a per-channel scheme needs the weight shape to count its scale bits")
        return FORMATS[self.fmt].bits + 32 / shape[-1]
