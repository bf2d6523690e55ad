"""The KV cache: what it costs per token from a model's config, and a quantized cache emulated in float.

Every decoded token reads the keys and values of all tokens before it. A quantized cache stores K (after the rotary
embedding) and V in FP8 or NVFP4 and dequantizes them as attention reads them. `quantized_kv_cache` emulates that on
any transformers Llama-style model: an attention function rounds K and V through the format before attention, which
equals decoding with a cache that quantizes each token's K and V as they enter it (a token reads its own K/V from the
cache too). Scales follow Model Optimizer's `*[kv]_bmm_quantizer`: one calibrated amax per layer for K and one for V.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .blockquant import NVFP4, PerTensor, Scheme
from .errors import LabsError
from .sizing import ModelShape

__all__ = ["KV_FORMATS", "kv_bytes_per_token", "kv_cache_rows", "KVQuant", "attach_kv_quant", "detach_kv_quant",
           "quantized_kv_cache", "calibrate_kv_amax", "ATTENTION_NAME"]

# KV-cache format -> the scheme whose bits it stores per value (None: 16-bit, BF16 or FP16); names as
# labs_lib.ptq_formats.KV_CACHE (labs-quantize --kv_cache) and Model Optimizer's FP8_KV_CFG / NVFP4_KV_CFG
KV_FORMATS: dict[str, Scheme | None] = {"bf16": None, "fp8": PerTensor("fp8_e4m3"), "nvfp4": NVFP4()}
ATTENTION_NAME = "labs_kv_quant"  # the attention implementation quantized_kv_cache registers with transformers


def kv_bytes_per_token(shape: ModelShape, fmt: str = "bf16") -> float:
    """Bytes one token adds to the cache: K and V of every layer, kv_heads x head_dim values each, at the format's
    bits per value (NVFP4's E4M3 scale per 16 values included; per-layer FP32 scales are negligible)."""
    if fmt not in KV_FORMATS:
        raise LabsError(f"Unknown KV-cache format '{fmt}': use one of {', '.join(KV_FORMATS)}.")
    scheme = KV_FORMATS[fmt]
    bits = 16 if scheme is None else scheme.bits_per_weight()
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * bits / 8


def kv_cache_rows(shapes: dict[str, ModelShape], contexts: tuple[int, ...], memory_gb: float,
                  weight_format: str = "nvfp4") -> list[dict]:
    """Per model and KV format: bytes per token, GB of one sequence at each context, and how many sequences of the
    longest context fit in `memory_gb` next to the model's `weight_format` checkpoint (labs_lib.sizing)."""
    from .sizing import checkpoint_bytes

    rows = []
    for name, shape in shapes.items():
        weights_gb = checkpoint_bytes(shape, weight_format)["total_bytes"] / 1e9
        for fmt in KV_FORMATS:
            per_token = kv_bytes_per_token(shape, fmt)
            row = {"model": name, "KV format": fmt, "bytes per token": per_token}
            row |= {f"GB at {c // 1024}K": per_token * c / 1e9 for c in contexts}
            row[f"{weight_format} weights GB"] = weights_gb
            row[f"{contexts[-1] // 1024}K sequences in {memory_gb:g} GB"] = int(
                max(memory_gb - weights_gb, 0) // (per_token * contexts[-1] / 1e9))
            rows.append(row)
    return rows


@dataclass
class KVQuant:
    """What the attention function does to K and V of each layer: record their amax (`scheme` None) or round them
    through `scheme` with the calibrated per-layer amax (NVFP4: the per-tensor amax; block scales come per 16)."""

    scheme: Scheme | None = None
    amax: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def __call__(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.scheme is None:
            k, v = key.detach().abs().amax().float(), value.detach().abs().amax().float()
            old = self.amax.get(layer)
            self.amax[layer] = (k, v) if old is None else (torch.maximum(old[0], k), torch.maximum(old[1], v))
            return key, value
        if layer not in self.amax:
            raise LabsError(f"no KV amax for layer {layer}: calibrate with calibrate_kv_amax on this model first.")
        k_amax, v_amax = self.amax[layer]
        return (self.scheme.fake_quantize(key, global_amax=k_amax).to(key.dtype),
                self.scheme.fake_quantize(value, global_amax=v_amax).to(value.dtype))


def _attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    key, value = module.kv_quant(module.layer_idx, key, value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, _attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def _attention_modules(model) -> list[torch.nn.Module]:
    modules = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "k_proj")]
    if not modules:
        raise LabsError(f"{type(model).__name__} has no attention modules with k_proj and layer_idx: the KV-cache "
                        "emulation supports Llama-style transformers models.")
    return modules


def attach_kv_quant(model, kv: KVQuant) -> str:
    """From now on every attention layer of `model` passes K and V through `kv` before attention (SDPA); returns the
    attention implementation it replaced (for `detach_kv_quant`)."""
    _register()
    previous = model.config._attn_implementation
    for m in _attention_modules(model):
        m.kv_quant = kv
    model.set_attn_implementation(ATTENTION_NAME)
    return previous


def detach_kv_quant(model, previous: str) -> None:
    """Undo `attach_kv_quant`: the attention implementation `previous` again, K and V as computed."""
    model.set_attn_implementation(previous)
    for m in _attention_modules(model):
        del m.kv_quant


@contextlib.contextmanager
def quantized_kv_cache(model, kv: KVQuant):
    """Inside the block, every attention layer of `model` passes K and V through `kv` before attention (SDPA)."""
    previous = attach_kv_quant(model, kv)
    try:
        yield model
    finally:
        detach_kv_quant(model, previous)


@torch.inference_mode()
def calibrate_kv_amax(model, batches: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the largest |K| (after the rotary embedding) and |V| over the calibration batches."""
    recorder = KVQuant()
    device = next(model.parameters()).device
    with quantized_kv_cache(model, recorder):
        for batch in tqdm(batches, desc="calibrating KV", leave=False):
            model(batch.unsqueeze(0).to(device))
    return recorder.amax
