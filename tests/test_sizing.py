"""Sizes from a config alone against real models and a real Model Optimizer export."""

import json
import struct

import pytest

from labs_lib.errors import LabsError
from labs_lib.sizing import SHAPES, ModelShape, checkpoint_bytes, lab_memory_plan


def _safetensors_tensor_bytes(path) -> int:
    with open(path, "rb") as fh:
        header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
    return sum(end - start for key, info in header.items() if key != "__metadata__"
               for start, end in [info["data_offsets"]])


def test_config_shape_counts_every_parameter(model):
    shape = ModelShape.from_config(model.config)
    assert shape.tied and shape.params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_untied_and_qk_norm_models_counted_exactly(kind):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(kind, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=101,
                                  tie_word_embeddings=False, head_dim=32)
    model = AutoModelForCausalLM.from_config(config)
    assert ModelShape.from_config(config).params == sum(p.numel() for p in model.parameters())


# The MoE fields of real configs on huggingface.co: Qwen/Qwen3-30B-A3B, openai/gpt-oss-20b, deepseek-ai/DeepSeek-V3
@pytest.mark.parametrize("model_type, moe", [("qwen3_moe", {"num_experts": 128, "moe_intermediate_size": 768}),
                                             ("gpt_oss", {"num_local_experts": 32}),
                                             ("deepseek_v3", {"n_routed_experts": 256, "moe_intermediate_size": 2048})])
def test_moe_configs_are_refused_not_mis_sized(model_type, moe):
    config = {"model_type": model_type, "hidden_size": 2048, "num_hidden_layers": 48, "num_attention_heads": 32,
              "num_key_value_heads": 4, "intermediate_size": 6144, "vocab_size": 151936, **moe}
    with pytest.raises(LabsError, match="mixture of experts.*not supported"):
        ModelShape.from_config(config)
    dense = {k: v for k, v in config.items() if k not in moe}
    assert ModelShape.from_config(dense).layers == 48  # the same fields without experts size as a dense model


@pytest.mark.parametrize("model_type, qk_norm", [("qwen3", True), ("qwen3_next", True), ("llama", False),
                                                 ("qwen2", False)])
def test_qk_norm_follows_every_qwen3_model_type(model_type, qk_norm):
    config = {"model_type": model_type, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "intermediate_size": 96, "vocab_size": 101}
    assert ModelShape.from_config(config).qk_norm is qk_norm


def test_nvfp4_bytes_equal_model_optimizers_export(nvfp4_export):
    folder, _ = nvfp4_export
    from labs_lib.models import EMBEDDED, load_model

    predicted = checkpoint_bytes(ModelShape.from_config(load_model(EMBEDDED).config), "nvfp4")["total_bytes"]
    # NVFP4's storage counts weight_scale_2; the W4A4 export adds a float32 input_scale per Linear (210 of them)
    assert _safetensors_tensor_bytes(folder / "model.safetensors") == predicted + 210 * 4


def test_llama_8b_nvfp4_is_about_six_gb_and_not_3_56x():
    nvfp4 = checkpoint_bytes(SHAPES["Llama-3.1-8B"], "nvfp4")
    assert SHAPES["Llama-3.1-8B"].params == pytest.approx(8.03e9, rel=1e-3)  # the model card's 8.03 B
    assert nvfp4["total_bytes"] / 1e9 == pytest.approx(6.03, abs=0.01)  # Model Optimizer's export, measured on an H200
    assert 2.6 < nvfp4["ratio_vs_bf16"] < 2.7


def test_memory_plan_counts_copies_and_the_evaluation_step():
    shape = SHAPES["Llama-3.1-8B"]
    one, two = lab_memory_plan(shape, "01"), lab_memory_plan(shape, "02")
    step = two["logit_bytes"] + two["forward_bytes"]
    assert two["total_bytes"] - one["total_bytes"] == pytest.approx(shape.params * 2 + step)
    assert lab_memory_plan(shape, "03")["total_bytes"] - two["total_bytes"] == shape.params * 2  # GPTQModel's copy
    # perplexity: 4 windows, BF16 logits, their float32 copy and log-softmax; lm-eval: 32, BF16 + float32 log-softmax
    assert two["logit_bytes"] == 4 * 1024 * 128256 * 10
    assert lab_memory_plan(shape, "07")["logit_bytes"] == 32 * 1024 * 128256 * 6
    with pytest.raises(LabsError, match="Unknown format"):
        checkpoint_bytes(shape, "int3")


def test_memory_plan_tracks_the_measured_gpu_peaks():
    """The plan for the embedded model (BF16, full profile) against each lab's peak in the committed GPU run: within a
    factor of 1.5 either way (the plan counts the large terms, not every temporary)."""
    import json
    from pathlib import Path

    from labs_lib.lab import PROFILES
    from labs_lib.models import EMBEDDED, model_config
    from labs_lib.training import fp8_comparison_bytes

    shape, full = ModelShape.from_config(model_config(EMBEDDED)), PROFILES["full"]
    records = sorted((Path(__file__).resolve().parents[1] / "results" / "gpu").glob("[0-9][0-9]_*.json"))
    assert len(records) >= 10
    for record in records:
        data, lab = json.loads(record.read_text()), record.name[:2]
        fixed = fp8_comparison_bytes() if lab == "06" and data["device"]["native_fp8"] else 0
        plan = lab_memory_plan(shape, lab, 2, full["calib_samples"], full["seq_len"], full["window"], fixed)
        ratio = plan["total_bytes"] / 1e9 / data["peak_memory_gb"]
        gb = plan["total_bytes"] / 1e9
        assert 1 / 1.5 < ratio < 1.5, f"lab {lab}: plan {gb:.2f} GB, peak {data['peak_memory_gb']} GB"


def test_study_guide_memory_table_is_the_computed_one():
    from pathlib import Path

    from labs_lib.sizing import markdown_plan

    guide = (Path(__file__).resolve().parents[1] / "STUDY_GUIDE.md").read_text()
    assert markdown_plan() in guide  # regenerate with: python -m labs_lib.sizing
