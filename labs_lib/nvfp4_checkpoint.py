"""NVFP4 tensors of a whole model in the layout of Model Optimizer's unified Hugging Face checkpoint.

Per quantized Linear `<name>`: `<name>.weight` (uint8, two E2M1 codes per byte), `.weight_scale`
(float8_e4m3fn, one per 16 inputs), `.weight_scale_2` (float32 scalar), `.input_scale` (float32).
Layers that read the same input (q/k/v, gate/up) share one weight_scale_2, so that an engine can
fuse them into one GEMM with one per-tensor scale.
"""

from __future__ import annotations

import torch
from safetensors import safe_open

from .blockquant import E2M1_MAX, E4M3_MAX, NVFP4
from .fake_quant import activation_hook
from .layerwise import SKIP, linear_layers

FUSED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))

__all__ = ["FUSED_INPUTS", "shared_weight_amax", "nvfp4_state_dict", "compare_with_checkpoint", "load_nvfp4_into"]


def shared_weight_amax(model, skip: tuple[str, ...] = SKIP) -> dict[str, torch.Tensor]:
    """Each layer's weight amax, replaced by the group maximum for layers fused on one input."""
    layers = linear_layers(model, skip)
    amax = {name: layer.weight.abs().amax().float() for name, layer in layers.items()}
    for name in layers:
        parent, _, leaf = name.rpartition(".")
        for group in FUSED_INPUTS:
            members = [f"{parent}.{m}" for m in group]
            if leaf in group and all(m in layers for m in members):
                amax[name] = torch.stack([amax[m] for m in members]).max()
    return amax


def nvfp4_state_dict(model, input_amax: dict[str, torch.Tensor] | None = None,
                     skip: tuple[str, ...] = SKIP) -> dict[str, torch.Tensor]:
    """The quantized layers' tensors as the export writes them (input_scale when `input_amax` is given)."""
    scheme, out = NVFP4(), {}
    weight_amax = shared_weight_amax(model, skip)
    for name, layer in linear_layers(model, skip).items():
        q = scheme.quantize(layer.weight.detach(), global_amax=weight_amax[name])
        out.update({f"{name}.{k}": v for k, v in q.items()})
        if input_amax is not None:
            out[f"{name}.input_scale"] = input_amax[name].float() / (E2M1_MAX * E4M3_MAX)
    return out


def compare_with_checkpoint(ours: dict[str, torch.Tensor], safetensors_path) -> dict[str, int]:
    """Count tensors that are bit-identical to (or differ from) those in a checkpoint file."""
    same = differ = 0
    with safe_open(str(safetensors_path), framework="pt") as f:
        for key, mine in ours.items():
            theirs, mine = f.get_tensor(key), mine.cpu()
            identical = mine.dtype == theirs.dtype and mine.shape == theirs.shape and torch.equal(
                mine.view(torch.uint8) if mine.dtype == torch.float8_e4m3fn else mine,
                theirs.view(torch.uint8) if theirs.dtype == torch.float8_e4m3fn else theirs,
            )
            same, differ = same + identical, differ + (not identical)
    return {"identical": same, "different": differ}


@torch.no_grad()
def load_nvfp4_into(model, folder, activations: bool = True) -> list[str]:
    """Emulate an exported NVFP4 checkpoint in float: each of its quantized Linears gets the dequantized weight (in
    place, in `model`'s dtype) and, with `activations`, an input rounded to NVFP4 with the stored input_scale (as
    W4A4 kernels do). Returns the layers replaced. No FP4 kernel runs; the KV-cache quantization is not emulated."""
    from pathlib import Path

    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    replaced = []
    for name, layer in linear_layers(model, skip=()).items():
        if f"{name}.weight_scale" not in tensors:
            continue
        q = {k: tensors[f"{name}.{k}"] for k in ("weight", "weight_scale", "weight_scale_2")}
        layer.weight.copy_(NVFP4().dequantize(q).reshape(layer.weight.shape).to(layer.weight.dtype))
        if activations and f"{name}.input_scale" in tensors:
            amax = tensors[f"{name}.input_scale"].float().to(layer.weight.device) * (E2M1_MAX * E4M3_MAX)
            layer.register_forward_pre_hook(activation_hook(NVFP4(), amax))
        replaced.append(name)
    return replaced
