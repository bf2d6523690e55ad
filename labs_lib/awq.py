"""AWQ (Lin et al., 2023, arXiv:2306.00978): protect the weights that meet large activations.

Per input channel, a scale s = mean|x|^alpha multiplies the weight column before rounding and
divides the input: large-activation channels get finer steps. alpha is grid-searched against the
output error of the block that consumes those inputs, and s is folded into the preceding RMSNorm
or Linear, so the float model computes exactly what it did before. A per-group clipping search
then shrinks each group's range where that lowers the output error.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .blockquant import IntGroup
from .layerwise import (SKIP, LayerInputs, collect_linear_inputs, decoder_layers, linear_layers,
                        quantize_layer_by_layer)
from .rtn import RTN
from .scale_groups import ScaleGroup, fold_scale, scale_groups

__all__ = ["AWQ"]

ALPHAS = tuple(i / 20 for i in range(20))  # 0, 0.05, ..., 0.95, as AutoAWQ's grid
NO_CLIP = ("q_proj", "k_proj")  # their outputs meet in q·kᵀ, which a per-layer error does not see


@dataclass
class AWQ:
    """Activation-aware scaling and clipping, then round-to-nearest integer groups.

    search_tokens caps the calibration tokens used to score each alpha (the search dominates the
    run time); clip_tokens caps those of the clipping search; alphas=(0.0,) with clip=False is RTN.
    """

    scheme: IntGroup = field(default_factory=lambda: IntGroup(4, 64, symmetric=False))
    alphas: tuple[float, ...] = ALPHAS
    clip: bool = True
    search_tokens: int = 1024
    clip_tokens: int = 512
    max_shrink: float = 0.5
    skip: tuple[str, ...] = SKIP
    chosen: dict[str, float] = field(default_factory=dict, init=False)  # best alpha per scale group

    @property
    def name(self) -> str:
        return f"AWQ {self.scheme.name}"

    def scales(self, x_mean: torch.Tensor, alpha: float) -> torch.Tensor:
        """s = mean|x|^alpha per input channel, normalised so that sqrt(max s * min s) = 1."""
        s = x_mean.pow(alpha).clamp(min=1e-4)
        return s / (s.max() * s.min()).sqrt()

    @torch.no_grad()
    def search_scale(self, group: ScaleGroup, linears: list[torch.nn.Linear], x: list[torch.Tensor], kwargs: dict):
        """Best alpha for one group: returns (scale, alpha, output error for every alpha)."""
        x_mean = torch.cat([c.reshape(-1, c.shape[-1]) for c in x]).abs().float().mean(0)

        def run():
            outs = [group.inspect(c, **kwargs)[0] if group.is_attention else group.inspect(c) for c in x]
            return torch.cat([o.reshape(-1, o.shape[-1]) for o in outs]).float()

        reference, originals = run(), [lin.weight.clone() for lin in linears]
        errors = []
        for alpha in self.alphas:
            s = self.scales(x_mean, alpha)
            for lin, w in zip(linears, originals):
                lin.weight.copy_(self.scheme.fake_quantize(w * s) / s)
            errors.append((run() - reference).pow(2).mean().item())
        for lin, w in zip(linears, originals):
            lin.weight.copy_(w)
        best = min(range(len(errors)), key=errors.__getitem__)
        return self.scales(x_mean, self.alphas[best]), self.alphas[best], errors

    @torch.no_grad()
    def search_clip(self, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-group clipping bound (out, n_groups) that minimizes each group's share of the output error.

        The mean squared error of a group's partial output, mean_t (x_t . d)^2 for a weight change d, equals
        d^T G d with G the group's mean x x^T: one small Gram matrix instead of a matmul over every token."""
        x = x.reshape(-1, x.shape[-1]).float()
        x = x[:: max(1, x.shape[0] // self.clip_tokens)]
        w = self.scheme.groups(weight)  # (out, n_groups, g)
        xg = self.scheme.groups(x).transpose(0, 1)  # (n_groups, tokens, g)
        gram = xg.transpose(1, 2) @ xg / xg.shape[1]  # (n_groups, g, g)
        amax = w.abs().amax(-1, keepdim=True)
        best, best_err = amax.clone(), torch.full_like(amax, float("inf"))
        for i in range(int(self.max_shrink * 20)):
            bound = amax * (1 - i / 20)
            q = self.scheme.groups(self.scheme.fake_quantize(torch.clamp(w, -bound, bound).flatten(-2)))
            d = (q - w).permute(1, 2, 0)  # (n_groups, g, out)
            err = ((gram @ d) * d).sum(1).T.unsqueeze(-1)  # (out, n_groups, 1)
            better = err < best_err
            best_err, best = torch.where(better, err, best_err), torch.where(better, bound, best)
        return best

    def quantize_layer(self, prefix: str, layer: torch.nn.Module, inputs: LayerInputs,
                       model_type: str) -> dict[str, dict[str, torch.Tensor]]:
        """Search and fold the scales of one decoder layer (of a `model_type` model), clip, then round its Linears."""
        modules = dict(layer.named_modules())
        names = list(linear_layers(layer, self.skip))
        features = collect_linear_inputs(layer, inputs, names)
        n_seq = max(1, self.search_tokens // inputs.hidden[0].shape[1])
        for group in scale_groups(layer, model_type):
            linears = [modules[n] for n in group.linears]
            x = torch.cat(features[group.linears[0]])[:n_seq].split(inputs.hidden[0].shape[0])
            s, alpha, _ = self.search_scale(group, linears, list(x), inputs.kwargs)
            fold_scale(group.prev, linears, s)
            for n in group.linears:  # the float model is unchanged; the recorded inputs are now x / s
                features[n] = [c / s for c in features[n]]
            self.chosen[f"{prefix}.{group.linears[0]}"] = alpha
        quantized, rtn = {}, RTN(self.scheme)
        with torch.no_grad():
            for name in names:
                w = modules[name].weight
                if self.clip and not any(n in name for n in NO_CLIP):
                    bound = self.search_clip(w, torch.cat(features[name]))
                    w.copy_(torch.clamp(self.scheme.groups(w), -bound, bound).flatten(-2))
                quantized[f"{prefix}.{name}"] = rtn.quantize_linear(modules[name])
        return quantized

    def quantize_model(self, model, batches: torch.Tensor, batch_size: int = 8) -> dict[str, dict[str, torch.Tensor]]:
        """AWQ every decoder layer in order, in place; returns codes, scales and zeros per Linear."""
        self.chosen.clear()
        model_type = model.config.model_type
        scale_groups(decoder_layers(model)[0], model_type)  # an unsupported architecture fails before any work

        def quantize_layer(prefix: str, layer: torch.nn.Module, inputs: LayerInputs):
            return self.quantize_layer(prefix, layer, inputs, model_type)

        return quantize_layer_by_layer(model, batches, quantize_layer, batch_size, desc=self.name)
