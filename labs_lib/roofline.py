"""Memory and decode-speed arithmetic: weight bytes at a precision, and the bandwidth ceiling.

Decoding one token at batch 1 reads every weight once, so tokens/s can never exceed
memory bandwidth / bytes read per token. Hardware figures are NVIDIA's published numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Hardware", "HARDWARE", "MODEL_PARAMS", "weight_bytes", "decode_ceiling_tokens_per_s"]


@dataclass(frozen=True)
class Hardware:
    name: str
    memory_gb: float
    bandwidth_gb_s: float
    source: str


HARDWARE = {
    "dgx_spark": Hardware("DGX Spark (GB10, compute capability 12.1)", 128, 273,
                          "https://www.nvidia.com/en-us/products/workstations/dgx-spark/ ; "
                          "compute capability: https://developer.nvidia.com/cuda-gpus"),
    "h100_sxm": Hardware("H100 SXM (80 GB HBM3)", 80, 3350, "https://www.nvidia.com/en-us/data-center/h100/"),
    "h200_sxm": Hardware("H200 SXM (141 GB HBM3e)", 141, 4800, "https://www.nvidia.com/en-us/data-center/h200/"),
}


# parameter counts from the model cards (safetensors metadata) on huggingface.co
MODEL_PARAMS = {
    "Llama-3.1-8B": (8.03e9, "https://huggingface.co/meta-llama/Llama-3.1-8B"),
    "Llama-3.1-70B": (70.6e9, "https://huggingface.co/meta-llama/Llama-3.1-70B"),
}


def weight_bytes(n_params: float, bits_per_weight: float) -> float:
    return n_params * bits_per_weight / 8


def decode_ceiling_tokens_per_s(bytes_per_token: float, bandwidth_gb_s: float) -> float:
    """Upper bound on batch-1 decode speed: bandwidth / bytes read per token (weights + KV cache)."""
    return bandwidth_gb_s * 1e9 / bytes_per_token
