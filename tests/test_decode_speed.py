"""The decode loop of labs_lib.decode_speed against transformers, and the roofline's byte counts."""

import pytest
import torch

from labs_lib.decode_speed import DecodeModel, time_decode
from labs_lib.roofline import (HARDWARE, LLAMA_3_1_8B, SPARK_PUBLISHED, decode_bytes_per_token,
                               decode_ceiling_tokens_per_s, gguf_bytes_per_token)
from labs_lib.sizing import ModelShape


def test_static_cache_decode_matches_transformers():
    """Same weights, same greedy tokens: RoPE layout, GQA, the KV cache and the norms are all right."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = ModelShape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=97)
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=97, rms_norm_eps=1e-5, rope_theta=10000.0,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    reference = LlamaForCausalLM(config).eval()
    ours = DecodeModel(shape, max_len=32, device="cpu", dtype=torch.float32, rope_theta=10000.0)
    ours.embedding = reference.model.embed_tokens.weight.detach()
    ours.lm_head = reference.lm_head.weight.detach()
    for layer, block in zip(ours.layers, reference.model.layers):
        attn, mlp = block.self_attn, block.mlp
        layer["qkv"] = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach()
        layer["o"], layer["down"] = attn.o_proj.weight.detach(), mlp.down_proj.weight.detach()
        layer["gate_up"] = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach()

    prompt = torch.tensor([5, 17, 3, 88, 42])
    expected = reference.generate(prompt[None], max_new_tokens=6, do_sample=False)[0, len(prompt):]
    token, generated = None, []
    for pos in range(len(prompt) + 5):
        current = prompt[pos : pos + 1] if pos < len(prompt) else token
        token = ours.step(current, torch.tensor(pos))
        if pos >= len(prompt) - 1:
            generated.append(token.item())
    assert generated == expected.tolist()


def test_cpu_timing_row():
    """The row's bytes agree with the roofline's independent count from the shape (fp32: 32 bits everywhere),
    and its speeds are those bytes over the measured time."""
    shape = ModelShape(hidden=512, layers=2, heads=8, kv_heads=4, intermediate=2048, vocab=32000)
    model = DecodeModel(shape, max_len=32, device="cpu", dtype=torch.float32)
    row = time_decode(model, "eager", tokens=3, context=4)
    expected = decode_bytes_per_token(shape, linear_bits=32, head_bits=32, context=4, kv_bits=32)
    assert row["GB read/token"] == pytest.approx(expected / 1e9, abs=1e-3) and row["GB read/token"] > 0.05
    assert row["ms/token"] > 0 and row["tokens/s"] == pytest.approx(1000 / row["ms/token"], rel=0.01)
    assert row["achieved GB/s"] == pytest.approx(expected / 1e6 / row["ms/token"], rel=0.01, abs=1)


def test_byte_counts_agree_and_published_speeds_respect_the_ceiling():
    # two independent counts of Llama 3.1 8B's BF16 decode bytes: the shape formula and the tensors allocated
    meta = DecodeModel(LLAMA_3_1_8B, max_len=256, device="meta")
    allocated = meta.weight_bytes_per_token() + meta.kv_bytes_per_token(256)
    assert decode_bytes_per_token(LLAMA_3_1_8B, 16, context=256) == allocated
    assert decode_bytes_per_token(LLAMA_3_1_8B, 16) == pytest.approx(8.03e9 * 2 - 128256 * 4096 * 2, rel=0.01)
    for point in SPARK_PUBLISHED:
        step_bytes = decode_bytes_per_token(LLAMA_3_1_8B, point["bits"])
        ceiling = decode_ceiling_tokens_per_s(step_bytes, HARDWARE["dgx_spark"].bandwidth_gb_s)
        assert point["decode tok/s"] < ceiling


def test_gguf_bytes_per_token_counts_the_tied_embedding(facts):
    pytest.importorskip("llama_cpp")
    from labs_lib.gguf_io import read_gguf
    from labs_lib.llamacpp import gguf_for
    from labs_lib.models import EMBEDDED

    path = gguf_for(EMBEDDED, "Q8_0")
    info = read_gguf(path)
    assert "output.weight" not in {t["name"] for t in info["tensors"]}  # tied: token_embd is also the output layer
    assert gguf_bytes_per_token(path) == sum(t["bytes"] for t in info["tensors"])
    kv_f16 = 2 * facts.layers * facts.kv_heads * facts.head_dim * 100 * 2  # K and V, 100 tokens, F16
    assert gguf_bytes_per_token(path, context=100) - gguf_bytes_per_token(path) == kv_f16


def test_a_partial_gpu_run_keeps_the_other_parts_of_the_record(tmp_path):
    """`--parts gemv` re-measures only the GEMV rows; the decode rows, prefill and their dates stay, and nothing of
    the previous GEMV run (rows, profile, errors) survives; a record from another GPU is never merged."""
    import json

    from labs_lib.decode_speed import _keep_other_parts

    previous = {"device": {"name": "H200"}, "date_utc": "then",
                "rows": [{"mode": "compiled", "weights": "bfloat16"},
                         {"mode": "compiled", "weights": "NVFP4 (Triton GEMV)"}],
                "profile": {"bfloat16 (compiled)": [1], "NVFP4 (Triton GEMV) (compiled)": [2]},
                "prefill": [{"tokens": 2048}],
                "errors": {"gemv: int4": "old failure", "prefill: FP8": "kept"}}
    path = tmp_path / "08_engine_gpu.json"
    path.write_text(json.dumps(previous))
    record = {"rows": [], "profile": {}, "prefill": [], "errors": {}, "parts measured (UTC)": {"gemv": "now"}}
    _keep_other_parts(record, path, {"gemv"}, "H200")
    assert record["rows"] == previous["rows"][:1] and list(record["profile"]) == ["bfloat16 (compiled)"]
    assert record["prefill"] == previous["prefill"] and record["errors"] == {"prefill: FP8": "kept"}
    assert record["parts measured (UTC)"] == {"decode": "then", "gemv": "now"}
    other = {"rows": [], "profile": {}, "prefill": [], "errors": {}, "parts measured (UTC)": {}}
    _keep_other_parts(other, path, {"gemv"}, "H100")
    assert other["rows"] == [] and other["prefill"] == []
