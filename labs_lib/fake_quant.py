"""Apply a quantization scheme to a whole model by simulation ("fake quantization").

Weights are replaced by their quantize-dequantize round trip; activations, when asked for, are
rounded on the way into each Linear layer. The matmuls stay in float, so any CPU can run it and
the numbers equal what a low-precision kernel would compute up to its accumulation order.
"""

from __future__ import annotations

import copy

import torch
from tqdm.auto import tqdm

from .blockquant import NVFP4, PerTensor, Scheme
from .layerwise import SKIP, forward_pre_hooks, linear_layers

__all__ = ["activation_hook", "calibrate_input_amax", "fake_quantize_weight_", "fake_quantized_copy"]


@torch.inference_mode()
def calibrate_input_amax(model, batches: torch.Tensor, skip: tuple[str, ...] = SKIP,
                         per_channel: bool = False) -> dict[str, torch.Tensor]:
    """Largest |input| each Linear sees over the calibration batches (the static activation range): one number, or
    with `per_channel` one per input channel (what SmoothQuant migrates)."""
    amax: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(module, args):
            x = args[0].detach().abs()
            a = (x.reshape(-1, x.shape[-1]).amax(0) if per_channel else x.amax()).float()
            amax[name] = torch.maximum(amax[name], a) if name in amax else a

        return hook

    with forward_pre_hooks((m, record(n)) for n, m in linear_layers(model, skip).items()):
        for batch in tqdm(batches, desc="calibrating", leave=False):
            model(batch.unsqueeze(0).to(next(model.parameters()).device))
    return amax


def activation_hook(scheme: Scheme, amax: torch.Tensor | None):
    """A forward pre-hook that fake-quantizes a Linear's input with `scheme` (static `amax` for NVFP4/per-tensor)."""
    static = isinstance(scheme, (NVFP4, PerTensor)) and amax is not None

    def hook(module, args):
        x = args[0]
        q = scheme.fake_quantize(x, global_amax=amax) if static else scheme.fake_quantize(x)
        return (q.to(x.dtype), *args[1:])

    return hook


@torch.no_grad()
@torch.no_grad()
def fake_quantize_weight_(layer: torch.nn.Linear, scheme: Scheme) -> None:
    """Replace `layer`'s weight, in place, by its round trip through `scheme` (kept in the weight's dtype)."""
    layer.weight.copy_(scheme.fake_quantize(layer.weight).to(layer.weight.dtype))


def fake_quantized_copy(
    model,
    weights: Scheme | None = None,
    activations: Scheme | None = None,
    input_amax: dict[str, torch.Tensor] | None = None,
    skip: tuple[str, ...] = SKIP,
):
    """A copy of `model` whose Linear weights (and optionally inputs) go through the schemes.

    `input_amax` (from `calibrate_input_amax`) gives activations a static per-tensor range, as a
    deployed W4A4/W8A8 checkpoint stores it; without it each input uses its own maximum.
    """
    model = copy.deepcopy(model)
    for name, layer in linear_layers(model, skip).items():
        if weights is not None:
            fake_quantize_weight_(layer, weights)
        if activations is not None:
            layer.register_forward_pre_hook(activation_hook(activations, (input_amax or {}).get(name)))
    return model
