"""The labs' exercises: the learner writes a small function or computes a number, and labs_lib checks it.

`ask(name)` prints the question with its numbers (they live here, so a notebook never retypes them).
`check(name, answer)` says whether the answer is right; on a miss it names the kind of input that failed
(or whether a number is too high or too low), never the expected value. It never raises, so an unfinished
exercise does not stop the notebook. `show_solution(name)` prints a worked solution, but only after at
least one attempt at that exercise was checked. `judge(name, answer)` returns (ok, detail) for tests.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .errors import LabsError

__all__ = ["Exercise", "EXERCISES", "ask", "check", "judge", "show_solution", "exercise"]


@dataclass(frozen=True)
class Case:
    """One probe input of a function exercise; `kind` describes it to the learner without its value."""

    kind: str
    args: tuple


@dataclass(frozen=True)
class Exercise:
    """A question (a format string over `params`), how to judge an answer, and a worked solution.

    kind "function": the answer is a function, run on `cases` and compared with `reference` (labs_lib).
    kind "number": the answer is a number, compared with `reference()` within `rel` (relative tolerance).
    `custom`, where set, judges the answer itself (answer -> (ok, detail)) instead.
    `solution` is written the way a learner would; its source is what `show_solution` prints, and for a
    number exercise calling it gives the number.
    """

    lab: str
    kind: str
    question: str
    solution: Callable
    reference: Callable
    params: dict = field(default_factory=dict)
    cases: tuple[Case, ...] = ()
    compare: Callable[[Any, Any], bool] | None = None  # function exercises: got, want -> equal?
    rel: float = 1e-6
    hint: str = ""
    custom: Callable[[Any], tuple[bool, str]] | None = None

    def text(self) -> str:
        return self.question.format(**self.params)


# --------------------------------------------------------------------------------------------------
# Lab 01: number formats and affine integer quantization

def _probe_e4m3() -> tuple[Case, ...]:
    t = torch.tensor
    return (Case("ordinary normal values (both signs)", (t([1.0, 0.1, -3.3, 17.0]),)),
            Case("zeros of both signs", (t([0.0, -0.0]),)),
            Case("values half-way between two E4M3 values (ties go to the even one)", (t([17.0, 19.0, 250.0]),)),
            Case("values above 448 (saturate to ±448)", (t([449.0, 1e6, -1e6, 480.0]),)),
            Case("values near the top of the range", (t([240.0, 250.0, 440.0, 464.0]),)),
            Case("subnormals (below 2^-6 the spacing stays 2^-9)",
                 (t([2.0**-7, 2.0**-9, 3 * 2.0**-11, 2.0**-8 * 1.3]),)),
            Case("values below half the smallest subnormal (round to zero)", (t([2.0**-12, -(2.0**-11)]),)))


def _round_to_e4m3_solution(x: torch.Tensor) -> torch.Tensor:
    """Round to 3 mantissa bits at the value's own exponent (at least -6), ties to even, saturate at 448."""
    a = x.abs().double()
    _, e = torch.frexp(a)  # a = m * 2^e with 0.5 <= m < 1, so the leading bit is 2^(e - 1)
    exponent = (e - 1).clamp(min=-6)  # below 2^-6 (subnormals) the spacing stays that of 2^-6
    step = 2.0 ** (exponent - 3).double()  # 3 mantissa bits: 8 values per power of two
    q = (torch.round(a / step) * step).clamp(max=448.0)
    return torch.copysign(q, x.double()).float()


def _affine_cases() -> tuple[Case, ...]:
    g = torch.Generator().manual_seed(0)
    t, positive = torch.tensor, torch.rand(64, generator=g)
    return (Case("a row with both signs", (torch.randn(64, generator=g), 4)),
            Case("a row with both signs, 8 bits", (torch.randn(64, generator=g) * 0.05, 8)),
            Case("a row of positive values only (the range must still contain 0)", (positive + 1.0, 4)),
            Case("a row of negative values only (the range must still contain 0)", (-positive - 0.5, 4)),
            Case("a row of zeros (scale 0 would divide by zero: use 1)", (torch.zeros(16), 4)),
            Case("a row with one large outlier", (t([0.01, -0.02, 0.03, 5.0, -0.01, 0.0, 0.02, -0.03]), 4)))


def _affine_reference(x: torch.Tensor, bits: int) -> torch.Tensor:
    from .blockquant import IntGroup

    return IntGroup(bits, None, symmetric=False).fake_quantize(x[None])[0]


def _affine_solution(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Asymmetric (affine) quantization of one row: scale and zero point, then round, clamp, dequantize."""
    qmax = 2**bits - 1
    lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)  # the grid must contain 0 exactly
    scale = torch.tensor((hi - lo) / qmax).half().float()  # stored in FP16
    scale = torch.where(scale == 0, 1.0, scale)
    zero = torch.round(-lo / scale).clamp(0, qmax)  # the code that stands for 0.0
    codes = (torch.round(x / scale) + zero).clamp(0, qmax)
    return (codes - zero) * scale


def _llama8b_nvfp4_gb() -> float:
    from .sizing import SHAPES, checkpoint_bytes

    return checkpoint_bytes(SHAPES["Llama-3.1-8B"], "nvfp4")["total_bytes"] / 1e9


def _llama8b_nvfp4_gb_solution() -> float:
    """Linears at 4.5 bits (4-bit values + one 8-bit scale per 16); embedding and lm_head stay 16-bit."""
    hidden, layers, heads, kv_heads, intermediate, vocab = 4096, 32, 32, 8, 14336, 128256  # config.json
    head_dim = hidden // heads
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2  # q, o and k, v
    mlp = 3 * hidden * intermediate  # gate, up, down
    linear_bytes = layers * (attention + mlp) * 4.5 / 8
    bf16_bytes = (2 * vocab * hidden + (2 * layers + 1) * hidden) * 2  # embedding, untied lm_head, norms
    return (linear_bytes + bf16_bytes) / 1e9


# --------------------------------------------------------------------------------------------------
# Lab 02: NVFP4

def _pack_cases() -> tuple[Case, ...]:
    return (Case("two positive normal values", (1.5, 4.0)),
            Case("a negative value in the low nibble", (-2.0, 1.0)),
            Case("a negative value in the high nibble", (3.0, -6.0)),
            Case("the subnormal 0.5", (0.5, -0.5)),
            Case("zeros (+0 and -0)", (0.0, -0.0)),
            Case("the largest values", (6.0, -6.0)))


def _pack_reference(a: float, b: float) -> int:
    from .blockquant import pack_nibbles
    from .formats import encode

    return int(pack_nibbles(encode(torch.tensor([a, b]), "fp4_e2m1"))[0])


def _pack_e2m1_solution(a: float, b: float) -> int:
    """E2M1 code = sign | 2 exponent bits | 1 mantissa bit; the first value goes to the low nibble."""
    def code(v: float) -> int:
        magnitudes = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]  # codes 0..7: (exponent << 1) | mantissa
        sign = 8 if math.copysign(1.0, v) < 0 else 0
        return sign | magnitudes.index(abs(v))

    return code(a) | (code(b) << 4)


def _decode_byte_reference(byte: int) -> tuple[float, float]:
    from .blockquant import unpack_nibbles
    from .formats import decode

    return tuple(decode(unpack_nibbles(torch.tensor([byte], dtype=torch.uint8)), "fp4_e2m1").tolist())


def _decode_byte_solution(byte: int = 0x2B) -> tuple[float, float]:
    """Low nibble first; each nibble: sign bit, 2 exponent bits (bias 1), 1 mantissa bit."""
    def value(nibble: int) -> float:
        sign, exponent, mantissa = nibble >> 3, (nibble >> 1) & 0b11, nibble & 1
        magnitude = mantissa * 0.5 if exponent == 0 else (1 + mantissa / 2) * 2.0 ** (exponent - 1)
        return -magnitude if sign else magnitude

    return value(byte & 0x0F), value(byte >> 4)


def _nvfp4_bits(block: int) -> float:
    from .blockquant import NVFP4

    return NVFP4(block_size=block).bits_per_weight()


# --------------------------------------------------------------------------------------------------
# Lab 03: GPTQ

def _gptq_problem(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and a well-conditioned input Hessian H = 2 X Xᵀ / N with correlated inputs."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    x = torch.randn(4 * cols, cols, generator=g) @ mix
    return torch.randn(rows, cols, generator=g), 2 * x.T @ x / x.shape[0]


def gptq_inverse_factor(hessian: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Upper Cholesky factor U of the damped H⁻¹ (H⁻¹ = UᵀU), as GPTQ uses it."""
    h = hessian.clone()
    h.diagonal().add_(damp * h.diagonal().mean())
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def _run_gptq_steps(step: Callable, weight: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """GPTQ per-channel INT4 (asymmetric) with the learner's column step; returns the dequantized weight."""
    from .blockquant import IntGroup

    scheme = IntGroup(4, None, symmetric=False)
    scale, zero = scheme.params(scheme.groups(weight))  # per-channel: fixed from the unmodified weight
    scale, zero = scale[:, 0], zero[:, 0]
    U, W = gptq_inverse_factor(hessian), weight.clone()
    for i in range(W.shape[1]):
        q = scheme.round_trip(W[:, i], scale, zero)
        W = step(W, U, i, q)
    return W


def _gptq_loop_reference(weight: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    from .blockquant import IntGroup
    from .gptq import GPTQ

    gptq = GPTQ(IntGroup(4, None, symmetric=False))
    return gptq.scheme.dequantize(gptq.quantize_weight(weight, hessian))


def gptq_step_solution(W: torch.Tensor, U: torch.Tensor, i: int, q: torch.Tensor) -> torch.Tensor:
    """One GPTQ column step: column i becomes q; its error, scaled by row i of U, moves to later columns."""
    err = (W[:, i] - q) / U[i, i]
    W[:, i + 1:] -= torch.outer(err, U[i, i + 1:])  # the columns not yet quantized absorb the error
    W[:, i] = q
    return W


def _judge_gptq_step(step: Callable) -> tuple[bool, str]:
    W, H = _gptq_problem(6, 12, seed=1)
    U = gptq_inverse_factor(H)
    q = torch.round(W[:, 3])
    got = step(W.clone(), U, 3, q.clone())
    if got is None:
        return False, "not attempted yet: your function returns None."
    want = gptq_step_solution(W.clone(), U, 3, q.clone())
    if not torch.equal(got[:, :3], W[:, :3]):
        return False, "columns before i changed: they are already quantized and must stay as they are."
    if not torch.allclose(got[:, 3], q):
        return False, "column i should hold the quantized values q after the step."
    if not torch.allclose(got[:, 4:], want[:, 4:], rtol=1e-4, atol=1e-5):
        return False, ("the later columns are not updated as GPTQ does: divide the column's error by U[i, i], "
                       "then subtract its outer product with the rest of row i of U.")
    for seed, shape in ((2, (8, 16)), (3, (16, 32))):
        W, H = _gptq_problem(*shape, seed=seed)
        got = _run_gptq_steps(step, W.clone(), H)
        if not torch.allclose(got, _gptq_loop_reference(W, H), atol=1e-4):
            return False, (f"one step is right, but a full loop over a {shape[0]}x{shape[1]} weight differs from "
                           "GPTQ.quantize_weight: does your step work on the W it is given, in every column?")
    return True, "one step and a full column loop both match labs_lib's GPTQ.quantize_weight"


def _gptq_second_weight(w: tuple[float, float], hessian: list[list[float]]) -> float:
    h_inv = torch.linalg.inv(torch.tensor(hessian, dtype=torch.float64))
    error = w[0] - round(w[0])
    return w[1] - error * (h_inv[0, 1] / h_inv[0, 0]).item()


def _gptq_second_weight_solution(w=(0.3, 0.7), hessian=((2.0, 1.0), (1.0, 2.0))) -> float:
    """GPTQ moves w1's rounding error onto w2 with weight H⁻¹[0,1] / H⁻¹[0,0]."""
    h_inv = torch.linalg.inv(torch.tensor(hessian, dtype=torch.float64))
    error = w[0] - round(w[0])  # 0.3 rounds to 0
    return w[1] - error * (h_inv[0, 1] / h_inv[0, 0]).item()


def _int_group_bytes(bits: int, group: int, shape: tuple[int, int]) -> float:
    from .blockquant import IntGroup

    return IntGroup(bits, group, symmetric=False).storage_bytes(shape)


def _int4_g64_layer_bytes_solution(shape=(4096, 4096), group=64) -> float:
    """4-bit codes, plus per group one FP16 scale (16 bits) and one 4-bit zero point."""
    n = shape[0] * shape[1]
    return n * 4 / 8 + (n / group) * (16 + 4) / 8


# --------------------------------------------------------------------------------------------------
# Lab 04: AWQ

def _awq_cases() -> tuple[Case, ...]:
    t = torch.tensor
    return (Case("alpha = 0.5 on ordinary activation means", (t([0.2, 1.0, 3.0, 0.5]), 0.5)),
            Case("alpha = 0 (every channel treated the same)", (t([0.01, 0.1, 1.0, 10.0]), 0.0)),
            Case("a channel whose mean |x| is 0 (clamp s at 1e-4 before normalizing)", (t([0.0, 1.0, 4.0]), 0.5)),
            Case("means spanning five orders of magnitude", (t([1e-3, 1e-1, 1.0, 1e2]), 0.75)))


def _awq_reference(x_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    from .awq import AWQ

    return AWQ().scales(x_mean, alpha)


def awq_scales_solution(x_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """AWQ's per-channel scale: mean|x| to the power alpha, normalized so that max·min = 1."""
    s = x_mean.pow(alpha).clamp(min=1e-4)  # a channel that never fires must not get scale 0
    return s / (s.max() * s.min()).sqrt()


def _awq_alpha_rtn_solution() -> float:
    """s = mean|x|^alpha is 1 for every channel when alpha = 0: nothing is scaled, AWQ is RTN."""
    return 0.0


def _judge_awq_alpha(alpha) -> tuple[bool, str]:
    x_mean = torch.tensor([0.01, 0.1, 1.0, 10.0])
    if torch.equal(_awq_reference(x_mean, float(alpha)), torch.ones(4)):
        return True, "with this alpha every scale is 1: nothing is folded, AWQ is round-to-nearest"
    return False, "with that alpha some channel scales are not 1; which power of any number is always 1?"


def _int4_g32_bits_solution(group=32) -> float:
    """4 bits per code plus (16-bit scale + 4-bit zero point) shared by the group."""
    return 4 + (16 + 4) / group


# --------------------------------------------------------------------------------------------------
# Labs 05-08 (numeric exercises)

def _ggml_bytes(qtype: str, n_weights: int) -> float:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    return n_weights / block * block_bytes


def _delayed_scale(amaxes: list[float]) -> float:
    """The E4M3 scale delayed scaling uses at the step after tensors with these amaxes (no margin)."""
    from .fp8 import ScalingRecipe, TensorScaler

    scaler = TensorScaler("fp8_e4m3", ScalingRecipe("delayed"))
    for amax in amaxes:
        scaler.scale(torch.tensor([amax]))
    return scaler.scale(torch.tensor([1.0])).item()


def _spark_ceiling_70b_nvfp4() -> float:
    from .roofline import HARDWARE, LLAMA_3_1_70B, decode_bytes_per_token, decode_ceiling_tokens_per_s

    return decode_ceiling_tokens_per_s(decode_bytes_per_token(LLAMA_3_1_70B, 4.5), HARDWARE["dgx_spark"].bandwidth_gb_s)


def _spark_ceiling_70b_nvfp4_solution() -> float:
    """Bytes per token: Linears at 4.5 bits + BF16 lm_head + one embedding row; bandwidth 273 GB/s."""
    hidden, layers, heads, kv_heads, intermediate, vocab = 8192, 80, 64, 8, 28672, 128256
    d = hidden // heads
    linear = layers * (hidden * (heads + 2 * kv_heads) * d + heads * d * hidden + 3 * hidden * intermediate)
    bytes_per_token = linear * 4.5 / 8 + vocab * hidden * 2 + hidden * 2
    return 273e9 / bytes_per_token


def _qwen3_14b_bf16_gb() -> float:
    from .sizing import SHAPES

    return SHAPES["Qwen3-14B"].params * 2 / 1e9


def _qwen3_14b_bf16_gb_solution() -> float:
    """Every parameter in 2 bytes: 7 Linears per layer, two norms per layer plus q/k norms, embedding, lm_head."""
    hidden, layers, heads, kv_heads, head_dim, intermediate, vocab = 5120, 40, 40, 8, 128, 17408, 151936
    q, kv = heads * head_dim, kv_heads * head_dim
    linears = layers * (hidden * (q + 2 * kv) + q * hidden + 3 * hidden * intermediate)
    norms = layers * (2 * hidden + 2 * head_dim) + hidden
    return (linears + norms + 2 * vocab * hidden) * 2 / 1e9


def _peak_cases() -> tuple[Case, ...]:
    from .sizing import SHAPES, ModelShape

    return (Case("Llama-3.1-8B at the CLI's defaults (batch 8 x 512)", (SHAPES["Llama-3.1-8B"], 8, 512)),
            # Qwen/Qwen3-32B's config.json: 64 heads of 128 on a hidden size of 5120 (5120 / 64 = 80)
            Case("Qwen3-32B (head_dim 128, not hidden / heads = 80)",
                 (ModelShape(hidden=5120, layers=64, heads=64, kv_heads=8, intermediate=25600, vocab=151936,
                             head_size=128, qk_norm=True), 8, 512)),
            Case("Llama-3.1-70B, one short sample", (SHAPES["Llama-3.1-70B"], 1, 128)))


def _peak_reference(shape, batch: int, seq_len: int) -> float:
    from .sizing import calibration_memory_plan

    return calibration_memory_plan(shape, "nvfp4", 2, batch, seq_len)["peak_bytes"]


def calibration_peak_solution(shape, batch: int, seq_len: int) -> float:
    """BF16 weights + one batch through a layer's widest activations + a fake-quantized copy of the largest Linear."""
    weights = shape.params * 2
    activations = batch * seq_len * (4 * shape.hidden + 2 * shape.heads * shape.head_dim + 3 * shape.intermediate) * 2
    largest = max(out * inp for out, inp in shape.linear_shapes()) * 2
    return weights + activations + largest


def _mix_counts_solution(weights=(0.5, 0.3, 0.2), total=7) -> tuple[int, ...]:
    """Floor each exact share, then give the samples left over to the largest fractional parts."""
    exact = [total * w / sum(weights) for w in weights]
    counts = [math.floor(e) for e in exact]
    for i in sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])[: total - sum(counts)]:
        counts[i] += 1
    return tuple(counts)


def _mix_counts_reference(weights: tuple[float, ...], total: int) -> tuple[int, ...]:
    from .calibration import mix_counts

    return tuple(mix_counts(list(weights), total))


def straight_through_solution(w: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Forward: w + (q - w) = q. Backward: (q - w) is detached, so d/dw is the identity."""
    return w + (q - w).detach()


def _judge_straight_through(fn: Callable) -> tuple[bool, str]:
    from .blockquant import NVFP4

    g = torch.Generator().manual_seed(11)
    w = (torch.randn(8, 32, generator=g) * 0.02).requires_grad_(True)
    q = NVFP4().fake_quantize(w.detach())
    upstream = torch.randn(8, 32, generator=g)
    out = fn(w, q)
    if out is None:
        return False, "not attempted yet: your function returns None."
    if not torch.equal(out.detach(), q):
        return False, "the forward value is not the quantized round trip q."
    if not out.requires_grad:
        return False, "no gradient reaches w: the result must depend on w."
    out.backward(upstream)
    if w.grad is None or not torch.equal(w.grad, upstream):
        return False, "the gradient with respect to w is not the identity."
    return True, "forward equals q, gradient equals the identity"


def _blocks_in_budget(blocks: int, budget: float) -> int:
    """labs_lib's pick on equal blocks, NVFP4 (4.5 bits) against FP8 (8 bits)."""
    from .blockquant import NVFP4, PerTensor
    from .sensitivity import pick_under_budget

    rows = [{"block": str(i), "change (%)": 1.0, "weights": 1} for i in range(blocks)]
    return len(pick_under_budget(rows, budget, NVFP4(), PerTensor("fp8_e4m3")))


def _blocks_kept_in_budget_solution(blocks=30, low=4.5, high=8.0, budget=5.0) -> int:
    # each wide block adds (high - low) / blocks bits to the average; whole blocks only
    return math.floor(blocks * (budget - low) / (high - low))


def _number(lab: str, question: str, reference: Callable[[], float], solution: Callable, rel: float = 1e-6,
            hint: str = "", **params) -> Exercise:
    return Exercise(lab, "number", question, solution, reference, params, rel=rel, hint=hint)


EXERCISES: dict[str, Exercise] = {
    # lab 01
    "affine_quantize": Exercise(
        "01", "function",
        "Write `affine_quantize(x, bits)`: asymmetric quantization of one row with one scale and zero point. "
        "Range [lo, hi] = [min(x.min(), 0), max(x.max(), 0)]; scale = (hi - lo) / (2^bits - 1), stored in FP16 "
        "(`.half().float()`), 1 where it would be 0; zero = round(-lo / scale); codes = clamp(round(x / scale) + zero, "
        "0, 2^bits - 1); return the dequantized row (codes - zero) * scale.",
        _affine_solution, _affine_reference, cases=_affine_cases(),
        compare=lambda got, want: torch.allclose(torch.as_tensor(got).float(), want, rtol=0, atol=1e-7)),
    "round_to_e4m3": Exercise(
        "01", "function",
        "Write `round_to_e4m3(x)` without labs_lib: round each value to {mantissa} mantissa bits at its own exponent "
        "(never below 2^{min_exponent}, the smallest normal exponent), ties to even (`torch.round` does that), and "
        "saturate at ±{max:g}.",
        _round_to_e4m3_solution, lambda x: _cast(x, "fp8_e4m3"), params={"mantissa": 3, "min_exponent": -6, "max": 448},
        cases=_probe_e4m3(), compare=lambda got, want: bool(torch.equal(torch.as_tensor(got).float(), want))),
    "llama8b_nvfp4_gb": _number(
        "01", "How many GB (1e9 bytes) does a Llama-3.1-8B checkpoint take in NVFP4? Count the block scales, and keep "
        "what exports keep in BF16: the embedding, the untied lm_head and the norms. Its config.json: hidden "
        "{hidden}, {layers} layers, {heads} heads, {kv_heads} KV heads, intermediate {intermediate}, "
        "vocabulary {vocab}.",
        _llama8b_nvfp4_gb, _llama8b_nvfp4_gb_solution, rel=0.01,
        hint="4-bit values plus one 8-bit scale per 16 weights is 4.5 bits; which tensors are not quantized?",
        hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=128256),
    # lab 02
    "decode_byte_0x2b": Exercise(
        "02", "number",
        "A packed NVFP4 byte reads 0x{byte:02X}. Which two values does it hold, in order (before scaling)? "
        "Answer a pair (first, second).",
        _decode_byte_solution, lambda: _decode_byte_reference(0x2B), params={"byte": 0x2B},
        hint="the low nibble is the first (even) element; decode each nibble as sign | 2 exponent bits | "
             "1 mantissa bit"),
    "pack_e2m1_pair": Exercise(
        "02", "function",
        "Write `pack_e2m1_pair(a, b)`: two values that lie on the E2M1 grid (±0, 0.5, 1, 1.5, 2, 3, 4, 6) go into "
        "one byte, `a` in the low nibble and `b` in the high nibble, each as sign | 2 exponent bits | 1 mantissa bit "
        "(exponent bias 1). Return the byte as an int.",
        _pack_e2m1_solution, _pack_reference, cases=_pack_cases(), compare=lambda got, want: int(got) == want),
    "nvfp4_bits_block32": _number(
        "02", "NVFP4 uses blocks of {nvfp4_block}. How many bits per weight (FP4 values plus E4M3 block scales, "
        "ignoring the one FP32 tensor scale) would blocks of {block} cost?",
        lambda: _nvfp4_bits(32), lambda block=32: 4 + 8 / block, nvfp4_block=16, block=32),
    # lab 03
    "gptq_column_step": Exercise(
        "03", "function",
        "Write `gptq_step(W, U, i, q)`: one GPTQ column update. W is (rows, columns), columns < i are already "
        "quantized, q is column i rounded, U is the upper Cholesky factor of H⁻¹ (H⁻¹ = UᵀU). Set column i to q "
        "and move its error (W[:, i] - q) / U[i, i] onto the columns after i, weighted by row i of U. Return W.",
        gptq_step_solution, _gptq_loop_reference, custom=_judge_gptq_step),
    "int4_g64_asym_layer_bytes": _number(
        "03", "How many bytes does one {rows} x {cols} Linear layer need in INT4, group {group}, asymmetric "
        "(4-bit codes, an FP16 scale and a 4-bit zero point per group)?",
        lambda: _int_group_bytes(4, 64, (4096, 4096)), _int4_g64_layer_bytes_solution, rows=4096, cols=4096, group=64),
    "gptq_second_weight": _number(
        "03", "GPTQ by hand. A row has two weights w = {w}, the grid is the integers, and H = {hessian}. The first "
        "weight rounds to {first_rounded}. What is the second weight after GPTQ's correction and before it is "
        "rounded? (Use `torch.linalg.inv`.)",
        lambda: _gptq_second_weight((0.3, 0.7), [[2.0, 1.0], [1.0, 2.0]]), _gptq_second_weight_solution, rel=1e-3,
        hint="the error of w1 moves onto w2 in proportion to H⁻¹[0, 1] / H⁻¹[0, 0]; mind the sign",
        w=[0.3, 0.7], hessian=[[2, 1], [1, 2]], first_rounded=0),
    # lab 04
    "awq_scales": Exercise(
        "04", "function",
        "Write `awq_scales(x_mean, alpha)`: AWQ's scale for each input channel of one scale group. s = x_mean^alpha, "
        "clamped below at {floor:g}, then divided by sqrt(max(s) * min(s)) so that the scales sit around 1.",
        awq_scales_solution, _awq_reference, params={"floor": 1e-4}, cases=_awq_cases(),
        compare=lambda got, want: torch.allclose(torch.as_tensor(got).float(), want, rtol=1e-5)),
    "awq_alpha_that_is_rtn": Exercise(
        "04", "number", "Which alpha makes AWQ identical to round-to-nearest?", _awq_alpha_rtn_solution,
        lambda: 0.0, custom=_judge_awq_alpha),
    "int4_g32_asym_bits": _number(
        "04", "How many bits per weight does INT4 with groups of {group}, asymmetric (FP16 scale and 4-bit zero per "
        "group), cost?", lambda: _int4_bits(32), _int4_g32_bits_solution, group=32),
    # lab 05: block sizes and bytes per block from the gguf package (llama.cpp's own table)
    "q4_0_bits": _number(
        "05", "llama.cpp's Q4_0 stores blocks of {block} weights as 4-bit codes plus one FP16 scale. How many bits "
        "per weight?", lambda: _ggml_bytes("Q4_0", 1) * 8, lambda block=32: 4 + 16 / block, block=32),
    "q8_0_bytes_4096": _number(
        "05", "How many bytes does a {rows} x {cols} weight take in Q8_0 (blocks of {block} int8 values plus one FP16 "
        "scale)?", lambda: _ggml_bytes("Q8_0", 4096 * 4096),
        lambda rows=4096, cols=4096, block=32: rows * cols / block * (block + 2), rows=4096, cols=4096, block=32),
    # lab 06
    "e5m2_min_subnormal": _number(
        "06", "What is the smallest positive value E5M2 can hold (a subnormal)? Give the number.",
        lambda: _format("fp8_e5m2").min_subnormal, lambda: 2.0 ** (1 - 15) * 2.0**-2, rel=1e-9),
    "delayed_scale_step4": _number(
        "06", "A layer uses delayed scaling (E4M3, margin 0, a long history). Its input amax was {amaxes} at steps "
        "1, 2 and 3. Which scale does it use at step 4?", lambda: _delayed_scale([3.0, 12.0, 6.0]),
        lambda amaxes=(3.0, 12.0, 6.0): 448 / max(amaxes), amaxes=[3.0, 12.0, 6.0]),
    # lab 07: lm-eval's accuracy stderr is sqrt(p(1-p)/n) (up to n/(n-1)); bits per byte is log2(byte perplexity)
    "mc_items_for_stderr": _number(
        "07", "lm-eval's standard error of an accuracy p over n items is about √(p(1−p)/n). How many items would you "
        "need for a standard error of {stderr} at an accuracy of {p}?", lambda: 0.75 * 0.25 / 0.01**2,
        lambda p=0.75, stderr=0.01: p * (1 - p) / stderr**2, rel=0.02, p=0.75, stderr=0.01),
    "bits_per_byte": _number(
        "07", "A model's byte perplexity is {byte_ppl}. What are its bits per byte?", lambda: math.log2(1.8),
        lambda byte_ppl=1.8: math.log2(byte_ppl), rel=1e-3, byte_ppl=1.8),
    # lab 08
    "decode_tok_s_example": _number(
        "08", "A streamed request received its first token {first_s} s after it was sent and its last ({tokens}th) "
        "token at {last_s} s. What decode speed (tokens/s) did this user see?", lambda: 63 / (1.38 - 0.12),
        lambda first_s=0.12, last_s=1.38, tokens=64: (tokens - 1) / (last_s - first_s), rel=1e-3,
        hint="after the first token arrives, how many more tokens come, and over how long?",
        first_s=0.12, last_s=1.38, tokens=64),
    "llama70b_nvfp4_spark_ceiling": _number(
        "08", "What is the batch-1 decode ceiling (tokens/s) of Llama 3.1 70B in NVFP4 ({bits} bits per weight for "
        "the Linear layers, `lm_head` in BF16, KV cache ignored) on a DGX Spark?", _spark_ceiling_70b_nvfp4,
        _spark_ceiling_70b_nvfp4_solution, rel=0.02, bits=4.5),
    # lab 09
    "qwen3_14b_bf16_gb": _number(
        "09", "A dry run needs only config.json. How many GB (1e9 bytes) do Qwen3-14B's weights take in BF16? Its "
        "config: hidden {hidden}, {layers} layers, {heads} heads of {head_dim}, {kv_heads} KV heads, intermediate "
        "{intermediate}, vocabulary {vocab}, untied lm_head; each layer has two norms of width hidden and q/k norms "
        "of width head_dim, plus one final norm.",
        _qwen3_14b_bf16_gb, _qwen3_14b_bf16_gb_solution, rel=1e-3,
        hint="count the Linears (q, k, v, o, gate, up, down), the norms, the embedding and the lm_head, at 2 bytes",
        hidden=5120, layers=40, heads=40, head_dim=128, kv_heads=8, intermediate=17408, vocab=151936),
    "calibration_peak_bytes": Exercise(
        "09", "function",
        "Write `calibration_peak_bytes(shape, batch, seq_len)`, the dry run's calibration peak for a model loaded in "
        "BF16 ({width} bytes per value), from a labs_lib.sizing.ModelShape: the weights (`shape.params` values), plus "
        "one batch of batch x seq_len tokens through a layer's widest activations (per token 4 x hidden + 2 x heads x "
        "head_dim + 3 x intermediate values), plus a fake-quantized copy of the largest Linear weight (the largest "
        "out x in of `shape.linear_shapes()`).",
        calibration_peak_solution, _peak_reference, params={"width": 2}, cases=_peak_cases(),
        compare=lambda got, want: math.isclose(float(got), want, rel_tol=1e-12)),
    "mix_counts_example": Exercise(
        "09", "number", "A calibration YAML asks for {total} samples from three sources with weights {weights}. How "
        "many samples does each source give under largest-remainder rounding? Answer a tuple, in source order.",
        _mix_counts_solution, lambda: _mix_counts_reference((0.5, 0.3, 0.2), 7),
        params={"total": 7, "weights": [0.5, 0.3, 0.2]},
        hint="floor each exact share first; the samples left over go to the largest fractional parts"),
    # lab 11
    "straight_through": Exercise(
        "11", "function",
        "Write `straight_through(w, q)`: given weights `w` (requiring gradients) and their quantized round trip `q`, "
        "return a tensor whose value is `q` but whose gradient with respect to `w` is the identity (the "
        "straight-through estimator), in one line of torch and without labs_lib.",
        straight_through_solution, lambda w, q: q, custom=_judge_straight_through),
    "blocks_kept_in_budget": _number(
        "11", "A model's quantizable Linears form {blocks} decoder blocks of equal size. The low format costs {low} "
        "bits per weight, the wide one {high}. At most how many whole blocks can stay in the wide format when the "
        "effective bits (the average over all those weights) may not exceed {budget}?",
        lambda: _blocks_in_budget(30, 5.0), _blocks_kept_in_budget_solution, blocks=30, low=4.5, high=8.0,
        budget=5.0),
}


def _cast(x: torch.Tensor, fmt: str) -> torch.Tensor:
    from .formats import cast

    return cast(x, fmt)


def _format(fmt: str):
    from .formats import FORMATS

    return FORMATS[fmt]


def _int4_bits(group: int) -> float:
    from .blockquant import IntGroup

    return IntGroup(4, group, symmetric=False).bits_per_weight()


_attempted: set[str] = set()


def exercise(name: str) -> Exercise:
    """The exercise called `name` (its question, numbers and checker)."""
    if name not in EXERCISES:
        raise LabsError(f"No exercise called {name!r}; the exercises are: {', '.join(EXERCISES)}")
    return EXERCISES[name]


def ask(name: str) -> None:
    """Print the question of exercise `name`, with its numbers."""
    print(exercise(name).text())


def _judge_function(ex: Exercise, fn: Callable) -> tuple[bool, str]:
    for case in ex.cases:
        got = fn(*[a.clone() if isinstance(a, torch.Tensor) else a for a in case.args])
        if got is None:
            return False, "not attempted yet: your function returns None."
        if not ex.compare(got, ex.reference(*case.args)):
            return False, f"wrong for {case.kind}."
    return True, f"all {len(ex.cases)} kinds of input match labs_lib"


def _judge_number(ex: Exercise, answer) -> tuple[bool, str]:
    want = ex.reference()
    if isinstance(want, tuple):
        got = tuple(float(v) for v in answer)
        same = [g == w and math.copysign(1, g) == math.copysign(1, w) for g, w in zip(got, want)]
        if len(got) == len(want) and all(same):
            return True, f"{got} is right"
        return False, ex.hint or "not this pair."
    got = float(answer)
    if math.isclose(got, want, rel_tol=ex.rel):
        return True, f"{got:.6g} is right"
    side = "too high" if got > want else "too low"
    return False, f"{side} (more than {ex.rel:.0e} relative off)." + (f" Hint: {ex.hint}" if ex.hint else "")


def judge(name: str, answer) -> tuple[bool, str]:
    """(correct?, explanation) for `answer` to exercise `name`; None means not attempted yet."""
    ex = exercise(name)
    if answer is None:
        return False, "not attempted yet: fill in the cell above and run this one again."
    try:
        if ex.custom is not None:
            return ex.custom(answer)
        return _judge_function(ex, answer) if ex.kind == "function" else _judge_number(ex, answer)
    except Exception as exc:  # a learner's bug should read as feedback, not a crash
        return False, f"your answer raised {type(exc).__name__}: {exc}"


def check(name: str, answer) -> None:
    """Print whether `answer` solves exercise `name` (never the expected answer)."""
    ok, detail = judge(name, answer)
    if not detail.startswith("not attempted"):
        _attempted.add(name)
    status = "correct: " if ok else ("" if detail.startswith("not attempted") else "not yet: ")
    print(f"[{name}] {status}{detail}")
    if not ok and name in _attempted:
        print(f'  (after trying, `show_solution("{name}")` prints a worked solution)')


def show_solution(name: str) -> None:
    """Print the worked solution of exercise `name`, once an attempt at it was checked."""
    ex = exercise(name)
    if name not in _attempted:
        print(f"[{name}] try it first: write your answer and run check(\"{name}\", ...) at least once.")
        return
    print(f"[{name}] worked solution:\n")
    print(inspect.getsource(ex.solution))
    if ex.kind == "number":
        print(f"= {ex.solution()}")


# --------------------------------------------------------------------------------------------------
# Labs 05-08: coding exercises (a Q8_0 block, one delayed-scaling step, an accuracy's standard error, TTFT and ITL)

def _q8_0_cases() -> tuple[Case, ...]:
    g = torch.Generator().manual_seed(5)
    t = torch.tensor
    return (Case("a block of ordinary weights", (torch.randn(32, generator=g) * 0.02,)),
            Case("a block whose largest magnitude is negative", (torch.cat([torch.rand(31, generator=g), t([-3.0])]),)),
            Case("a block of zeros (the scale is 0: store 0 codes)", (torch.zeros(32),)),
            Case("a block with one outlier", (torch.cat([torch.randn(31, generator=g) * 1e-3, t([0.5])]),)),
            Case("values half-way between two codes (round half away from zero)",
                 (t([127.0, -63.5, 0.5, -0.5, 1.5, -2.5] + [0.0] * 26),)))


def _q8_0_reference(block: torch.Tensor) -> bytes:
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    return quants.quantize(block.numpy().astype(np.float32)[None], GGMLQuantizationType.Q8_0).tobytes()


def q8_0_block_solution(block: torch.Tensor) -> bytes:
    """One Q8_0 block: FP16 scale d = max|x| / 127, then 32 int8 codes round(x · (1/d)), half away from zero."""
    import numpy as np

    x = block.numpy().astype(np.float32)
    d = np.float32(np.abs(x).max() / 127)
    inverse = np.float32(0 if d == 0 else 1 / d)
    codes = np.trunc(x * inverse + np.copysign(np.float32(0.5), x))  # round half away from zero, as C's roundf
    return np.float16(d).tobytes() + codes.astype(np.int8).tobytes()


def _delayed_cases() -> tuple[Case, ...]:
    return (Case("the first step (no history yet: TE starts from scale 1)", ([], 0, 16)),
            Case("a history of three steps", ([3.0, 12.0, 6.0], 0, 16)),
            Case("a margin of one binade", ([3.0, 12.0, 6.0], 1, 16)),
            Case("a history longer than history_len (only the last history_len steps count)",
                 ([100.0, 2.0, 5.0, 4.0], 0, 3)),
            Case("a history of zeros (the scale would be infinite: keep 1)", ([0.0, 0.0], 0, 16)))


def _delayed_reference(history: list[float], margin: int, history_len: int) -> float:
    from .fp8 import ScalingRecipe, TensorScaler

    scaler = TensorScaler("fp8_e4m3", ScalingRecipe("delayed", history_len=history_len, margin=margin))
    for amax in history:
        scaler.scale(torch.tensor([amax]))
    return scaler.scale(torch.tensor([1.0])).item()


def delayed_scale_solution(history: list[float], margin: int, history_len: int) -> float:
    """Delayed scaling: E4M3's max over the largest amax of the last history_len steps, halved margin times."""
    window = history[-history_len:]
    if not window or max(window) == 0:
        return 1.0  # no usable history: Transformer Engine keeps scale 1
    return 448.0 / max(window) / 2**margin


def _stderr_cases() -> tuple[Case, ...]:
    return (Case("3 of 4 correct", ([1, 1, 1, 0],)),
            Case("75 of 100 correct", ([1] * 75 + [0] * 25,)),
            Case("all correct (no spread)", ([1] * 10,)),
            Case("an odd count, 7 of 13 correct", ([1] * 7 + [0] * 6,)))


def _stderr_reference(correct: list[int]) -> float:
    from lm_eval.api.metrics import mean_stderr

    return mean_stderr(correct)


def accuracy_stderr_solution(correct: list[int]) -> float:
    """lm-eval's standard error of a mean: the sample standard deviation (n - 1) over sqrt(n)."""
    n = len(correct)
    mean = sum(correct) / n
    variance = sum((c - mean) ** 2 for c in correct) / (n - 1)
    return math.sqrt(variance / n)


def _ttft_cases() -> tuple[Case, ...]:
    return (Case("evenly spaced tokens", ([0.2, 0.25, 0.3, 0.35],)),
            Case("a stall in the middle", ([0.1, 0.12, 0.9, 0.92, 0.94],)),
            Case("a single token (no gaps)", ([0.5],)),
            Case("two tokens in one chunk (a gap of 0)", ([0.3, 0.31, 0.31, 0.4],)))


def _ttft_reference(token_times_s: list[float]) -> tuple[float, list[float]]:
    from .serving import RequestResult

    r = RequestResult(token_times_s[0], list(token_times_s), len(token_times_s), token_times_s[-1], "")
    return r.ttft_s, r.inter_token_s


def ttft_itl_solution(token_times_s: list[float]) -> tuple[float, list[float]]:
    """TTFT is the first token's arrival time after the request was sent; ITLs are the gaps between later tokens."""
    return token_times_s[0], [b - a for a, b in zip(token_times_s, token_times_s[1:])]


def _same_ttft_itl(got, want) -> bool:
    ttft, gaps = got
    return (math.isclose(float(ttft), want[0], rel_tol=1e-9) and len(gaps) == len(want[1])
            and all(math.isclose(float(g), w, rel_tol=1e-9, abs_tol=1e-12) for g, w in zip(gaps, want[1])))


EXERCISES.update({
    "q8_0_block": Exercise(
        "05", "function",
        "Write `q8_0_block(block)`: llama.cpp's Q8_0 encoding of one block of {block} float32 weights (a torch "
        "tensor) as {nbytes} bytes: the scale d = max|x| / 127 as FP16 (2 bytes, little-endian), then {block} int8 "
        "codes round(x · (1/d)), multiplying by the float32 reciprocal and rounding half away from zero, as C's "
        "roundf; a block of zeros has d = 0 and codes 0. Return `bytes`; it is checked against the gguf package's "
        "quantizer, which is byte-identical to llama.cpp's.",
        q8_0_block_solution, _q8_0_reference, params={"block": 32, "nbytes": 34}, cases=_q8_0_cases(),
        compare=lambda got, want: bytes(got) == want),
    "delayed_scale": Exercise(
        "06", "function",
        "Write `delayed_scale(history, margin, history_len)`: the E4M3 scale delayed scaling uses at this step, "
        "given the amaxes of earlier steps (`history`, oldest first). Only the last `history_len` count; "
        "scale = {fmax:g} / (their largest amax) / 2^margin; with no history, or a largest amax of 0, the scale is 1.",
        delayed_scale_solution, _delayed_reference, params={"fmax": 448}, cases=_delayed_cases(),
        compare=lambda got, want: math.isclose(float(got), want, rel_tol=1e-6)),
    "accuracy_stderr": Exercise(
        "07", "function",
        "Write `accuracy_stderr(correct)`: the standard error lm-eval reports for an accuracy, from the list of "
        "per-item results (1 right, 0 wrong): the sample standard deviation (dividing by n - 1) over √n.",
        accuracy_stderr_solution, _stderr_reference, cases=_stderr_cases(),
        compare=lambda got, want: math.isclose(float(got), want, rel_tol=1e-9, abs_tol=1e-12)),
    "ttft_itl": Exercise(
        "08", "function",
        "Write `ttft_itl(token_times_s)`: from the arrival times of a streamed request's tokens (seconds after the "
        "request was sent), return (TTFT, list of inter-token latencies), as labs_lib.serving measures them.",
        ttft_itl_solution, _ttft_reference, cases=_ttft_cases(), compare=_same_ttft_itl),
})


# --------------------------------------------------------------------------------------------------
# Lab 10: KV cache, SmoothQuant
def _kv_70b_fp8_gb() -> float:
    from .kv_cache import kv_bytes_per_token
    from .sizing import SHAPES

    return kv_bytes_per_token(SHAPES["Llama-3.1-70B"], "fp8") * 131072 / 1e9


def _kv_70b_fp8_gb_solution(layers=80, kv_heads=8, head_dim=128, tokens=131072) -> float:
    """K and V, every layer, every KV head, head_dim values of 1 byte each, per token."""
    return 2 * layers * kv_heads * head_dim * 1 * tokens / 1e9


def _smoothing_cases() -> tuple[Case, ...]:
    t = torch.tensor
    return (Case("alpha = 0.5, the paper's default", (t([8.0, 1.0, 0.5]), t([0.5, 2.0, 0.125]), 0.5)),
            Case("alpha = 1.0, Model Optimizer's default", (t([30.0, 0.2]), t([0.1, 0.4]), 1.0)),
            Case("an input channel whose max is 0 (it never fired: scale 1)", (t([0.0, 4.0]), t([1.0, 1.0]), 0.5)),
            Case("a ratio beyond the clamp [1e-4, 1e4]", (t([1e6, 1e-9, 1.0]), t([1e-3, 10.0, 1.0]), 0.9)))


def _smoothing_reference(act_amax: torch.Tensor, w_amax: torch.Tensor, alpha: float) -> torch.Tensor:
    from .smoothquant import smoothing_scales

    return smoothing_scales(act_amax, [w_amax.unsqueeze(0)], alpha)


def smoothing_scale_solution(act_amax: torch.Tensor, w_amax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = max|X|^alpha / max|W|^(1 - alpha) per input channel; 1 for a silent channel; clamped to [1e-4, 1e4]."""
    s = act_amax.pow(alpha) / w_amax.pow(1 - alpha)
    s = torch.where(act_amax == 0, torch.ones_like(s), s)
    return s.clamp(1e-4, 1e4)


EXERCISES.update({
    "kv_70b_fp8_gb": _number(
        "10", "How many GB (1e9 bytes) does the FP8 KV cache of one {tokens:,}-token sequence of Llama-3.1-70B take? "
        "Its config.json: {layers} layers, {kv_heads} KV heads, head_dim {head_dim} (hidden 8192 / 64 heads).",
        _kv_70b_fp8_gb, _kv_70b_fp8_gb_solution, rel=1e-6,
        hint="every layer caches a K and a V vector of kv_heads x head_dim values for every token",
        tokens=131072, layers=80, kv_heads=8, head_dim=128),
    "smoothing_scale": Exercise(
        "10", "function",
        "Write `smoothing_scale(act_amax, w_amax, alpha)`: SmoothQuant's per-input-channel scale from each channel's "
        "max |X| over the calibration data and max |W| over the weight column: s = max|X|^alpha / max|W|^(1 - alpha); "
        "a channel with max |X| = 0 gets 1; clamp s to [1e-4, 1e4] (as Model Optimizer does).",
        smoothing_scale_solution, _smoothing_reference, cases=_smoothing_cases(),
        compare=lambda got, want: torch.allclose(torch.as_tensor(got).float(), want, rtol=1e-5)),
})
