"""Sizes from a model's config alone: parameters, checkpoint bytes per format, and what each lab needs in memory.

A quantized checkpoint stores the decoder's Linear weights in the format and keeps the embedding, an untied
lm_head and the norms in BF16 (Model Optimizer's and llm-compressor's defaults). For Llama-3.1-8B those kept
tensors are 13% of the parameters, so NVFP4 makes the checkpoint about 2.7x smaller, not 16 / 4.5 = 3.56x.
"""

from __future__ import annotations

from dataclasses import dataclass

from .blockquant import MXFP4, NVFP4, IntGroup, PerChannel, PerTensor, Scheme
from .errors import LabsError

__all__ = ["ModelShape", "SHAPES", "FORMATS", "checkpoint_bytes", "LabWorkload", "LAB_WORKLOADS", "lab_memory_plan",
           "SPARK_MEMORY_GB", "calibration_memory_plan"]

# DGX Spark: 128 GB LPDDR5x shared by CPU and GPU (nvidia.com/en-us/products/workstations/dgx-spark/)
SPARK_MEMORY_GB = 128


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama-family decoder (Llama, Mistral, Qwen2/3, SmolLM) that set its bytes and FLOPs."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool = False  # lm_head shares the embedding (SmolLM2, Llama-3.2-1B) or is its own tensor (Llama-3.1-8B)
    head_size: int | None = None  # when the config sets head_dim apart from hidden / heads (Qwen3)
    qk_norm: bool = False  # Qwen3 normalises q and k per head

    @property
    def head_dim(self) -> int:
        return self.head_size or self.hidden // self.heads

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(out, in) of the quantizable Linears of one decoder layer: q, k, v, o, gate, up, down."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        return [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]

    @property
    def linear_params(self) -> int:
        """Parameters of the quantizable Linear layers, lm_head not included."""
        return self.layers * sum(o * i for o, i in self.linear_shapes())

    @property
    def kept_params(self) -> int:
        """Parameters a quantized checkpoint keeps in 16 bits: embedding, untied lm_head, norms."""
        norms = self.layers * (2 * self.hidden + (2 * self.head_dim if self.qk_norm else 0)) + self.hidden
        return self.vocab * self.hidden * (1 if self.tied else 2) + norms

    @property
    def params(self) -> int:
        return self.linear_params + self.kept_params

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        """From a transformers config (or its dict) of a Llama-style decoder."""
        get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
        moe = [k for k in MOE_FIELDS if get(k)]
        if moe:
            raise LabsError(f"config of model type '{get('model_type')}' is a mixture of experts ({', '.join(moe)}): "
                            "MoE sizing is not supported yet; take its size from the model card.")
        try:
            heads = get("num_attention_heads")
            head_dim = get("head_dim")
            return cls(hidden=get("hidden_size"), layers=get("num_hidden_layers"), heads=heads,
                       kv_heads=get("num_key_value_heads") or heads, intermediate=get("intermediate_size"),
                       vocab=get("vocab_size"), tied=bool(get("tie_word_embeddings", False)),
                       head_size=head_dim if head_dim and head_dim != get("hidden_size") // heads else None,
                       qk_norm=str(get("model_type") or "").startswith("qwen3"))
        except TypeError:
            raise LabsError(f"config of model type '{get('model_type')}' lacks a Llama-style field "
                            "(hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, "
                            "vocab_size).") from None


# config.json fields that mark a mixture-of-experts model (Qwen3-MoE, Mixtral/gpt-oss, DeepSeek), which a dense
# Llama-style count would mis-size
MOE_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")

# From each model's config.json on huggingface.co (the repository named in the comment).
SHAPES: dict[str, ModelShape] = {
    # meta-llama/Llama-3.1-8B
    "Llama-3.1-8B": ModelShape(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=128256),
    # Qwen/Qwen3-14B (head_dim 128, q/k norms, untied lm_head)
    "Qwen3-14B": ModelShape(hidden=5120, layers=40, heads=40, kv_heads=8, intermediate=17408, vocab=151936,
                            qk_norm=True),
    # meta-llama/Llama-3.1-70B
    "Llama-3.1-70B": ModelShape(hidden=8192, layers=80, heads=64, kv_heads=8, intermediate=28672, vocab=128256),
}

# The weight formats a checkpoint can take, each as the labs_lib scheme that counts its bytes (scales included).
FORMATS: dict[str, Scheme | None] = {
    "bf16": None,
    "fp8": PerTensor("fp8_e4m3"),
    "nvfp4": NVFP4(),
    "mxfp4": MXFP4(),
    "int4_g128": IntGroup(4, 128, symmetric=False),
    # the layouts of Model Optimizer's unified export (tensors listed in labs_lib.checkpoint_check.EXPECTED)
    "int4_awq": IntGroup(4, 128, symmetric=True, scale_bits=32),  # packed INT4, one FP32 scale per 128 inputs
    "int8": PerChannel("int8"),  # INT8 codes, one FP32 scale per output row
}


def checkpoint_bytes(shape: ModelShape, fmt: str, kept_bytes_per_param: int = 2) -> dict[str, float]:
    """Bytes of a checkpoint whose decoder Linears are in `fmt` and whose other tensors are BF16 (or
    `kept_bytes_per_param` wide: an export keeps them in the dtype the model was loaded in)."""
    if fmt not in FORMATS:
        raise LabsError(f"Unknown format '{fmt}': use one of {', '.join(FORMATS)}.")
    scheme = FORMATS[fmt]
    width = 2 if scheme is None else kept_bytes_per_param
    per_layer = sum(o * i * width if scheme is None else scheme.storage_bytes((o, i)) for o, i in shape.linear_shapes())
    quantized, kept = shape.layers * per_layer, shape.kept_params * width
    bf16_total = shape.params * 2
    return {"quantized_bytes": quantized, "kept_bytes": kept, "total_bytes": quantized + kept,
            "ratio_vs_bf16": bf16_total / (quantized + kept)}


@dataclass(frozen=True)
class LabWorkload:
    """What a lab holds at its peak besides one model: more model copies, and the token windows whose full-vocabulary
    logits one evaluation step keeps (each entry `bytes_per_logit` wide)."""

    copies: int = 2  # the base model and the variant being measured
    eval_windows: int = 4  # labs_lib.evaluate.perplexity's batch
    # perplexity: the model's logits (2 bytes in BF16, 4 in FP32), their float32 copy and log-softmax (4 + 4)
    bytes_per_logit: int = 10


# Each lab's workload, as data. Lab 01 evaluates nothing; Lab 08 quantizes and exports one copy (its servers are
# processes of their own, llama.cpp's, not torch's); Labs 03 and 04 on a GPU also run GPTQModel, which loads a copy
# of its own beside the lab's; Lab 07 scores through lm-eval (HFLM batch 32: BF16 logits and their float32
# log-softmax, labs_lib.benchmark.evaluate_built); Lab 10 holds the model, a smoothed copy and its W8A8 copy; Lab 11
# trains: the teacher, an FP32 student (2 BF16 copies' worth), its gradients (2) and AdamW's two moments (4), counted
# for every parameter although only the Linears train; the training step's activations are not counted.
LAB_WORKLOADS: dict[str, LabWorkload] = {"01": LabWorkload(copies=1, eval_windows=0),
                                         "08": LabWorkload(copies=1, eval_windows=0),
                                         "03": LabWorkload(copies=3), "04": LabWorkload(copies=3),
                                         "07": LabWorkload(eval_windows=32, bytes_per_logit=6),
                                         "10": LabWorkload(copies=3), "11": LabWorkload(copies=9)}


def lab_memory_plan(shape: ModelShape, lab: str, bytes_per_param: int = 2, calib_samples: int = 128,
                    seq_len: int = 512, window: int = 1024, fixed_bytes: int = 0) -> dict[str, float]:
    """Bytes a lab needs for a model: its model copies, the calibration activations of one layer (inputs and
    outputs, kept for the layer-by-layer methods), one evaluation step (its logits and the widest activations of a
    layer) and `fixed_bytes` that do not depend on the model (the process itself on a CPU, Lab 06's GPU benchmark)."""
    work = LAB_WORKLOADS.get(lab, LabWorkload())
    weights = shape.params * bytes_per_param
    activations = 2 * calib_samples * seq_len * shape.hidden * bytes_per_param
    tokens = work.eval_windows * window
    logits = tokens * shape.vocab * work.bytes_per_logit
    forward = tokens * (3 * shape.intermediate + 4 * shape.hidden) * bytes_per_param
    total = work.copies * weights + activations + logits + forward + fixed_bytes
    return {"weights_bytes": weights, "copies": work.copies, "activation_bytes": activations,
            "logit_bytes": logits, "forward_bytes": forward, "fixed_bytes": fixed_bytes, "total_bytes": total}


def calibration_memory_plan(shape: ModelShape, fmt: str, bytes_per_param: int, batch: int,
                            seq_len: int) -> dict[str, float]:
    """Bytes to calibrate and export `shape` in `fmt`: the weights at the load dtype, the peak while one batch runs
    through the decoder (the widest activations of a layer and a fake-quantized copy of the largest weight; the
    lm_head is not run), and the checkpoint. An estimate from the config, not a measurement."""
    weights = shape.params * bytes_per_param
    q_width = shape.heads * shape.head_dim
    activations = batch * seq_len * (4 * shape.hidden + 2 * q_width + 3 * shape.intermediate) * bytes_per_param
    largest = max(o * i for o, i in shape.linear_shapes()) * bytes_per_param
    return {"parameters": shape.params, "weights_bytes": weights, "activation_bytes": activations,
            "peak_bytes": weights + activations + largest,
            "output_bytes": checkpoint_bytes(shape, fmt, bytes_per_param)["total_bytes"]}


# the columns of the Spark table: labs with the same workload share one
PLAN_COLUMNS = {"labs 01, 08": ["01", "08"], "labs 02, 05, 09": ["02", "05", "09"], "labs 03, 04": ["03", "04"],
                "lab 06": ["06"], "lab 07": ["07"], "lab 10": ["10"], "lab 11": ["11"]}


def spark_plan_rows(memory_gb: float = SPARK_MEMORY_GB) -> list[dict]:
    """For each model in SHAPES: parameters, checkpoint sizes, and the GB each lab needs (BF16, full profile, on a
    Spark: Lab 06 adds its FP8 benchmark there), and which labs fit `memory_gb`."""
    from .training import fp8_comparison_bytes

    rows = []
    for name, shape in SHAPES.items():
        lab06 = fp8_comparison_bytes(stacks=4)  # labs_lib's paths, whatever this machine has installed
        need = {column: lab_memory_plan(shape, labs[0], fixed_bytes=lab06 if labs == ["06"] else 0)["total_bytes"] / 1e9
                for column, labs in PLAN_COLUMNS.items()}
        fit = [labs for column, labs in PLAN_COLUMNS.items() if need[column] <= memory_gb]
        labs_fit = sorted(lab for labs in fit for lab in labs)
        missing = sorted(lab for labs in PLAN_COLUMNS.values() for lab in labs if lab not in labs_fit)
        rows.append({"model": name, "parameters (B)": round(shape.params / 1e9, 2),
                     "BF16 checkpoint GB": round(checkpoint_bytes(shape, "bf16")["total_bytes"] / 1e9, 1),
                     "NVFP4 checkpoint GB": round(checkpoint_bytes(shape, "nvfp4")["total_bytes"] / 1e9, 1),
                     **{f"{column} GB": round(gb) for column, gb in need.items()},
                     f"labs that fit {memory_gb:g} GB": "none" if not labs_fit
                     else "all" + (f" but {', '.join(missing)}" if missing else "")})
    return rows


def markdown_plan(memory_gb: float = SPARK_MEMORY_GB) -> str:
    """The memory table STUDY_GUIDE.md shows: `python -m labs_lib.sizing`."""
    from .report import markdown_table

    return markdown_table(spark_plan_rows(memory_gb))


if __name__ == "__main__":
    print(markdown_plan())
