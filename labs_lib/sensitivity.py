"""Per-block sensitivity to quantization, and a mixed-precision pick under a size budget.

Each decoder block is quantized alone (the rest of the model untouched) and the perplexity change is measured;
the most sensitive blocks then stay in a wider format for as long as the average bits per weight of the decoder
blocks' Linears stays within the budget. These effective bits leave the lm_head out; AutoQuantize counts it unless
told not to (Lab 11 passes it disabled_layers and a cost exclusion for "*lm_head*", so both count the same weights).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator

import torch
from tqdm.auto import tqdm

from .blockquant import Scheme
from .errors import LabsError
from .evaluate import perplexity
from .fake_quant import fake_quantize_weight_
from .layerwise import SKIP, decoder_layers, linear_layers

__all__ = ["block_linears", "quantized_in_place", "block_sensitivity", "effective_bits", "pick_under_budget",
           "mixed_precision_copy"]


def block_linears(model, skip: tuple[str, ...] = SKIP) -> dict[str, list[str]]:
    """The quantizable Linear names of each decoder block, keyed by the block's name (model.layers.i)."""
    names = list(linear_layers(model, skip))
    prefix = next(n for n, m in model.named_modules() if m is decoder_layers(model))
    return {f"{prefix}.{i}": [n for n in names if n.startswith(f"{prefix}.{i}.")]
            for i in range(len(decoder_layers(model)))}


@contextmanager
@torch.no_grad()
def quantized_in_place(model, names: list[str], scheme: Scheme) -> Iterator[None]:
    """Inside the block, only the Linears `names` hold their fake-quantized weights; all are restored on exit."""
    modules = dict(model.named_modules())
    saved = {n: modules[n].weight.detach().clone() for n in names}
    try:
        for n in names:
            fake_quantize_weight_(modules[n], scheme)
        yield
    finally:
        for n, w in saved.items():
            modules[n].weight.copy_(w)


def block_sensitivity(model, scheme: Scheme, tokens: torch.Tensor, window: int,
                      blocks: dict[str, list[str]] | None = None) -> tuple[float, list[dict]]:
    """(perplexity of `model`, one row per block: perplexity with only that block in `scheme`, and the change)."""
    blocks = blocks or block_linears(model)
    base = perplexity(model, tokens, window=window, desc="unquantized")
    modules = dict(model.named_modules())
    rows = []
    for block, names in tqdm(blocks.items(), desc=f"one block at a time in {scheme.name}"):
        with quantized_in_place(model, names, scheme):
            ppl = perplexity(model, tokens, window=window, desc=block)
        rows.append({"block": block, "perplexity": ppl, "change (%)": 100 * (ppl / base - 1),
                     "weights": sum(modules[n].weight.numel() for n in names)})
    return base, rows


def effective_bits(rows: list[dict], low: Scheme, high: Scheme | None, keep: list[str]) -> float:
    """Average bits per weight of the blocks in `rows` (the lm_head is not among them) when those in `keep` use
    `high` (None: 16-bit) and the others `low`, each format at AutoQuantize's cost (NVFP4 4.5, FP8 8, BF16 16)."""
    high_bits = 16.0 if high is None else high.bits_per_weight()
    total = sum(r["weights"] for r in rows)
    return sum(r["weights"] * (high_bits if r["block"] in keep else low.bits_per_weight()) for r in rows) / total


def pick_under_budget(rows: list[dict], budget_bits: float, low: Scheme, high: Scheme | None) -> list[str]:
    """Blocks to keep in `high`: the largest perplexity change per weight first, each taken while the effective
    bits stay within `budget_bits`."""
    if budget_bits < low.bits_per_weight():
        raise LabsError(f"A budget of {budget_bits:g} bits per weight is below {low.name} itself "
                        f"({low.bits_per_weight():g}): choose at least that.")
    keep: list[str] = []
    for row in sorted(rows, key=lambda r: r["change (%)"] / r["weights"], reverse=True):
        if effective_bits(rows, low, high, keep + [row["block"]]) <= budget_bits + 1e-9:
            keep.append(row["block"])
    return keep


@torch.no_grad()
def mixed_precision_copy(model, blocks: dict[str, list[str]], low: Scheme, high: Scheme | None, keep: list[str]):
    """A copy of `model` whose blocks in `keep` are fake-quantized with `high` (None: left as they are), the
    other blocks with `low`."""
    model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    for block, names in blocks.items():
        scheme = high if block in keep else low
        for n in names if scheme is not None else ():
            fake_quantize_weight_(modules[n], scheme)
    return model
