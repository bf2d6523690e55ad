"""Write a Hugging Face Llama-family model to an F16/F32 GGUF file, and read what any GGUF file holds.

The writer is the short teaching version of llama.cpp's `convert_hf_to_gguf.py`: architecture metadata,
the BPE tokenizer, llama.cpp's tensor names, and the Q/K row permutation llama.cpp's rotary code expects.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from .errors import LabsError

__all__ = ["TENSOR_NAMES", "permute_for_rope", "write_gguf", "read_gguf", "tensor_type_summary"]

TENSOR_NAMES = {  # Hugging Face suffix -> llama.cpp name (per decoder block "blk.N.")
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 3, 4  # llama.cpp's token types


def permute_for_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder Q or K rows from Hugging Face's rotate-half layout to llama.cpp's interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(hf_name: str) -> str | None:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    parts = hf_name.split(".")
    if parts[:2] == ["model", "layers"] and ".".join(parts[3:]) in TENSOR_NAMES:
        return f"blk.{parts[2]}.{TENSOR_NAMES['.'.join(parts[3:])]}"
    return None


def _tokenizer_fields(writer, tokenizer, pre: str) -> None:
    vocab = tokenizer.backend_tokenizer.to_str()
    model = json.loads(vocab)["model"]
    if model["type"] != "BPE":
        raise LabsError(f"This writer handles BPE tokenizers only (this one is {model['type']}): "
                        "use llama.cpp's convert_hf_to_gguf.py for it.")
    size = len(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
    added = tokenizer.added_tokens_decoder  # id -> AddedToken; special ones are control tokens for llama.cpp
    types = [(TOKEN_CONTROL if added[i].special else TOKEN_USER_DEFINED) if i in added else TOKEN_NORMAL
             for i in range(size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, token_id in [("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                          ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)]:
        if token_id is not None:
            getattr(writer, f"add_{key}_token_id")(token_id)
    writer.add_add_bos_token(False)
    writer.add_add_space_prefix(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def write_gguf(model, tokenizer, path: Path, dtype: str = "F16", pre: str = "smollm") -> Path:
    """Write `model` (a LlamaForCausalLM) to `path` as a GGUF file with 2-D weights in F16 or F32.

    Norm weights stay F32 (llama.cpp requires it). A tied output head is not written (llama.cpp reuses
    token_embd). `pre` names llama.cpp's pre-tokenizer rules; "smollm" is SmolLM2's.
    """
    import gguf

    if dtype not in ("F16", "F32"):
        raise LabsError(f"dtype must be F16 or F32 (got {dtype}); quantize afterwards with llama.cpp.")
    cfg = model.config
    if cfg.model_type != "llama":
        raise LabsError(f"This writer handles the Llama architecture (got {cfg.model_type}): "
                        "use llama.cpp's convert_hf_to_gguf.py for other architectures.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    writer = gguf.GGUFWriter(str(tmp), arch="llama")
    writer.add_name(getattr(cfg, "_name_or_path", "") or "model")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(float(cfg.rope_theta if hasattr(cfg, "rope_theta") else cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "F16" else gguf.LlamaFileType.ALL_F32)
    _tokenizer_fields(writer, tokenizer, pre)
    tied = cfg.tie_word_embeddings
    for name, tensor in model.state_dict().items():
        target = _gguf_name(name)
        if target is None or (tied and target == "output.weight"):
            continue
        t = tensor.detach().float().cpu()
        if target.endswith("attn_q.weight"):
            t = permute_for_rope(t, n_head)
        elif target.endswith("attn_k.weight"):
            t = permute_for_rope(t, n_kv)
        array = t.numpy().astype(np.float16 if (dtype == "F16" and t.ndim == 2) else np.float32)
        writer.add_tensor(target, array)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
    finally:
        writer.close()
    os.replace(tmp, path)
    return path


def read_gguf(path: Path) -> dict:
    """Metadata (long arrays shown by their length) and one row per tensor: name, type, shape, bytes, bits/weight.

    A missing, truncated or foreign file raises LabsError with what to do.
    """
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise LabsError(f"{path} does not exist: convert a model first (labs_lib.gguf_io.write_gguf).")
    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise LabsError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF').")
    try:
        reader = GGUFReader(str(path))
        tensors = [{"name": t.name, "type": t.tensor_type.name, "shape": [int(d) for d in t.shape],
                    "bytes": int(t.n_bytes), "bits/weight": round(8 * int(t.n_bytes) / int(t.n_elements), 3)}
                   for t in reader.tensors]
        end = max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
    except Exception as exc:
        raise LabsError(f"{path} is damaged or truncated ({type(exc).__name__}: {exc}); convert or download it again.") from None
    if end > path.stat().st_size:
        raise LabsError(f"{path} is truncated: its tensors need {end:,} bytes, the file has {path.stat().st_size:,}; "
                        "convert or download it again.")
    metadata = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        metadata[key] = f"[{len(value)} items]" if isinstance(value, list) and len(value) > 8 else value
    return {"metadata": metadata, "tensors": tensors, "file_bytes": path.stat().st_size}


def tensor_type_summary(info: dict) -> list[dict]:
    """How many tensors, weights and bytes each tensor type holds: the mix a K-quant name stands for."""
    counts, weights, sizes = Counter(), Counter(), Counter()
    for t in info["tensors"]:
        counts[t["type"]] += 1
        weights[t["type"]] += int(np.prod(t["shape"]))
        sizes[t["type"]] += t["bytes"]
    return [{"type": k, "tensors": counts[k], "weights": weights[k], "MB": round(sizes[k] / 1e6, 2),
             "bits/weight": round(8 * sizes[k] / weights[k], 3)} for k in sorted(counts, key=lambda k: -sizes[k])]
