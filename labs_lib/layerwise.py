"""Quantize a decoder one layer at a time, as GPTQ and AWQ do.

Calibration sequences are run up to the first decoder layer once; each layer is then quantized
from its own inputs, and its quantized outputs become the next layer's inputs, so every layer
learns to compensate for the errors already made before it.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from tqdm.auto import tqdm

from .errors import LabsError

__all__ = ["SKIP", "linear_layers", "forward_pre_hooks", "LayerInputs", "decoder_layers", "capture_first_layer_inputs",
           "run_layer", "layer_inputs", "collect_linear_inputs", "quantize_layer_by_layer"]

SKIP = ("lm_head",)  # the output head stays in high precision, as Model Optimizer's defaults keep it


def linear_layers(model: torch.nn.Module, skip: tuple[str, ...] = SKIP) -> dict[str, torch.nn.Linear]:
    """Every nn.Linear of `model` by name, except those whose name contains one of `skip`."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not any(s in name for s in skip)}


@contextmanager
def forward_pre_hooks(hooks: Iterable[tuple[torch.nn.Module, Callable]], with_kwargs: bool = False) -> Iterator[None]:
    """Register each (module, hook) as a forward pre-hook for the duration of the block; all are removed on exit,
    even on an error."""
    handles = []
    try:
        for module, hook in hooks:
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=with_kwargs))
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class LayerInputs:
    """What one decoder layer receives: hidden states in chunks of sequences, and the shared kwargs
    (rotary position embeddings, causal mask) that every chunk uses."""

    hidden: list[torch.Tensor]
    kwargs: dict


class _ReachedFirstLayer(Exception):
    pass


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder blocks of a Llama-style causal LM (model.model.layers)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise LabsError(f"{type(model).__name__} has no model.layers: layer-by-layer quantization supports "
                        "Llama-style decoders (Llama, Mistral, Qwen2, SmolLM).")
    return layers


@torch.no_grad()
def capture_first_layer_inputs(model, batches: torch.Tensor, batch_size: int = 8) -> LayerInputs:
    """Run the embedding on every calibration sequence and stop at the first decoder layer."""
    captured: list[torch.Tensor] = []
    kwargs: dict = {}

    def grab(module, args, kw):
        captured.append(args[0] if args else kw.pop("hidden_states"))
        kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _ReachedFirstLayer

    device = next(model.parameters()).device
    with forward_pre_hooks([(decoder_layers(model)[0], grab)], with_kwargs=True):
        for chunk in batches.split(batch_size):
            try:
                model(chunk.to(device), use_cache=False)
            except _ReachedFirstLayer:
                pass
    return LayerInputs(captured, kwargs)


@torch.no_grad()
def run_layer(layer: torch.nn.Module, inputs: LayerInputs) -> list[torch.Tensor]:
    """The layer's output hidden states for each chunk of its inputs."""
    outputs = []
    for hidden in inputs.hidden:
        out = layer(hidden, **inputs.kwargs)
        outputs.append(out[0] if isinstance(out, tuple) else out)
    return outputs


def layer_inputs(model, batches: torch.Tensor, index: int, batch_size: int = 8) -> LayerInputs:
    """What decoder layer `index` receives in the float model (the layers before it unquantized)."""
    inputs = capture_first_layer_inputs(model, batches, batch_size)
    for layer in decoder_layers(model)[:index]:
        inputs.hidden = run_layer(layer, inputs)
    return inputs


@torch.no_grad()
def collect_linear_inputs(layer: torch.nn.Module, inputs: LayerInputs,
                          names: list[str]) -> dict[str, list[torch.Tensor]]:
    """The input of each named Linear, one tensor per calibration chunk."""
    modules = dict(layer.named_modules())
    features: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    with forward_pre_hooks((modules[n], lambda m, a, n=n: features[n].append(a[0])) for n in names):
        for hidden in inputs.hidden:
            layer(hidden, **inputs.kwargs)
    return features


def quantize_layer_by_layer(
    model,
    batches: torch.Tensor,
    quantize_layer: Callable[[str, torch.nn.Module, LayerInputs], dict[str, dict[str, torch.Tensor]]],
    batch_size: int = 8,
    desc: str = "quantizing",
) -> dict[str, dict[str, torch.Tensor]]:
    """Call `quantize_layer(prefix, layer, inputs)` on each decoder layer in order, in place, feeding
    each the quantized outputs of the one before. Returns the quantized tensors of every Linear."""
    inputs = capture_first_layer_inputs(model, batches, batch_size)
    quantized: dict[str, dict[str, torch.Tensor]] = {}
    for i, layer in enumerate(tqdm(decoder_layers(model), desc=desc)):
        quantized.update(quantize_layer(f"model.layers.{i}", layer, inputs))
        inputs.hidden = run_layer(layer, inputs)
    return quantized

