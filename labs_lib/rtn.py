"""Round-to-nearest (RTN): every weight group rounded on its own, no calibration data.

The baseline GPTQ and AWQ must beat, with the same interface as theirs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .blockquant import IntGroup
from .layerwise import SKIP, linear_layers

__all__ = ["RTN"]


@dataclass
class RTN:
    scheme: IntGroup = field(default_factory=lambda: IntGroup(4, 64, symmetric=False))
    skip: tuple[str, ...] = SKIP

    @property
    def name(self) -> str:
        return f"RTN {self.scheme.name}"

    @torch.no_grad()
    def quantize_linear(self, linear: torch.nn.Linear) -> dict[str, torch.Tensor]:
        """Round one Linear's weight in place; returns its codes, scales and zeros."""
        q = self.scheme.quantize(linear.weight)
        linear.weight.copy_(self.scheme.dequantize(q).reshape(linear.weight.shape))
        return q

    def quantize_model(self, model, batches: torch.Tensor | None = None,
                       batch_size: int = 8) -> dict[str, dict[str, torch.Tensor]]:
        """Round every Linear (except `skip`) in place; `batches` is accepted and unused, like GPTQ's."""
        return {name: self.quantize_linear(linear) for name, linear in linear_layers(model, self.skip).items()}
