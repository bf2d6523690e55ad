"""SmoothQuant (Xiao et al. 2023, arxiv.org/abs/2211.10438): move activation outliers into the weights, then W8A8.

A few input channels of a Linear carry values 10-100x larger than the rest, in every token, so a per-tensor INT8
activation scale wastes most of its 256 levels on them. Dividing input channel j by s_j and multiplying weight
column j by s_j leaves X W^T unchanged; with s_j = max|X_j|^alpha / max|W_:,j|^(1-alpha) both sides end up with
milder ranges. The division is folded into the module that produces X (an RMSNorm's weight or a Linear's output
rows: labs_lib.scale_groups), so the smoothed model is an ordinary model with different weights.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .blockquant import PerChannel, PerTensor
from .fake_quant import calibrate_input_amax
from .layerwise import SKIP, decoder_layers
from .scale_groups import fold_scale, scale_groups

__all__ = ["W8A8", "channel_amax", "smoothing_scales", "smooth_model", "smoothed_input_amax"]

# INT8 weights with one scale per output row, INT8 activations with one static scale per tensor: Model Optimizer's
# INT8_DEFAULT_CFG / INT8_SMOOTHQUANT_CFG (weight_quantizer axis 0, input_quantizer axis None)
W8A8 = (PerChannel("int8"), PerTensor("int8"))
EPSILON = 2.0**-31  # an input channel with a smaller max never fired: its scale stays 1 (as in Model Optimizer)


def channel_amax(model, batches: torch.Tensor, skip: tuple[str, ...] = SKIP) -> dict[str, torch.Tensor]:
    """Per Linear, max |x| of each input channel over the calibration batches."""
    return calibrate_input_amax(model, batches, skip, per_channel=True)


def smoothing_scales(act_amax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_:,j|^(1-alpha), the weight max over every Linear that reads X; channels that
    never fired get 1, and s is clamped to [1e-4, 1e4], as Model Optimizer's smoothquant does."""
    w_amax = torch.stack([w.detach().abs().amax(0).float() for w in weights]).amax(0)
    s = act_amax.float().pow(alpha) / w_amax.pow(1 - alpha)
    return torch.where(act_amax.float() <= EPSILON, 1.0, s).clamp(1e-4, 1e4)


@torch.no_grad()
def smooth_model(model, act_amax: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """Fold smoothing scales into `model` in place, one per scale group (RMSNorm -> q/k/v, RMSNorm -> gate/up,
    up -> down; v -> o only without grouped-query attention). The float model's outputs do not change.
    Returns s for every smoothed Linear by name (Linears of one group share it)."""
    names = {id(m): n for n, m in model.named_modules()}
    scales = {}
    for layer in tqdm(decoder_layers(model), desc=f"smoothing alpha={alpha:g}", leave=False):
        for group in scale_groups(layer, model.config.model_type):
            linears = [layer.get_submodule(n) for n in group.linears]
            s = smoothing_scales(act_amax[names[id(linears[0])]], [lin.weight for lin in linears], alpha)
            fold_scale(group.prev, linears, s.to(linears[0].weight.device))
            scales |= {names[id(lin)]: s for lin in linears}
    return scales


def smoothed_input_amax(act_amax: dict[str, torch.Tensor], scales: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-tensor input amax of each Linear after smoothing: max_j (max|X_j| / s_j), no second calibration pass
    (Model Optimizer computes its input_quantizer amax the same way)."""
    return {name: (a / scales[name] if name in scales else a).amax() for name, a in act_amax.items()}
