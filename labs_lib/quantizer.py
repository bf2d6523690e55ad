"""The interface every weight quantizer (RTN, GPTQ, AWQ) shares, and the fingerprint of its settings.

A new method needs only these four members to be measured by `evaluate.measure_method` and built, cached,
by `variants.Layerwise`: see README, "Adding a method / adding a lab".
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Protocol, runtime_checkable

import torch

from .blockquant import Scheme

__all__ = ["Quantizer", "settings_key"]


@runtime_checkable
class Quantizer(Protocol):
    """Quantizes a model's Linear weights in place and returns the tensors a checkpoint stores.

    Read-only members, so that a dataclass field of a narrower type (scheme: IntGroup) satisfies them."""

    @property
    def scheme(self) -> Scheme:
        """The stored format (e.g. IntGroup: codes, scales and zeros per group); it dequantizes what
        quantize_model returns."""
        ...

    @property
    def skip(self) -> tuple[str, ...]:
        """Linears whose name contains one of these stay in float (labs_lib.layerwise.SKIP)."""
        ...

    @property
    def name(self) -> str:
        """A short label for tables and progress bars, e.g. 'GPTQ INT4-g64-asym'."""
        ...

    def quantize_model(self, model: torch.nn.Module, batches: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
        """Quantize every Linear (except `skip`) in place on calibration `batches`; codes, scales, zeros by name."""
        ...


def settings_key(method: Quantizer) -> str:
    """A short hash of everything that configures `method`: its type and its constructor fields (a dataclass's
    `init` fields; results a method records while it runs are `init=False` and do not count)."""
    if dataclasses.is_dataclass(method):
        settings = {f.name: getattr(method, f.name) for f in dataclasses.fields(method) if f.init}
    else:
        settings = dict(vars(method))
    text = f"{type(method).__name__}{sorted((k, repr(v)) for k, v in settings.items())}"
    return hashlib.sha1(text.encode()).hexdigest()[:12]
