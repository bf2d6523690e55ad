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
from .fake_quant import SKIP, linear_layers
from .layerwise import LayerInputs, collect_linear_inputs, quantize_layer_by_layer
from .rtn import RTN

__all__ = ["AWQ", "ScaleGroup", "llama_scale_groups", "fold_scale"]

ALPHAS = tuple(i / 20 for i in range(20))  # 0, 0.05, ..., 0.95, as AutoAWQ's grid
NO_CLIP = ("q_proj", "k_proj")  # their outputs meet in q·kᵀ, which a per-layer error does not see


@dataclass
class ScaleGroup:
    """Linears that read the output of `prev`, and the module whose output judges their scale."""

    prev: torch.nn.Module  # RMSNorm (scale its weight) or Linear (scale its output rows)
    linears: list[str]  # names inside the decoder layer
    inspect: torch.nn.Module
    is_attention: bool = False


def llama_scale_groups(layer: torch.nn.Module) -> list[ScaleGroup]:
    """Where a Llama decoder layer can absorb input scales. v→o is skipped when v is narrower than o
    (grouped-query attention repeats v's heads, so one scale per o input cannot be folded into v)."""
    attn, mlp = layer.self_attn, layer.mlp
    groups = [ScaleGroup(layer.input_layernorm, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], attn, True)]
    if attn.v_proj.weight.shape == attn.o_proj.weight.shape:
        groups.append(ScaleGroup(attn.v_proj, ["self_attn.o_proj"], attn.o_proj))
    groups.append(ScaleGroup(layer.post_attention_layernorm, ["mlp.gate_proj", "mlp.up_proj"], mlp))
    groups.append(ScaleGroup(mlp.up_proj, ["mlp.down_proj"], mlp.down_proj))
    return groups


@torch.no_grad()
def fold_scale(prev: torch.nn.Module, linears: list[torch.nn.Linear], s: torch.Tensor) -> None:
    """Divide prev's output by s and multiply the consumers' input columns by s: outputs unchanged."""
    if isinstance(prev, torch.nn.Linear):
        prev.weight.div_(s.unsqueeze(1).to(prev.weight.dtype))
        if prev.bias is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
    else:
        prev.weight.div_(s.to(prev.weight.dtype))
    for linear in linears:
        linear.weight.mul_(s.unsqueeze(0).to(linear.weight.dtype))


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

    def quantize_layer(self, prefix: str, layer: torch.nn.Module, inputs: LayerInputs) -> dict[str, dict[str, torch.Tensor]]:
        modules = dict(layer.named_modules())
        names = list(linear_layers(layer, self.skip))
        features = collect_linear_inputs(layer, inputs, names)
        n_seq = max(1, self.search_tokens // inputs.hidden[0].shape[1])
        for group in llama_scale_groups(layer):
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
        return quantize_layer_by_layer(model, batches, self.quantize_layer, batch_size, desc=self.name)
