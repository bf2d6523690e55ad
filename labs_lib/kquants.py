"""llama.cpp's K-quants from the bytes: the super-block layouts of Q4_K and Q6_K, a decoder for one block of each
(checked bit for bit against the gguf package's dequantize), bits per weight from a layout, and which tensors of a
GGUF file could not use a K-quant block.

A K-quant super-block holds 256 weights: 8 sub-blocks of 32 (Q4_K) or 16 of 16 (Q6_K), each with a small integer
scale (and, in Q4_K, a minimum), themselves scaled by one FP16 number per super-block (d, and dmin for the minima).
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from .errors import LabsError

__all__ = ["QK_K", "LAYOUTS", "WEIGHTS_PER_BLOCK", "layout_bits_per_weight", "decode_q4_k", "decode_q6_k",
           "tensor_block", "types_by_role"]

QK_K = 256  # weights per super-block
# field -> bytes, in file order (ggml-common.h: block_q4_K, block_q6_K; Q8_0 and Q4_0 for comparison)
LAYOUTS = {
    "Q4_K": {"d (FP16)": 2, "dmin (FP16)": 2, "scales and mins (8 + 8 x 6 bits)": 12, "codes (256 x 4 bits)": 128},
    "Q6_K": {"low 4 bits (256 x 4)": 128, "high 2 bits (256 x 2)": 64, "scales (16 x int8)": 16, "d (FP16)": 2},
    "Q8_0": {"d (FP16)": 2, "codes (32 x int8)": 32},
    "Q4_0": {"d (FP16)": 2, "codes (32 x 4 bits)": 16},
}
WEIGHTS_PER_BLOCK = {"Q4_K": QK_K, "Q6_K": QK_K, "Q8_0": 32, "Q4_0": 32}


def layout_bits_per_weight(qtype: str) -> float:
    """Bits per weight of a block type, from its layout: 8 x bytes per block / weights per block."""
    return 8 * sum(LAYOUTS[qtype].values()) / WEIGHTS_PER_BLOCK[qtype]


def _check(block: bytes, qtype: str) -> np.ndarray:
    size = sum(LAYOUTS[qtype].values())
    if len(block) != size:
        raise LabsError(f"a {qtype} block is {size} bytes, got {len(block)}.")
    return np.frombuffer(block, dtype=np.uint8)


def decode_q4_k(block: bytes) -> dict:
    """One Q4_K super-block (144 bytes): d, dmin, the 8 six-bit sub-block scales and minima, the 256 four-bit codes,
    and the weights, value = (d * scale) * code - (dmin * min) in float32, as llama.cpp's dequantize_row_q4_K."""
    raw = _check(block, "Q4_K")
    d, dmin = raw[0:4].view(np.float16).astype(np.float32)
    q = raw[4:16].astype(np.uint8)
    # 12 bytes hold 8 scales and 8 minima of 6 bits: sub-blocks 0-3 in the low 6 bits of bytes 0-3 (scales) and 4-7
    # (minima); sub-blocks 4-7 take their low 4 bits from bytes 8-11 and their top 2 bits from the spare top bits
    # of bytes 0-3 (scales) and 4-7 (minima)
    scales = np.concatenate([q[0:4] & 63, (q[8:12] & 0xF) | ((q[0:4] >> 6) << 4)])
    mins = np.concatenate([q[4:8] & 63, (q[8:12] >> 4) | ((q[4:8] >> 6) << 4)])
    qs = raw[16:144].reshape(4, 32)
    # each 32 bytes hold two sub-blocks: the low nibbles are sub-block 2c, the high nibbles sub-block 2c + 1
    codes = np.stack([qs & 0xF, qs >> 4], axis=1).reshape(8, 32)
    step, offset = d * scales.astype(np.float32), dmin * mins.astype(np.float32)
    values = step[:, None] * codes.astype(np.float32) - offset[:, None]
    return {"d": float(d), "dmin": float(dmin), "scales": scales.astype(int), "mins": mins.astype(int),
            "codes": codes.reshape(-1).astype(int), "values": values.reshape(-1).astype(np.float32)}


def decode_q6_k(block: bytes) -> dict:
    """One Q6_K super-block (210 bytes): d, 16 int8 sub-block scales, 256 six-bit codes (stored as 4 low + 2 high
    bits, minus 32), and the weights, value = (d * scale) * code in float32, as llama.cpp's dequantize_row_q6_K."""
    raw = _check(block, "Q6_K")
    ql, qh = raw[0:128].reshape(2, 64), raw[128:192].reshape(2, 32)
    scales = raw[192:208].view(np.int8).astype(np.float32)
    d = raw[208:210].view(np.float16).astype(np.float32)[0]
    # per half of 128 weights: positions l, l+32, l+64, l+96 take the low/high nibble of ql[l], ql[l+32] and the
    # 2-bit pairs 0-1, 2-3, 4-5, 6-7 of qh[l]
    low = np.concatenate([ql[:, :32] & 0xF, ql[:, 32:] & 0xF, ql[:, :32] >> 4, ql[:, 32:] >> 4], axis=1)
    high = np.concatenate([(qh >> shift) & 3 for shift in (0, 2, 4, 6)], axis=1)
    codes = (low.astype(np.int16) | (high.astype(np.int16) << 4)) - 32
    values = ((d * scales)[:, None] * codes.reshape(16, 16).astype(np.float32)).reshape(-1)
    return {"d": float(d), "scales": scales.astype(int), "codes": codes.reshape(-1).astype(int),
            "values": values.astype(np.float32)}


def tensor_block(path: Path, name: str, index: int = 0) -> tuple[str, bytes]:
    """The type and the raw bytes of block `index` of tensor `name` in a GGUF file."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    from .gguf_io import read_gguf

    tensor = next((t for t in read_gguf(path)["tensors"] if t["name"] == name), None)
    if tensor is None:
        raise LabsError(f"{path} has no tensor {name}.")
    _, size = GGML_QUANT_SIZES[GGMLQuantizationType[tensor["type"]]]
    with open(path, "rb") as fh:
        fh.seek(tensor["offset"] + index * size)
        return tensor["type"], fh.read(size)


def types_by_role(files: dict[str, Path]) -> list[dict]:
    """One row per tensor role (`attn_q`, `ffn_down`, ...): its row width, whether that is a multiple of 256, and the
    type(s) each file stores it in, read from the files."""
    from .gguf_io import read_gguf

    table: dict[tuple[str, int], dict] = {}
    for label, path in files.items():
        for t in read_gguf(path)["tensors"]:
            role = re.sub(r"^blk\.\d+\.", "", t["name"]).removesuffix(".weight")
            row = table.setdefault((role, t["shape"][0]), defaultdict(set))
            row[label].add(t["type"])
    return [{"tensor": role, "row width": width, "multiple of 256": width % QK_K == 0,
             **{label: "/".join(sorted(types[label])) for label in files}}
            for (role, width), types in sorted(table.items(), key=lambda kv: (kv[0][1] % QK_K != 0, kv[0][0]))
            if not role.endswith("_norm")]
