"""Measure a model: perplexity over fixed token windows, true storage size, and a results table."""

from __future__ import annotations

import copy
import math
import time

import torch
from tqdm.auto import tqdm

from .blockquant import Scheme
from .layerwise import SKIP, linear_layers
from .quantizer import Quantizer

__all__ = ["token_nll", "perplexity", "paired_change", "quantization_error", "storage_report", "measure_method"]


def quantization_error(reference: torch.Tensor, approx: torch.Tensor) -> dict[str, float]:
    """Relative error ||approx - ref|| / ||ref|| and signal-to-noise ratio in dB (20 log10 of its inverse)."""
    ref = reference.double()
    rel = ((approx.double() - ref).norm() / ref.norm()).item()
    return {"relative_error": rel, "snr_db": -20 * math.log10(rel) if rel > 0 else math.inf}


@torch.inference_mode()
def token_nll(model, tokens: torch.Tensor, window: int = 1024, batch_size: int = 4, desc: str = "perplexity",
              score_from: int = 1) -> torch.Tensor:
    """Negative log-likelihood of every scored token (float64, on the CPU), windows cut as `perplexity` cuts them."""
    n = len(tokens) // window
    if n == 0:
        raise ValueError(f"need at least {window} tokens, got {len(tokens)}")
    windows = tokens[: n * window].reshape(n, window)
    device = next(model.parameters()).device
    nll = []
    for i in tqdm(range(0, n, batch_size), desc=desc, leave=False):
        batch = windows[i : i + batch_size].to(device)
        logits = model(batch).logits[:, score_from - 1 : -1].float()
        targets = batch[:, score_from:].reshape(-1)
        nll.append(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets, reduction="none")
                   .double().cpu())
    return torch.cat(nll)


def perplexity(model, tokens: torch.Tensor, window: int = 1024, batch_size: int = 4, desc: str = "perplexity",
               score_from: int = 1) -> float:
    """exp(mean negative log-likelihood) over non-overlapping windows of `window` tokens.

    Stride equals the window: each window starts with no context, and its first token is only
    context, so `len(tokens) // window * (window - 1)` tokens are scored, each with equal weight.
    `score_from` > 1 scores only positions from there on (llama-perplexity scores the second half of each window,
    `score_from = window // 2 + 1`).
    """
    return math.exp(token_nll(model, tokens, window, batch_size, desc, score_from).mean().item())


def paired_change(nll: torch.Tensor, reference: torch.Tensor, block: int = 128) -> tuple[float, float]:
    """Perplexity from `nll` vs from `reference` (token NLLs of the same tokens) in %, and two standard errors of that
    change in % as well: the block standard error of the mean paired NLL difference (consecutive blocks of `block`
    tokens) times exp(mean difference), the slope of the perplexity ratio (first order)."""
    d = nll - reference
    blocks = d[: len(d) // block * block].reshape(-1, block).mean(dim=1)
    if len(blocks) < 2:
        raise ValueError(f"need at least {2 * block} scored tokens for an error bar, got {len(d)}")
    mean = d.mean().item()
    return 100 * math.expm1(mean), 100 * math.exp(mean) * 2 * blocks.std().item() / math.sqrt(len(blocks))


def storage_report(model, scheme: Scheme | None = None, skip: tuple[str, ...] = SKIP, other_bits: int = 16) -> dict:
    """Bytes a checkpoint needs: quantized Linear weights at the scheme's bits (scales included), every other
    tensor at `other_bits` (BF16 by default); tied tensors count once. "bits/weight" is the quantized Linears'
    average (scales included), or `other_bits` without a scheme."""
    quantized, n_quantized, other, seen = 0.0, 0, 0.0, set()
    if scheme is not None:
        for module in linear_layers(model, skip).values():
            seen.add(module.weight.data_ptr())
            quantized += scheme.storage_bytes(tuple(module.weight.shape))
            n_quantized += module.weight.numel()
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            other += p.numel() * other_bits / 8
    bits = quantized * 8 / n_quantized if n_quantized else float(other_bits)
    return {"quantized_bytes": quantized, "other_bytes": other, "total_bytes": quantized + other, "bits/weight": bits}


def measure_method(model, method: Quantizer, batches: torch.Tensor, tokens: torch.Tensor, window: int = 1024) -> dict:
    """Quantize a copy of `model` with `method` (RTN, GPTQ, AWQ: any labs_lib.quantizer.Quantizer) and return
    one table row: bits, true size, perplexity, quantization time."""
    quantized = copy.deepcopy(model)
    start = time.perf_counter()
    method.quantize_model(quantized, batches)
    seconds = time.perf_counter() - start
    size = storage_report(quantized, method.scheme, skip=method.skip)
    return {
        "variant": method.name,
        "bits/weight": round(size["bits/weight"], 3),
        "size MB": round(size["total_bytes"] / 1e6, 1),
        "perplexity": perplexity(quantized, tokens, window=window, desc=method.name),
        "quantize s": round(seconds, 1),
    }
