"""GGUF writer and reader: tensors round-trip with llama.cpp's names and Q/K permutation, the tokenizer equals
the one llama.cpp's converter wrote into the shipped SmolLM2 file, and damaged files give clear errors.
The llama.cpp checks run where llama-cpp-python is installed."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from labs_lib.errors import LabsError
from labs_lib.gguf_io import compare_gguf, permute_for_rope, read_gguf, tensor_type_summary, write_gguf
from labs_lib.llamacpp import convert_with_llama_cpp
from labs_lib.models import EMBEDDED, embedded_gguf_path, model_folder


@pytest.fixture(scope="module")
def f16_gguf(model, tokenizer, tmp_path_factory):
    return write_gguf(model, tokenizer, tmp_path_factory.mktemp("gguf") / "smollm2-f16.gguf")


def test_permutation_interleaves_the_two_rotary_halves():
    w = torch.arange(8.0).reshape(8, 1)  # one head of dim 8: halves [0..3] and [4..7]
    assert permute_for_rope(w, 1).flatten().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_written_tensors_round_trip(f16_gguf, model):
    from gguf import GGUFReader

    reader = GGUFReader(str(f16_gguf))
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 + 9 * model.config.num_hidden_layers and "output.weight" not in tensors  # tied head
    layer = model.model.layers[7]
    q = np.asarray(tensors["blk.7.attn_q.weight"].data, dtype=np.float32)
    want_q = permute_for_rope(layer.self_attn.q_proj.weight.detach(), model.config.num_attention_heads)
    assert np.array_equal(q, want_q.half().float().numpy())
    k = np.asarray(tensors["blk.7.attn_k.weight"].data, dtype=np.float32)
    want_k = permute_for_rope(layer.self_attn.k_proj.weight.detach(), model.config.num_key_value_heads)
    assert np.array_equal(k, want_k.half().float().numpy())
    norm = np.asarray(tensors["blk.7.attn_norm.weight"].data)
    assert norm.dtype == np.float32 and np.array_equal(norm, layer.input_layernorm.weight.detach().numpy())


def test_metadata_and_tokenizer_equal_the_shipped_file_written_by_llama_cpp(f16_gguf):
    from gguf import GGUFReader

    ours, shipped = GGUFReader(str(f16_gguf)), GGUFReader(str(embedded_gguf_path()))
    keys = ["llama.block_count", "llama.embedding_length", "llama.feed_forward_length", "llama.attention.head_count",
            "llama.attention.head_count_kv", "llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon",
            "llama.rope.dimension_count", "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
            "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id",
            "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token"]
    for key in keys:
        assert ours.fields[key].contents() == shipped.fields[key].contents(), key


def test_inspector_counts_types_and_bits(f16_gguf):
    info = read_gguf(f16_gguf)
    summary = {row["type"]: row for row in tensor_type_summary(info)}
    assert summary["F16"]["bits/weight"] == 16.0 and summary["F32"]["bits/weight"] == 32.0
    shipped = {row["type"]: row for row in tensor_type_summary(read_gguf(embedded_gguf_path()))}
    # Q4_1: a 16-bit scale and a 16-bit min per 32 weights; Q8_0: a 16-bit scale per 32
    assert shipped["Q4_1"]["bits/weight"] == 5.0 and shipped["Q8_0"]["bits/weight"] == 8.5


def test_reader_agrees_with_the_gguf_package(f16_gguf):
    from gguf import GGUFReader

    for path in [f16_gguf, embedded_gguf_path()]:
        info, reader = read_gguf(path), GGUFReader(str(path))
        assert [(t["name"], t["type"], t["shape"], t["bytes"], t["offset"]) for t in info["tensors"]] == [
            (t.name, t.tensor_type.name, [int(d) for d in t.shape], int(t.n_bytes), int(t.data_offset))
            for t in reader.tensors]
        fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
        shown = {k: f"[{len(v)} items]" if isinstance(v, list) and len(v) > 8 else v for k, v in fields.items()}
        assert info["metadata"] == shown


@pytest.mark.skipif(not (Path(sys.prefix) / "llama-cpp-convert").is_dir(),
                    reason="llama.cpp's converter is not installed")
def test_llama_cpp_converter_writes_the_same_tensors_and_tokenizer(f16_gguf, tmp_path):
    theirs = convert_with_llama_cpp(model_folder(EMBEDDED), tmp_path / "llama-cpp-f16.gguf")
    same = compare_gguf(f16_gguf, theirs)
    assert same["tensors identical"] == same["tensors"] == same["tensors theirs"]
    assert {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "llama.rope.freq_base",
            "llama.attention.head_count_kv", "general.file_type"} <= set(same["metadata equal"])
    assert same["metadata differing"] == ["general.name"]


def test_damaged_files_give_clear_errors(f16_gguf, tmp_path):
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(f16_gguf.read_bytes()[: f16_gguf.stat().st_size // 2])
    with pytest.raises(LabsError, match="truncated|damaged"):
        read_gguf(truncated)
    foreign = tmp_path / "foreign.gguf"
    foreign.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(LabsError, match="not a GGUF file"):
        read_gguf(foreign)
    with pytest.raises(LabsError, match="does not exist"):
        read_gguf(tmp_path / "missing.gguf")


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_llama_cpp_perplexity_of_the_f16_file_agrees_with_transformers(f16_gguf, model, tokenizer, corpus):
    from labs_lib.data import evaluation_tokens
    from labs_lib.evaluate import perplexity
    from labs_lib.llamacpp import gguf_perplexity, load_gguf

    tokens = evaluation_tokens(tokenizer, corpus, 2048)
    llm = load_gguf(f16_gguf)
    ours = gguf_perplexity(llm, tokens, window=1024)
    llm.close()
    assert abs(ours / perplexity(model, tokens, window=1024) - 1) < 0.005
