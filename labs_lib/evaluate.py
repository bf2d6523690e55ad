"""Measure a model: perplexity over fixed token windows, true storage size, and a results table."""

from __future__ import annotations

import copy
import math
import time

import torch
from tqdm.auto import tqdm

from .blockquant import Scheme
from .fake_quant import linear_layers

__all__ = ["perplexity", "quantization_error", "storage_report", "markdown_table", "measure_method"]


def quantization_error(reference: torch.Tensor, approx: torch.Tensor) -> dict[str, float]:
    """Relative error ||approx - ref|| / ||ref|| and signal-to-noise ratio in dB (20 log10 of its inverse)."""
    ref = reference.double()
    rel = ((approx.double() - ref).norm() / ref.norm()).item()
    return {"relative_error": rel, "snr_db": -20 * math.log10(rel) if rel > 0 else math.inf}


@torch.inference_mode()
def perplexity(model, tokens: torch.Tensor, window: int = 1024, batch_size: int = 4, desc: str = "perplexity") -> float:
    """exp(mean negative log-likelihood) over non-overlapping windows of `window` tokens.

    Stride equals the window: each window starts with no context, and its first token is only
    context, so `len(tokens) // window * (window - 1)` tokens are scored, each with equal weight.
    """
    n = len(tokens) // window
    if n == 0:
        raise ValueError(f"need at least {window} tokens, got {len(tokens)}")
    windows = tokens[: n * window].reshape(n, window)
    device = next(model.parameters()).device
    total_nll, count = 0.0, 0
    for i in tqdm(range(0, n, batch_size), desc=desc, leave=False):
        batch = windows[i : i + batch_size].to(device)
        logits = model(batch).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total_nll += nll.item()
        count += batch[:, 1:].numel()
    return math.exp(total_nll / count)


def storage_report(model, scheme: Scheme | None = None, skip: tuple[str, ...] = ("lm_head",), other_bits: int = 16) -> dict:
    """Bytes a checkpoint needs: quantized Linear weights at the scheme's bits (scales included),
    every other tensor at `other_bits` (BF16 by default); tied tensors count once."""
    quantized, other, seen = 0.0, 0.0, set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and scheme is not None and not any(s in name for s in skip):
            seen.add(module.weight.data_ptr())
            quantized += scheme.storage_bytes(tuple(module.weight.shape))
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            other += p.numel() * other_bits / 8
    return {"quantized_bytes": quantized, "other_bytes": other, "total_bytes": quantized + other}


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


def markdown_table(rows: list[dict]) -> str:
    """A Markdown table from a list of dicts with the same keys (display with IPython's Markdown)."""
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_cell(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def measure_method(model, method, batches: torch.Tensor, tokens: torch.Tensor, window: int = 1024) -> dict:
    """Quantize a copy of `model` with `method` (RTN, GPTQ, AWQ: anything with .scheme and
    .quantize_model) and return one table row: bits, true size, perplexity, quantization time."""
    quantized = copy.deepcopy(model)
    start = time.perf_counter()
    method.quantize_model(quantized, batches)
    seconds = time.perf_counter() - start
    size = storage_report(quantized, method.scheme, skip=method.skip)
    n_quantized = sum(layer.weight.numel() for layer in linear_layers(quantized, method.skip).values())
    return {
        "variant": method.name,
        "bits/weight": round(size["quantized_bytes"] * 8 / n_quantized, 3),
        "size MB": round(size["total_bytes"] / 1e6, 1),
        "perplexity": perplexity(quantized, tokens, window=window, desc=method.name),
        "quantize s": round(seconds, 1),
    }
