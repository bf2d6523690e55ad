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
    model = DecodeModel(ModelShape(64, 2, 4, 2, 128, 97), max_len=32, device="cpu", dtype=torch.float32)
    row = time_decode(model, "eager", tokens=3, context=4)
    assert row["ms/token"] > 0 and row["GB read/token"] == pytest.approx(
        (model.weight_bytes_per_token() + model.kv_bytes_per_token(4)) / 1e9, abs=1e-3)


def test_byte_counts_agree_and_published_speeds_respect_the_ceiling():
    # two independent counts of Llama 3.1 8B's BF16 decode bytes: the shape formula and the tensors allocated
    meta = DecodeModel(LLAMA_3_1_8B, max_len=256, device="meta")
    assert decode_bytes_per_token(LLAMA_3_1_8B, 16, context=256) == meta.weight_bytes_per_token() + meta.kv_bytes_per_token(256)
    assert decode_bytes_per_token(LLAMA_3_1_8B, 16) == pytest.approx(8.03e9 * 2 - 128256 * 4096 * 2, rel=0.01)
    for point in SPARK_PUBLISHED:
        ceiling = decode_ceiling_tokens_per_s(decode_bytes_per_token(LLAMA_3_1_8B, point["bits"]), HARDWARE["dgx_spark"].bandwidth_gb_s)
        assert point["decode tok/s"] < ceiling


def test_gguf_bytes_per_token_counts_the_tied_embedding():
    pytest.importorskip("llama_cpp")
    from labs_lib.gguf_io import read_gguf
    from labs_lib.llamacpp import gguf_for
    from labs_lib.models import EMBEDDED

    path = gguf_for(EMBEDDED, "Q8_0")
    info = read_gguf(path)
    assert "output.weight" not in {t["name"] for t in info["tensors"]}  # tied: token_embd is also the output layer
    assert gguf_bytes_per_token(path) == sum(t["bytes"] for t in info["tensors"])
    assert gguf_bytes_per_token(path, context=100) - gguf_bytes_per_token(path) == 2 * 30 * 3 * 64 * 100 * 2
