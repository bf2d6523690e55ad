"""Where a decoder layer can absorb per-input-channel scales (AWQ, SmoothQuant-style methods), per architecture.

A scale group is a module whose output feeds some Linears: dividing that output by s and multiplying the
Linears' input columns by s leaves the float model unchanged (`fold_scale`). Which modules form groups is data,
one list of module names per architecture family (as llm-compressor's AWQ mappings are); a new family needs
only its entry in MAPPINGS.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import LabsError

__all__ = ["ScaleMapping", "MAPPINGS", "ScaleGroup", "scale_groups", "fold_scale"]


@dataclass(frozen=True)
class ScaleMapping:
    """Module names inside one decoder layer: `prev` feeds `linears`; `inspect`'s output judges a scale.

    attention: `inspect` is the attention block (it takes the layer's kwargs and returns a tuple)."""

    prev: str
    linears: tuple[str, ...]
    inspect: str
    attention: bool = False


_LLAMA_STYLE = (  # pre-norm decoder: RMSNorm -> q/k/v, v -> o, RMSNorm -> gate/up, up -> down
    ScaleMapping("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn", True),
    ScaleMapping("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
    ScaleMapping("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    ScaleMapping("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
)

# config.model_type -> the layer's scale groups. Qwen2's q/k/v biases and Qwen3's per-head q/k norms sit after
# the scaled input columns, so the same names hold for all four.
MAPPINGS: dict[str, tuple[ScaleMapping, ...]] = {
    "llama": _LLAMA_STYLE,
    "mistral": _LLAMA_STYLE,
    "qwen2": _LLAMA_STYLE,
    "qwen3": _LLAMA_STYLE,
}


@dataclass
class ScaleGroup:
    """Linears that read the output of `prev`, and the module whose output judges their scale."""

    prev: torch.nn.Module  # RMSNorm (scale its weight) or Linear (scale its output rows)
    linears: list[str]  # names inside the decoder layer
    inspect: torch.nn.Module
    is_attention: bool = False


def _mappings(model_type: str) -> tuple[ScaleMapping, ...]:
    if model_type not in MAPPINGS:
        raise LabsError(f"No scale groups for architecture '{model_type}': supported are {', '.join(MAPPINGS)}. "
                        "Add its module names to labs_lib.scale_groups.MAPPINGS.")
    return MAPPINGS[model_type]


def scale_groups(layer: torch.nn.Module, model_type: str) -> list[ScaleGroup]:
    """The scale groups of one decoder layer of a `model_type` model (its config.model_type, e.g. 'llama').

    A Linear `prev` whose outputs are fewer than its consumers' inputs is skipped: with grouped-query attention
    v's heads are repeated for o, so one scale per o input cannot be folded into v."""
    modules = dict(layer.named_modules())
    groups = []
    for m in _mappings(model_type):
        missing = [n for n in (m.prev, m.inspect, *m.linears) if n not in modules]
        if missing:
            raise LabsError(f"{type(layer).__name__} has no module {', '.join(missing)}: it does not match the "
                            f"'{model_type}' layout of labs_lib.scale_groups.MAPPINGS.")
        prev = modules[m.prev]
        if isinstance(prev, torch.nn.Linear) and prev.out_features != modules[m.linears[0]].in_features:
            continue
        groups.append(ScaleGroup(prev, list(m.linears), modules[m.inspect], m.attention))
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
