"""The formats `python -m labs_lib.quantize --quant` offers: each one's Model Optimizer config, weight layout and
hardware, and the KV-cache choices. Bits per weight are counted from the layout (labs_lib.sizing), not typed in.

GPUs are those of Model Optimizer's support matrix (https://nvidia.github.io/Model-Optimizer/guides/0_support_matrix.html):
FP4 formats need Blackwell (DGX Spark's GB10 included), FP8 and W4A8 Ada or later, INT8 SmoothQuant and W4A16
Ampere or later.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import LabsError
from .sizing import FORMATS

__all__ = ["PtqFormat", "PTQ_FORMATS", "KV_CACHE", "get_format", "kv_config_name", "format_table",
           "REFERENCE_SHAPE"]

# the Linear shape bits per weight are counted on (a Llama-3.1-8B attention projection): per-tensor scales vanish
REFERENCE_SHAPE = (4096, 4096)


@dataclass(frozen=True)
class PtqFormat:
    """One `--quant` choice."""

    name: str
    config: str  # the Model Optimizer config (an attribute of modelopt.torch.quantization)
    quant_algo: str  # what the export writes as hf_quant_config.json's quant_algo
    description: str
    layout: str  # the labs_lib.sizing.FORMATS entry that counts the stored weight bytes, scales included
    block: int | None  # block size along a Linear's input dimension (None: per tensor or per channel)
    gpus: str  # GPUs whose tensor cores run it natively
    needs_cuda: bool = False  # Model Optimizer's calibration of it fails on a CPU (measured with 0.47)

    @property
    def bits_per_weight(self) -> float:
        return FORMATS[self.layout].bits_per_weight(REFERENCE_SHAPE)


PTQ_FORMATS: dict[str, PtqFormat] = {f.name: f for f in [
    PtqFormat("nvfp4", "NVFP4_DEFAULT_CFG", "NVFP4", "FP4 (E2M1) weights and activations, an E4M3 scale per 16",
              "nvfp4", 16, "Blackwell (B200, RTX 50, DGX Spark)"),
    PtqFormat("nvfp4_awq", "NVFP4_AWQ_LITE_CFG", "NVFP4_AWQ", "NVFP4 after AWQ-lite per-channel smoothing",
              "nvfp4", 16, "Blackwell (B200, RTX 50, DGX Spark)", needs_cuda=True),
    PtqFormat("w4a16_nvfp4", "W4A16_NVFP4_CFG", "W4A16_NVFP4", "NVFP4 weights only, activations in 16 bits",
              "nvfp4", 16, "Blackwell (B200, RTX 50, DGX Spark)"),
    PtqFormat("mxfp4", "MXFP4_DEFAULT_CFG", "mxfp4", "OCP MXFP4 weights and activations, an E8M0 scale per 32",
              "mxfp4", 32, "Blackwell (B200, RTX 50, DGX Spark)"),
    PtqFormat("fp8", "FP8_DEFAULT_CFG", "FP8", "FP8 (E4M3) weights and activations, one scale per tensor",
              "fp8", None, "Ada, Hopper, Blackwell"),
    PtqFormat("w4a8_awq", "W4A8_AWQ_BETA_CFG", "W4A8_AWQ", "INT4 weights (AWQ, a scale per 128) with FP8 activations",
              "int4_awq", 128, "Ada, Hopper, Blackwell"),
    PtqFormat("int4_awq", "INT4_AWQ_CFG", "W4A16_AWQ", "INT4 weights only (AWQ, a scale per 128), 16-bit activations",
              "int4_awq", 128, "Ampere and later"),
    PtqFormat("int8_sq", "INT8_SMOOTHQUANT_CFG", "W8A8_SQ_PER_CHANNEL",
              "INT8 weights per channel and activations per tensor, after SmoothQuant", "int8", None,
              "Ampere and later"),
]}

# --kv_cache choice -> Model Optimizer's KV-cache config (None: the KV cache stays in the model's dtype)
KV_CACHE: dict[str, str | None] = {"fp8": "FP8_KV_CFG", "nvfp4": "NVFP4_KV_CFG", "none": None}


def get_format(name: str) -> PtqFormat:
    """The record of `--quant name`, or a LabsError listing the choices."""
    if name not in PTQ_FORMATS:
        raise LabsError(f"Unknown --quant '{name}': choose one of {', '.join(PTQ_FORMATS)} (--list_configs "
                        "describes them).")
    return PTQ_FORMATS[name]


def kv_config_name(choice: str) -> str | None:
    if choice not in KV_CACHE:
        raise LabsError(f"Unknown --kv_cache '{choice}': choose one of {', '.join(KV_CACHE)}.")
    return KV_CACHE[choice]


def format_table() -> list[dict]:
    """One row per --quant choice, as --list_configs prints it."""
    return [{"--quant": f.name, "bits/weight": round(f.bits_per_weight, 3),
             "block": f.block or "-", "native GPUs": f.gpus, "Model Optimizer config": f.config,
             "description": f.description} for f in PTQ_FORMATS.values()]
