"""The GGUF file format: write a Hugging Face Llama-family model to an F16/F32 GGUF file, read and compare what
any GGUF file holds. (Where the labs keep GGUF files, and llama.cpp's own converter: labs_lib.llamacpp.)

The writer is the short teaching version of llama.cpp's `convert_hf_to_gguf.py`: architecture metadata,
the BPE tokenizer, llama.cpp's tensor names, and the Q/K row permutation llama.cpp's rotary code expects.
"""

from __future__ import annotations

import json
import mmap
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from .errors import LabsError
from .files import atomic_path

__all__ = ["TENSOR_NAMES", "permute_for_rope", "write_gguf", "read_gguf", "compare_gguf", "tensor_type_summary",
           "linear_bits_per_weight"]

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
    file_type = gguf.LlamaFileType.MOSTLY_F16 if dtype == "F16" else gguf.LlamaFileType.ALL_F32
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch="llama")
        try:
            _model_fields(writer, cfg, file_type)
            _tokenizer_fields(writer, tokenizer, pre)
            _add_tensors(writer, model, dtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file(progress=False)
        finally:
            writer.close()
    return Path(path)


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _model_fields(writer, cfg, file_type) -> None:
    writer.add_name(getattr(cfg, "_name_or_path", "") or "model")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    theta = cfg.rope_theta if hasattr(cfg, "rope_theta") else cfg.rope_parameters["rope_theta"]
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_rope_dimension_count(_head_dim(cfg))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(file_type)


def _add_tensors(writer, model, dtype: str) -> None:
    """Every weight under llama.cpp's name, Q and K rows permuted for its rotary layout; a tied head skipped."""
    cfg = model.config
    for name, tensor in model.state_dict().items():
        target = _gguf_name(name)
        if target is None or (cfg.tie_word_embeddings and target == "output.weight"):
            continue
        t = tensor.detach().float().cpu()
        if target.endswith("attn_q.weight"):
            t = permute_for_rope(t, cfg.num_attention_heads)
        elif target.endswith("attn_k.weight"):
            t = permute_for_rope(t, cfg.num_key_value_heads)
        writer.add_tensor(target, t.numpy().astype(np.float16 if (dtype == "F16" and t.ndim == 2) else np.float32))


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9  # GGUF value type codes (gguf.GGUFValueType)


class _Cursor:
    """Reads GGUF's little-endian values one after another from a memory map."""

    def __init__(self, buffer):
        self.buffer, self.pos = buffer, 0

    def scalar(self, code: int):
        fmt = _SCALARS[code]
        (value,) = struct.unpack_from(fmt, self.buffer, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar(10)
        if self.pos + n > len(self.buffer):
            raise EOFError("string runs past the end of the file")
        text = self.buffer[self.pos : self.pos + n].decode("utf-8", errors="replace")
        self.pos += n
        return text

    def value(self, code: int):
        if code == _STRING:
            return self.string()
        if code == _ARRAY:
            item, n = self.scalar(4), self.scalar(10)
            if item in _SCALARS and item != 7:  # fixed-size items: one numpy view instead of n reads
                dtype = np.dtype(_SCALARS[item])
                values = np.frombuffer(self.buffer, dtype, n, self.pos).tolist()
                self.pos += n * dtype.itemsize
                return values
            return [self.value(item) for _ in range(n)]
        return self.scalar(code)


def _parse(path: Path) -> tuple[dict, list[dict], int]:
    """(full metadata, tensor rows with absolute data offsets, file size) of a GGUF file, in one pass.

    GGUF is: magic "GGUF", version, tensor and key counts, the key-value metadata, one (name, dims, type,
    offset) record per tensor, then the tensor data from the next multiple of `general.alignment`.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    if not path.is_file():
        raise LabsError(f"{path} does not exist: convert a model first (labs_lib.gguf_io.write_gguf).")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise LabsError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF').")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
            cur = _Cursor(buffer)
            cur.pos = 4
            try:
                version, n_tensors, n_keys = cur.scalar(4), cur.scalar(10), cur.scalar(10)
                if version not in (2, 3):
                    raise ValueError(f"GGUF version {version}; this reader knows versions 2 and 3")
                metadata = {}
                for _ in range(n_keys):
                    key = cur.string()
                    metadata[key] = cur.value(cur.scalar(4))
                records = []
                for _ in range(n_tensors):
                    name = cur.string()
                    shape = [cur.scalar(10) for _ in range(cur.scalar(4))]
                    records.append((name, shape, GGMLQuantizationType(cur.scalar(4)), cur.scalar(10)))
            except (struct.error, EOFError, ValueError, IndexError) as exc:
                raise LabsError(f"{path} is damaged or truncated ({exc}); convert or download it again.") from None
            alignment = metadata.get("general.alignment", 32)
            data_start = -(-cur.pos // alignment) * alignment
    tensors, end = [], data_start
    for name, shape, qtype, offset in records:
        block, block_bytes = GGML_QUANT_SIZES[qtype]
        n = int(np.prod(shape))
        nbytes = n // block * block_bytes
        tensors.append({"name": name, "type": qtype.name, "shape": shape, "bytes": nbytes,
                        "bits/weight": round(8 * nbytes / n, 3), "offset": data_start + offset})
        end = max(end, data_start + offset + nbytes)
    if end > size:
        raise LabsError(f"{path} is truncated: its tensors need {end:,} bytes, the file has {size:,}; "
                        "convert or download it again.")
    return metadata, tensors, size


def read_gguf(path: Path) -> dict:
    """Metadata (long arrays shown by their length), one row per tensor (name, type, shape, bytes, bits/weight,
    offset), the file's size and its tensors' bits per weight. Parsed in one pass (the gguf package's GGUFReader
    takes seconds on a 49k-token vocabulary); a missing, truncated or foreign file raises LabsError with what to do."""
    metadata, tensors, size = _parse(path)
    shown = {k: (f"[{len(v)} items]" if isinstance(v, list) and len(v) > 8 else v) for k, v in metadata.items()}
    weights = sum(int(np.prod(t["shape"])) for t in tensors)
    return {"metadata": shown, "tensors": tensors, "file_bytes": size,
            "bits/weight": round(8 * sum(t["bytes"] for t in tensors) / weights, 3)}


def compare_gguf(ours: Path, theirs: Path) -> dict:
    """Which tensors (bytes) and metadata values two GGUF files share: checks a converter against another."""
    meta_a, tensors_a, _ = _parse(ours)
    meta_b, tensors_b, _ = _parse(theirs)
    rows_b = {t["name"]: t for t in tensors_b}
    with open(ours, "rb") as fa, open(theirs, "rb") as fb, \
            mmap.mmap(fa.fileno(), 0, access=mmap.ACCESS_READ) as a, \
            mmap.mmap(fb.fileno(), 0, access=mmap.ACCESS_READ) as b:

        def same(t: dict) -> bool:
            other = rows_b.get(t["name"])
            return (other is not None and (t["type"], t["shape"]) == (other["type"], other["shape"])
                    and a[t["offset"] : t["offset"] + t["bytes"]] == b[other["offset"] : other["offset"] + t["bytes"]])

        identical = [t["name"] for t in tensors_a if same(t)]
    shared = [k for k in meta_a if k in meta_b]
    return {"tensors identical": len(identical), "tensors": len(tensors_a), "tensors theirs": len(tensors_b),
            "tensors differing": sorted({t["name"] for t in tensors_a} - set(identical)),
            "tensors only theirs": sorted(set(rows_b) - {t["name"] for t in tensors_a}),
            "metadata equal": [k for k in shared if meta_a[k] == meta_b[k]],
            "metadata differing": [k for k in shared if meta_a[k] != meta_b[k]],
            "metadata only ours": [k for k in meta_a if k not in meta_b],
            "metadata only theirs": [k for k in meta_b if k not in meta_a]}


def tensor_type_summary(info: dict) -> list[dict]:
    """How many tensors, weights and bytes each tensor type holds: the mix a K-quant name stands for."""
    counts, weights, sizes = Counter(), Counter(), Counter()
    for t in info["tensors"]:
        counts[t["type"]] += 1
        weights[t["type"]] += int(np.prod(t["shape"]))
        sizes[t["type"]] += t["bytes"]
    return [{"type": k, "tensors": counts[k], "weights": weights[k], "MB": round(sizes[k] / 1e6, 2),
             "bits/weight": round(8 * sizes[k] / weights[k], 3)} for k in sorted(counts, key=lambda k: -sizes[k])]


def linear_bits_per_weight(info: dict) -> float:
    """Bits per weight of the decoder blocks' Linear weights alone (q, k, v, o, gate, up, down; their scales
    included): what Lab 07 counts for every variant. read_gguf's "bits/weight" counts every tensor, the token
    embedding and the norms too."""
    linear = {name for hf, name in TENSOR_NAMES.items() if hf.endswith("_proj.weight")}
    rows = [t for t in info["tensors"] if t["name"].split(".", 2)[-1] in linear and t["name"].startswith("blk.")]
    if not rows:
        raise LabsError("this GGUF has no decoder Linear weights named as llama.cpp names them (blk.N.attn_q.weight)")
    return round(8 * sum(t["bytes"] for t in rows) / sum(int(np.prod(t["shape"])) for t in rows), 3)
