"""Weight-only matrix-vector products for batch-1 decode: y = x @ dequant(W).T with the dequantization inside a
Triton kernel (no BF16 copy of the weight is ever written), and NVFP4 quantize + pack as one Triton kernel.

Formats (`pack_weight`): "int4" (IntGroup codes, two per byte, one FP16 scale and zero point per group of 128),
"nvfp4" (labs_lib's NVFP4 tensors, exactly Model Optimizer's layout), "fp8" (E4M3 with one FP32 scale per output
row) and "bf16" (the same kernel without dequantization, for comparison). `gemv_reference` dequantizes and runs a
float32 matmul; it works on any device. Without Triton (a CPU machine) only the reference paths exist.
Set TRITON_INTERPRET=1 to run the kernels on CPU tensors (slowly), as the CPU tests do.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch

from .blockquant import E2M1_MAX, E4M3_MAX, NVFP4, IntGroup, PerChannel, pack_nibbles, unpack_nibbles
from .errors import LabsError

try:
    import triton
    import triton.language as tl
    import triton.testing
except ImportError:  # a CPU-only install: the reference paths still work
    triton = None

__all__ = ["FORMATS_GEMV", "PackedWeight", "pack_weight", "dequantize", "gemv_reference", "gemv", "gemv_op",
           "triton_available", "nvfp4_quantize_pack"]

FORMATS_GEMV = ("bf16", "fp8", "int4", "nvfp4")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def triton_available(device: str | torch.device = "cuda") -> bool:
    """Whether the Triton kernels can run on tensors of `device` (CUDA, or CPU under TRITON_INTERPRET=1)."""
    return triton is not None and (torch.device(device).type == "cuda" or INTERPRET)


class PackedWeight(NamedTuple):
    """A weight (out_features N, in_features K) stored for the GEMV kernels (a named tuple, so torch.compile
    takes its tensors as graph inputs and one compiled graph serves every layer).

    data: int4/nvfp4 uint8 (N, K/2), low nibble = even column; fp8 float8_e4m3fn (N, K); bf16 the weight.
    scale: int4 FP16 (N, K/group); nvfp4 float8_e4m3fn (N, K/16); fp8 FP32 (N,); bf16 None.
    zero: int4 only, uint8 (N, K/group) (symmetric codes are stored offset by 8 with zero 8).
    scale_2: nvfp4 only, the FP32 per-tensor scale.
    """

    fmt: str
    data: torch.Tensor
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    scale_2: torch.Tensor | None = None
    group: int = 128

    @property
    def shape(self) -> tuple[int, int]:
        n, k = self.data.shape
        return n, k * 2 if self.fmt in ("int4", "nvfp4") else k

    def nbytes(self) -> int:
        """Bytes one product reads: the weight and its scales."""
        tensors = (self.data, self.scale, self.zero, self.scale_2)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def pack_weight(w: torch.Tensor, fmt: str, group_size: int = 128, symmetric: bool = True) -> PackedWeight:
    """Quantize w (N, K) with labs_lib's scheme for `fmt` and store it in the kernels' layout."""
    if fmt not in FORMATS_GEMV:
        raise LabsError(f"Unknown GEMV format '{fmt}': use one of {', '.join(FORMATS_GEMV)}.")
    if w.dim() != 2 or w.shape[1] % 16:
        raise LabsError(f"The weight must be 2-D with in_features a multiple of 16; got {tuple(w.shape)}.")
    if fmt == "bf16":
        return PackedWeight("bf16", w.to(torch.bfloat16).contiguous())
    if fmt == "fp8":
        q = PerChannel("fp8_e4m3").quantize(w)
        codes = q["codes"].to(torch.uint8).view(torch.float8_e4m3fn)
        return PackedWeight("fp8", codes.contiguous(), q["scale"].reshape(-1).float().contiguous())
    if fmt == "nvfp4":
        q = NVFP4().quantize(w)
        return PackedWeight("nvfp4", q["weight"].contiguous(), q["weight_scale"].contiguous(), None,
                            q["weight_scale_2"].float().reshape(()), 16)
    if w.shape[1] % group_size:
        raise LabsError(f"in_features {w.shape[1]} is not a multiple of the INT4 group size {group_size}.")
    q = IntGroup(4, group_size, symmetric).quantize(w)
    codes = q["codes"].to(torch.int16)
    zero = q["zero"] if "zero" in q else torch.full_like(q["scale"], 8, dtype=torch.uint8)
    if symmetric:
        codes = codes + 8  # [-8, 7] -> [0, 15], zero point 8: one kernel for both
    return PackedWeight("int4", pack_nibbles(codes).contiguous(), q["scale"].contiguous(), zero.contiguous(),
                        None, group_size)


def dequantize(pw: PackedWeight) -> torch.Tensor:
    """The weight the kernels multiply by, in float32 (N, K), computed with plain torch ops."""
    if pw.fmt == "bf16":
        return pw.data.float()
    if pw.fmt == "fp8":
        return pw.data.float() * pw.scale[:, None]
    if pw.fmt == "nvfp4":
        return NVFP4().dequantize({"weight": pw.data, "weight_scale": pw.scale, "weight_scale_2": pw.scale_2})
    codes = unpack_nibbles(pw.data).float()
    n, k = codes.shape
    groups = codes.reshape(n, k // pw.group, pw.group) - pw.zero.float()[..., None]
    return (groups * pw.scale.float()[..., None]).reshape(n, k)


def gemv_reference(x: torch.Tensor, pw: PackedWeight) -> torch.Tensor:
    """x (1, K) @ dequantize(pw).T in float32, returned in x's dtype: what `gemv` must equal."""
    return (x.float() @ dequantize(pw).t()).to(x.dtype)


if triton is not None:

    def _prune(configs, named_args, **kwargs):
        k, group = named_args["K"], kwargs.get("G", named_args.get("G", 16))
        kept = [c for c in configs if k % c.kwargs["BLOCK_K"] == 0 and c.kwargs["BLOCK_K"] % group == 0]
        return kept

    _CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=nw)
                for bn, bk, nw in ((4, 512, 4), (8, 256, 4), (8, 512, 4), (8, 1024, 8), (16, 256, 4),
                                   (16, 512, 8), (32, 128, 4), (4, 1024, 4))]

    def _tuned(kernel):
        return triton.autotune(configs=_CONFIGS, key=["N", "K"], prune_configs_by={"early_config_prune": _prune},
                               do_bench=functools.partial(triton.testing.do_bench, warmup=5, rep=20))(kernel)

    @triton.jit
    def _dense_kernel(x_ptr, w_ptr, s_ptr, y_ptr, N, K: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr):
        """bf16 or fp8 weights (N, K); fp8 has one FP32 scale per row."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        cols = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_ptr + k0 + cols).to(tl.float32)
            w = tl.load(w_ptr + rows[:, None].to(tl.int64) * K + k0 + cols[None, :], mask=rmask[:, None], other=0.0)
            acc += w.to(tl.float32) * x[None, :]
        y = tl.sum(acc, axis=1)
        if HAS_SCALE:
            y = y * tl.load(s_ptr + rows, mask=rmask, other=0.0)
        tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=rmask)

    @triton.jit
    def _int4_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, N, K: tl.constexpr, G: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):
        """Two 4-bit codes per byte; tiles (rows, groups, bytes of a group), so each group sums along its own axis.

        A code c placed in the top mantissa bits of 1.0 reads as 1 + c/16 (two integer ops, no int->float
        convert); per group sum((1 + c/16) x) = sum(x) + sum(c x)/16, so scale * (sum(c x) - zero * sum(x))
        = scale * (16 * that - (16 + zero) * sum(x))."""
        NG: tl.constexpr = BLOCK_K // G
        HG: tl.constexpr = G // 2
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        r3 = rows[:, None, None]
        g2 = tl.arange(0, NG)[:, None]
        j2 = tl.arange(0, HG)[None, :]
        acc = tl.zeros((BLOCK_N, NG), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            xe = tl.load(x_ptr + k0 + g2 * G + 2 * j2).to(tl.float32)  # (NG, HG): even inputs of each group
            xo = tl.load(x_ptr + k0 + g2 * G + 2 * j2 + 1).to(tl.float32)
            b = tl.load(w_ptr + r3.to(tl.int64) * (K // 2) + k0 // 2 + g2[None] * HG + j2[None], mask=r3 < N, other=0)
            b = b.to(tl.int32)
            lo = (((b << 19) & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)
            hi = (((b << 15) & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)
            part = tl.sum(lo * xe[None] + hi * xo[None], axis=2)  # (BLOCK_N, NG)
            xsum = tl.sum(xe + xo, axis=1)  # (NG,)
            gidx = rows[:, None].to(tl.int64) * (K // G) + k0 // G + tl.arange(0, NG)[None, :]
            scale = tl.load(s_ptr + gidx, mask=rows[:, None] < N, other=0.0).to(tl.float32)
            zero = tl.load(z_ptr + gidx, mask=rows[:, None] < N, other=0).to(tl.float32)
            acc += scale * (16.0 * part - (16.0 + zero) * xsum[None, :])
        tl.store(y_ptr + rows, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=rows < N)

    @triton.jit
    def _nvfp4_kernel(x_ptr, w_ptr, s_ptr, s2_ptr, y_ptr, N, K: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr):
        """E2M1 codes, two per byte; E4M3 scale per 16; FP32 tensor scale. A code times 0x10400000 holds copies
        at bits 22 and 28; masking keeps the magnitude at bits 22-24 and the sign at bit 31: a float32 equal to
        the E2M1 value * 2**-126 (code 1 a subnormal, exact). The inputs are scaled by 2**100 so that the
        products are normal floats; 2**26 restores the scale at the end."""
        NG: tl.constexpr = BLOCK_K // 16
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        r3 = rows[:, None, None]
        g2 = tl.arange(0, NG)[:, None]
        j2 = tl.arange(0, 8)[None, :]
        acc = tl.zeros((BLOCK_N, NG), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            xe = tl.load(x_ptr + k0 + g2 * 16 + 2 * j2).to(tl.float32) * 1.2676506002282294e30  # 2**100
            xo = tl.load(x_ptr + k0 + g2 * 16 + 2 * j2 + 1).to(tl.float32) * 1.2676506002282294e30
            b = tl.load(w_ptr + r3.to(tl.int64) * (K // 2) + k0 // 2 + g2[None] * 8 + j2[None], mask=r3 < N, other=0)
            b = b.to(tl.uint32)
            lo = (((b & 0xF) * 0x10400000) & 0x81C00000).to(tl.float32, bitcast=True)
            hi = (((b >> 4) * 0x10400000) & 0x81C00000).to(tl.float32, bitcast=True)
            part = tl.sum(lo * xe[None] + hi * xo[None], axis=2)  # (BLOCK_N, NG)
            gidx = rows[:, None].to(tl.int64) * (K // 16) + k0 // 16 + tl.arange(0, NG)[None, :]
            acc += part * tl.load(s_ptr + gidx, mask=rows[:, None] < N, other=0.0).to(tl.float32)
        y = tl.sum(acc, axis=1) * (tl.load(s2_ptr) * 67108864.0)  # 2**26
        tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=rows < N)

    _KERNELS = {"bf16": _dense_kernel, "fp8": _dense_kernel, "int4": _int4_kernel, "nvfp4": _nvfp4_kernel}
    _TUNED = {name: _tuned(kernel) for name, kernel in _KERNELS.items() if name != "fp8"}
    _TUNED["fp8"] = _TUNED["bf16"]

    @triton.jit
    def _round_e4m3(v):
        """Round positive float32 values in [2**-9, 448] to E4M3, nearest with ties to even (integer ops only)."""
        bits = v.to(tl.int32, bitcast=True)
        e = ((bits >> 23) & 0xFF) - 127
        drop = 20 + tl.maximum(-6 - e, 0)  # mantissa bits to drop: 20 for normals, more in E4M3's subnormal range
        lsb = ((bits | 0x800000) >> drop) & 1
        bits = (bits + (1 << (drop - 1)) - 1 + lsb) & ~((1 << drop) - 1)
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _nvfp4_pack_kernel(w_ptr, gs_ptr, q_ptr, s_ptr, R, C, BR: tl.constexpr, BC: tl.constexpr):
        """One (BR, BC) tile: block amax, E4M3 block scale, E2M1 codes (nearest, ties to even), two per byte."""
        rows = tl.program_id(0) * BR + tl.arange(0, BR)
        cols = tl.program_id(1) * BC + tl.arange(0, BC)
        mask = (rows[:, None] < R) & (cols[None, :] < C)
        x = tl.load(w_ptr + rows[:, None].to(tl.int64) * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        gs = tl.load(gs_ptr)
        blocks = tl.reshape(x, (BR, BC // 16, 16))
        bs = tl.math.div_rn(tl.max(tl.abs(blocks), axis=2), 6.0 * gs)
        bs = tl.where(bs == 0, 1.0, bs)
        bs = _round_e4m3(tl.minimum(tl.maximum(bs, 0.001953125), 448.0))
        scaled = tl.reshape(tl.math.div_rn(blocks, (bs * gs)[:, :, None]), (BR, BC))
        a = tl.abs(scaled)
        code = ((a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32)
                + (a >= 1.75).to(tl.int32) + (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32) + (a > 5.0).to(tl.int32))
        code = code | (((scaled.to(tl.int32, bitcast=True) >> 31) & 1) << 3)
        lo, hi = tl.split(tl.reshape(code, (BR, BC // 2, 2)))
        half = tl.program_id(1) * (BC // 2) + tl.arange(0, BC // 2)
        tl.store(q_ptr + rows[:, None].to(tl.int64) * (C // 2) + half[None, :], (lo | (hi << 4)).to(tl.uint8),
                 mask=(rows[:, None] < R) & (half[None, :] < C // 2))
        grp = tl.program_id(1) * (BC // 16) + tl.arange(0, BC // 16)
        tl.store(s_ptr + rows[:, None].to(tl.int64) * (C // 16) + grp[None, :], bs.to(tl.float8e4nv),
                 mask=(rows[:, None] < R) & (grp[None, :] < C // 16))


def _check(x: torch.Tensor, pw: PackedWeight) -> torch.Tensor:
    if not triton_available(x.device):
        raise LabsError("The GEMV kernels need Triton and a CUDA tensor (or TRITON_INTERPRET=1 on CPU); "
                        "use gemv_reference instead.")
    n, k = pw.shape
    if x.numel() != k:
        raise LabsError(f"gemv takes one input row of {k} values (batch 1); got shape {tuple(x.shape)}.")
    return x.reshape(-1).contiguous()


def gemv(x: torch.Tensor, pw: PackedWeight, config: dict | None = None) -> torch.Tensor:
    """x (1, K) @ dequant(W).T as one Triton kernel, (1, N) in x's dtype. `config` fixes BLOCK_N, BLOCK_K and
    num_warps (the interpreter needs it); on CUDA the kernel is autotuned per shape."""
    xf = _check(x, pw)
    n, k = pw.shape
    y = torch.empty(n, device=x.device, dtype=x.dtype)
    group = pw.group if pw.fmt == "int4" else 16
    if config is None and torch.device(x.device).type == "cuda" and k % max(128, group) == 0:
        kernel, extra = _TUNED[pw.fmt], {}
    else:  # fixed tiles: the largest power-of-two BLOCK_K (<= 512) that divides K and is a multiple of the group
        tiles = [b for b in (16, 32, 64, 128, 256, 512) if k % b == 0 and b % group == 0]
        if not tiles:
            raise LabsError(f"in_features {k} has no power-of-two tile that is a multiple of the group {group}.")
        kernel, extra = _KERNELS[pw.fmt], dict(config or {"BLOCK_N": 4, "BLOCK_K": tiles[-1]})

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]),)

    if pw.fmt in ("bf16", "fp8"):
        kernel[grid](xf, pw.data, pw.scale if pw.fmt == "fp8" else xf, y, n, k, HAS_SCALE=pw.fmt == "fp8", **extra)
    elif pw.fmt == "int4":
        kernel[grid](xf, pw.data, pw.scale, pw.zero, y, n, k, G=pw.group, **extra)
    else:
        kernel[grid](xf, pw.data, pw.scale, pw.scale_2.reshape(1), y, n, k, **extra)
    return y.reshape(1, n)


@torch.library.custom_op("labs::gemv", mutates_args=())
def _gemv_custom(x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor | None, zero: torch.Tensor | None,
                 scale_2: torch.Tensor | None, fmt: str, group: int) -> torch.Tensor:
    return gemv(x, PackedWeight(fmt, data, scale, zero, scale_2, group))


@_gemv_custom.register_fake
def _(x, data, scale, zero, scale_2, fmt, group):
    return x.new_empty(1, data.shape[0])


def gemv_op(x: torch.Tensor, pw: PackedWeight) -> torch.Tensor:
    """`gemv` as a torch operator (labs::gemv), so torch.compile keeps it as one opaque call in a compiled graph."""
    return _gemv_custom(x, pw.data, pw.scale, pw.zero, pw.scale_2, pw.fmt, pw.group)


def nvfp4_quantize_pack(w: torch.Tensor, block_rows: int = 16, block_cols: int = 256) -> dict[str, torch.Tensor]:
    """NVFP4 quantize + pack of a 2-D tensor in one Triton pass: the bytes of `NVFP4().quantize(w)` (weight,
    weight_scale, weight_scale_2), Model Optimizer's layout. The tensor scale is computed as NVFP4 computes it."""
    if not triton_available(w.device):
        raise LabsError("nvfp4_quantize_pack needs Triton and a CUDA tensor (or TRITON_INTERPRET=1 on CPU); "
                        "use labs_lib.blockquant.NVFP4().quantize instead.")
    if w.dim() != 2 or w.shape[1] % 16:
        raise LabsError(f"nvfp4_quantize_pack takes a 2-D tensor with a multiple of 16 columns; got {tuple(w.shape)}.")
    w = w.contiguous()
    r, c = w.shape
    amax = torch.linalg.vector_norm(w, float("inf")).float()  # max |w| in one pass (exact: a maximum)
    global_scale = amax / (E2M1_MAX * E4M3_MAX)  # the same torch op as NVFP4.scales, so the same rounding
    packed = torch.empty(r, c // 2, dtype=torch.uint8, device=w.device)
    scale = torch.empty(r, c // 16, dtype=torch.float8_e4m3fn, device=w.device)
    grid = (triton.cdiv(r, block_rows), triton.cdiv(c, block_cols))
    _nvfp4_pack_kernel[grid](w, global_scale.reshape(1), packed, scale, r, c, BR=block_rows, BC=block_cols)
    return {"weight": packed, "weight_scale": scale, "weight_scale_2": global_scale}
