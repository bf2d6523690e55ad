"""Automatic checks for the labs' exercises: each compares a learner's answer with labs_lib.

`check(name, answer)` prints what is right or wrong; it never raises, so an unfinished exercise
does not stop the rest of the notebook. `judge(name, answer)` returns (ok, detail) for tests.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .blockquant import NVFP4, IntGroup, unpack_nibbles
from .formats import FORMATS, cast, decode
from .roofline import (HARDWARE, LLAMA_3_1_70B, MODEL_PARAMS, decode_bytes_per_token, decode_ceiling_tokens_per_s,
                       weight_bytes)

__all__ = ["check", "judge", "EXERCISES"]

_PROBE = torch.tensor([0.0, -0.0, 1.0, 0.1, -3.3, 17.0, 240.0, 250.0, 449.0, 1e6, -1e6, 2.0**-7, 2.0**-9,
                       3 * 2.0**-11, 2.0**-12])


def _function_matches(reference: Callable, probe: torch.Tensor) -> Callable:
    def judge(fn) -> tuple[bool, str]:
        got = fn(probe.clone())
        if got is None:
            return False, "not attempted yet: your function returns None."
        got = torch.as_tensor(got).float()
        want = reference(probe)
        wrong = ~((got == want) | (torch.isnan(got) & torch.isnan(want)))
        if wrong.any():
            i = int(wrong.nonzero()[0])
            return False, f"for x = {probe[i].item():g} you return {got[i].item():g}, expected {want[i].item():g}"
        return True, f"all {len(probe)} probe values match labs_lib bit for bit"

    return judge


def _number_close(value: Callable[[], float], rel: float = 0.01) -> Callable:
    def judge(answer) -> tuple[bool, str]:
        want = value()
        ok = math.isclose(float(answer), want, rel_tol=rel)
        return ok, f"expected about {want:.4g}" if not ok else f"{float(answer):.4g} is right"

    return judge


EXERCISES: dict[str, Callable] = {
    # lab 01
    "round_to_e4m3": _function_matches(lambda x: cast(x, "fp8_e4m3"), _PROBE),
    "llama8b_nvfp4_gb": _number_close(
        lambda: weight_bytes(MODEL_PARAMS["Llama-3.1-8B"][0], NVFP4().bits_per_weight()) / 1e9),
    # lab 02
    "nvfp4_bits_block32": _number_close(lambda: NVFP4(block_size=32).bits_per_weight(), rel=1e-6),
    "decode_byte_0x2b": lambda pair: _packed_pair(0x2B, pair),
    # lab 03
    "int4_g64_asym_layer_bytes": _number_close(
        lambda: IntGroup(4, 64, symmetric=False).storage_bytes((4096, 4096)), rel=1e-6),
    "gptq_second_weight": _number_close(lambda: _gptq_two_weights(), rel=1e-3),
    # lab 04
    "awq_alpha_that_is_rtn": lambda alpha: _awq_alpha_is_identity(alpha),
    "int4_g32_asym_bits": _number_close(lambda: IntGroup(4, 32, symmetric=False).bits_per_weight(), rel=1e-6),
    # lab 06
    "e5m2_min_subnormal": _number_close(lambda: FORMATS["fp8_e5m2"].min_subnormal, rel=1e-9),
    "delayed_scale_step4": _number_close(lambda: _delayed_scale([3.0, 12.0, 6.0]), rel=1e-6),
    # lab 05: block sizes and bytes per block from the gguf package (llama.cpp's own table)
    "q4_0_bits": _number_close(lambda: _ggml_bytes("Q4_0", 1) * 8, rel=1e-9),
    "q8_0_bytes_4096": _number_close(lambda: _ggml_bytes("Q8_0", 4096 * 4096), rel=1e-9),
    # lab 07: lm-eval's accuracy stderr is sqrt(p(1-p)/n) (up to n/(n-1)); bits per byte is log2(byte perplexity)
    "mc_items_for_stderr": _number_close(lambda: 0.75 * 0.25 / 0.01**2, rel=0.02),
    "bits_per_byte": _number_close(lambda: math.log2(1.8), rel=1e-3),
    # lab 08
    "decode_tok_s_example": _number_close(lambda: 63 / (1.38 - 0.12), rel=1e-3),
    "llama70b_nvfp4_spark_ceiling": _number_close(lambda: decode_ceiling_tokens_per_s(
        decode_bytes_per_token(LLAMA_3_1_70B, 4.5), HARDWARE["dgx_spark"].bandwidth_gb_s), rel=0.02),
}


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


def _gptq_two_weights() -> float:
    """w = [0.3, 0.7], H = [[2, 1], [1, 2]]: w1 rounds to 0; GPTQ moves its error onto w2 through H⁻¹."""
    h_inv = torch.linalg.inv(torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64))
    error = 0.3 - round(0.3)
    return 0.7 - error * (h_inv[0, 1] / h_inv[0, 0]).item()


def _awq_alpha_is_identity(alpha) -> tuple[bool, str]:
    from .awq import AWQ

    x_mean = torch.tensor([0.01, 0.1, 1.0, 10.0])
    scales = AWQ().scales(x_mean, float(alpha))
    if torch.equal(scales, torch.ones(4)):
        return True, "with alpha = 0 every scale is 1: nothing is folded, AWQ is round-to-nearest"
    return False, f"with alpha = {alpha} the scales are {[round(v, 3) for v in scales.tolist()]}, not all 1"


def _packed_pair(byte: int, pair) -> tuple[bool, str]:
    want = tuple(decode(unpack_nibbles(torch.tensor([byte], dtype=torch.uint8)), "fp4_e2m1").tolist())
    if tuple(float(v) for v in pair) == want:
        return True, f"0x{byte:02X} holds {want[0]:g} (low nibble, even element) and {want[1]:g} (high nibble)"
    return False, ("the low nibble is the first (even) element; decode each nibble as sign | 2 exponent bits | "
                   "1 mantissa bit")


def judge(name: str, answer) -> tuple[bool, str]:
    """(correct?, explanation) for `answer` to exercise `name`; None means not attempted yet."""
    if answer is None:
        return False, "not attempted yet: fill in the cell above and run this one again."
    try:
        return EXERCISES[name](answer)
    except Exception as exc:  # a learner's bug should read as feedback, not a crash
        return False, f"your answer raised {type(exc).__name__}: {exc}"


def check(name: str, answer) -> None:
    """Print whether `answer` solves exercise `name`."""
    ok, detail = judge(name, answer)
    status = "correct" if ok else ("" if detail.startswith("not attempted") else "not yet: ")
    print(f"[{name}] {status}{': ' if ok else ''}{detail}")
