"""GPTQ (Frantar et al., 2022, arXiv:2210.17323): round a weight one input column at a time and
push each column's rounding error onto the columns not yet rounded, weighted by the inverse
Hessian H = 2 X Xᵀ of the layer's calibration inputs, so the layer's output error stays small.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .blockquant import IntGroup
from .errors import LabsError
from .layerwise import SKIP, LayerInputs, forward_pre_hooks, linear_layers, quantize_layer_by_layer

__all__ = ["GPTQ", "collect_hessians"]


@torch.no_grad()
def collect_hessians(layer: torch.nn.Module, inputs: LayerInputs,
                     linears: dict[str, torch.nn.Linear]) -> dict[str, torch.Tensor]:
    """H = 2/N Σ x xᵀ over the N calibration tokens reaching each Linear of `layer`.

    Linears fed the very same tensor (q/k/v, gate/up) share one matrix, computed once.
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    owner_of: dict[str, str] = {}
    seen: list[tuple[torch.Tensor, str]] = []  # inputs of this forward pass, held so `is` stays meaningful

    def hook(name):
        def record(module, args):
            x = args[0]
            owner = next((o for t, o in seen if t is x), None)
            if owner is not None:
                owner_of[name] = owner
                return
            seen.append((x, name))
            x = x.reshape(-1, x.shape[-1]).float()
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]

        return record

    with forward_pre_hooks((m, hook(n)) for n, m in linears.items()):
        for hidden in inputs.hidden:
            seen.clear()
            layer(hidden, **inputs.kwargs)
    hessians = {o: 2 * sums[o] / counts[o] for o in sums}
    return {name: hessians[owner_of.get(name, name)] for name in linears}


@dataclass
class GPTQ:
    """GPTQ with integer groups (scale and zero per group), lazy block updates and optional act-order.

    damp: fraction of the mean diagonal added to H so that it can be inverted.
    act_order: quantize columns with large inputs first; group parameters are then fixed from the
    unmodified weight ("static groups"), so the checkpoint layout stays the plain group layout.
    params_after_feedback: compute a group's scale and zero from the weights after the error feedback
    of earlier columns in the same block; the reference code and GPTQModel use the weights as they
    were when the block started (False, the default, to match them).
    """

    scheme: IntGroup = field(default_factory=lambda: IntGroup(4, 64, symmetric=False))
    block_size: int = 128
    damp: float = 0.01
    act_order: bool = False
    params_after_feedback: bool = False
    skip: tuple[str, ...] = SKIP

    @property
    def name(self) -> str:
        return f"GPTQ {self.scheme.name}{' act-order' if self.act_order else ''}"

    @torch.no_grad()
    def quantize_weight(self, weight: torch.Tensor, hessian: torch.Tensor) -> dict[str, torch.Tensor]:
        """Quantize one (out, in) weight given its input Hessian; returns the scheme's tensors."""
        W = weight.detach().float().clone()
        n = W.shape[1]
        g = self.scheme.group_size or n
        if n % g:
            raise LabsError(f"Input width {n} is not a multiple of group size {g}: choose a group size that "
                            f"divides it (for width 576: 32, 64 or per-channel; 128 needs a width like 2048).")
        H = hessian.clone()
        dead = H.diagonal() == 0  # inputs that never fire: their weights cannot matter
        H[dead, dead] = 1
        W[:, dead] = 0
        perm = torch.argsort(H.diagonal(), descending=True) if self.act_order else torch.arange(n, device=W.device)
        static = self.act_order or g == n  # group parameters fixed up front from the unmodified weight
        scale, zero = self.scheme.params(self.scheme.groups(W))  # (out, n // g)
        scale, zero = scale.T.contiguous(), None if zero is None else zero.T.contiguous()  # one row per group
        H = H[perm][:, perm]
        H.diagonal().add_(self.damp * H.diagonal().mean())
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)  # H⁻¹ = UᵀU

        Wt = W[:, perm].T.contiguous()  # row i is input column perm[i]: rows are contiguous in memory
        Qt = torch.empty_like(Wt)
        block = -(-self.block_size // g) * g if g < n else self.block_size  # groups never straddle blocks
        for b0 in range(0, n, block):
            b1 = min(b0 + block, n)
            Ub, Eb, at_start = U[b0:b1, b0:b1], torch.empty(b1 - b0, Wt.shape[1], device=W.device), Wt[b0:b1].clone()
            for j in range(b1 - b0):
                i, k = b0 + j, int(perm[b0 + j]) // g  # k: this column's group
                if not static and j % g == 0:  # a new group gets its scale and zero
                    rows = Wt[i:i + g] if self.params_after_feedback else at_start[j:j + g]
                    scale[k], z = self.scheme.params(rows.T)
                    if zero is not None:
                        zero[k] = z
                Qt[i] = self.scheme.round_trip(Wt[i], scale[k], None if zero is None else zero[k])
                torch.sub(Wt[i], Qt[i], out=Eb[j]).div_(Ub[j, j])
                Wt[i + 1:b1].addr_(Ub[j, j + 1:], Eb[j], alpha=-1)  # error feedback inside the block
            Wt[b1:].addmm_(U[b0:b1, b1:].T, Eb, alpha=-1)  # lazy update of every later column at once

        Q = Qt.T[:, torch.argsort(perm)]
        return self.scheme.quantize_with(Q, scale.T, None if zero is None else zero.T)

    def quantize_layer(self, prefix: str, layer: torch.nn.Module,
                       inputs: LayerInputs) -> dict[str, dict[str, torch.Tensor]]:
        """Hessians from one pass over the layer's inputs, then every Linear of the layer in place.

        Rows of W are quantized independently given H, so Linears sharing an input (q/k/v, gate/up)
        are stacked and quantized as one matrix: same result, fewer trips through the column loop.
        """
        linears = linear_layers(layer, self.skip)
        hessians = collect_hessians(layer, inputs, linears)
        quantized = {}
        for H in {id(h): h for h in hessians.values()}.values():
            names = [n for n in linears if hessians[n] is H]
            q = self.quantize_weight(torch.cat([linears[n].weight for n in names]), H)
            rows = [linears[n].weight.shape[0] for n in names]
            for name, *parts in zip(names, *(t.split(rows) for t in q.values())):
                part = dict(zip(q, parts))
                linears[name].weight.data.copy_(self.scheme.dequantize(part).reshape(linears[name].weight.shape))
                quantized[f"{prefix}.{name}"] = part
        return quantized

    def quantize_model(self, model, batches: torch.Tensor, batch_size: int = 8) -> dict[str, dict[str, torch.Tensor]]:
        """GPTQ every decoder layer in order, in place; returns codes, scales and zeros per Linear."""
        return quantize_layer_by_layer(model, batches, self.quantize_layer, batch_size, desc=self.name)
