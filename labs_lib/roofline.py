"""Memory and decode-speed arithmetic: weight bytes at a precision, and the bandwidth ceiling.

Decoding one token at batch 1 reads every weight once, so tokens/s can never exceed
memory bandwidth / bytes read per token. Hardware figures are NVIDIA's published numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

from .sizing import SHAPES, ModelShape

__all__ = ["Hardware", "HARDWARE", "LLAMA_3_1_8B", "LLAMA_3_1_70B", "SPARK_PUBLISHED", "decode_ceiling_tokens_per_s",
           "decode_bytes_per_token", "gguf_bytes_per_token", "roofline_plot"]


@dataclass(frozen=True)
class Hardware:
    name: str
    memory_gb: float
    bandwidth_gb_s: float
    source: str
    bf16_tflops: float | None = None  # dense tensor-core peaks: half the published "with sparsity" figures
    fp8_tflops: float | None = None


HARDWARE = {
    "dgx_spark": Hardware("DGX Spark (GB10, compute capability 12.1)", 128, 273,
                          "https://www.nvidia.com/en-us/products/workstations/dgx-spark/ ; "
                          "compute capability: https://developer.nvidia.com/cuda-gpus"),
    "h100_sxm": Hardware("H100 SXM (80 GB HBM3)", 80, 3350, "https://www.nvidia.com/en-us/data-center/h100/",
                         989.5, 1979),
    "h200_sxm": Hardware("H200 SXM (141 GB HBM3e)", 141, 4800, "https://www.nvidia.com/en-us/data-center/h200/",
                         989.5, 1979),
}


def decode_ceiling_tokens_per_s(bytes_per_token: float, bandwidth_gb_s: float) -> float:
    """Upper bound on batch-1 decode speed: bandwidth / bytes read per token (weights + KV cache)."""
    return bandwidth_gb_s * 1e9 / bytes_per_token


# Llama-3.1 shapes from their config.json files (labs_lib.sizing.SHAPES)
LLAMA_3_1_8B = SHAPES["Llama-3.1-8B"]
LLAMA_3_1_70B = SHAPES["Llama-3.1-70B"]

# Published DGX Spark decode speeds of Llama 3.1 8B with TensorRT-LLM, batch 1, 2048 input / 128 output tokens.
# NVFP4: NVIDIA's primary source, "How NVIDIA DGX Spark's Performance Enables Intensive AI Tasks" (NVIDIA Technical
# Blog, Oct 2025). FP8: no NVIDIA page with this figure was found; it comes from a third-party aggregator, which
# also tabulates the NVFP4 figure. Each entry names its source and whether it is primary.
NVIDIA_SPARK_BLOG = "https://developer.nvidia.com/blog/how-nvidia-dgx-sparks-performance-enables-intensive-ai-tasks/"
SPARK_AGGREGATOR = "https://site-one-liart-13.vercel.app/en/benchmarks/2026-05-24-dgx-spark-model-throughput"
SPARK_PUBLISHED = [
    {"model": "Llama 3.1 8B", "format": "NVFP4", "bits": 4.5, "decode tok/s": 38.65, "source": NVIDIA_SPARK_BLOG,
     "primary": True},
    {"model": "Llama 3.1 8B", "format": "FP8", "bits": 8.0, "decode tok/s": 20.5, "source": SPARK_AGGREGATOR,
     "primary": False},
]


def decode_bytes_per_token(shape: ModelShape, linear_bits: float, head_bits: float = 16, context: int = 0,
                           kv_bits: float = 16) -> float:
    """Bytes one batch-1 decode step reads: the Linear weights at `linear_bits` (scales included), lm_head at
    `head_bits` (exports keep it in BF16), one embedding row, and K and V for `context` cached tokens."""
    weights = shape.linear_params * linear_bits / 8 + shape.vocab * shape.hidden * head_bits / 8 + shape.hidden * 2
    kv = 2 * shape.layers * shape.kv_heads * shape.head_dim * context * kv_bits / 8
    return weights + kv


def gguf_bytes_per_token(path, context: int = 0) -> float:
    """Bytes one llama.cpp decode step reads from a GGUF: every tensor, except that token_embd is only looked
    up (one row) when the model has a separate output.weight; with tied embeddings it is the output layer."""
    from .gguf_io import read_gguf

    info = read_gguf(path)
    tensors = {t["name"]: t for t in info["tensors"]}
    total = sum(t["bytes"] for t in tensors.values())
    if "output.weight" in tensors and "token_embd.weight" in tensors:
        embd = tensors["token_embd.weight"]
        total -= embd["bytes"] - embd["bytes"] // embd["shape"][-1]
    meta = info["metadata"]
    arch = meta.get("general.architecture", "llama")
    layers, heads = meta.get(f"{arch}.block_count", 0), meta.get(f"{arch}.attention.head_count", 1)
    kv_heads = meta.get(f"{arch}.attention.head_count_kv", heads)
    head_dim = meta.get(f"{arch}.embedding_length", 0) // heads
    return total + 2 * layers * kv_heads * head_dim * context * 2  # llama.cpp's default KV cache is F16


def roofline_plot(ceilings: dict[str, float], points: list[dict], title: str):
    """tokens/s against GB read per token (log-log): one ceiling line per bandwidth (GB/s), and measured points
    ({"label", "GB/token", "tokens/s"}). A point on its line uses all the bandwidth; below it, the rest is overhead."""
    import matplotlib.pyplot as plt
    import numpy as np

    gb = np.geomspace(min(p["GB/token"] for p in points) / 2, max(p["GB/token"] for p in points) * 2, 50)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, (name, bandwidth) in enumerate(ceilings.items()):
        ax.plot(gb, bandwidth / gb, color=f"C{i}", lw=1.2, label=f"{name}: {bandwidth:g} GB/s")
    for p in points:
        ax.scatter(p["GB/token"], p["tokens/s"], color=f"C{list(ceilings).index(p['ceiling'])}",
                   marker=p.get("marker", "o"), zorder=3)
        ax.annotate(p["label"], (p["GB/token"], p["tokens/s"]), textcoords="offset points", xytext=(6, -4), fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("GB read per decoded token (weights + KV cache)")
    ax.set_ylabel("decode tokens/s (batch 1)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig
