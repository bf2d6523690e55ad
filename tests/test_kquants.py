"""K-quant super-blocks decoded by hand (labs_lib.kquants) equal the gguf package's dequantize bit for bit, on random
blocks that reach every bit of the 6-bit scale packing; bits per weight follow from the block layouts."""

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from labs_lib.errors import LabsError
from labs_lib.kquants import LAYOUTS, decode_q4_k, decode_q6_k, layout_bits_per_weight


def random_blocks(qtype: str, n: int, seed: int = 0) -> np.ndarray:
    """`n` blocks of random bytes whose FP16 scales are finite (every other bit pattern is a valid block)."""
    rng = np.random.default_rng(seed)
    size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]][1]
    blocks = rng.integers(0, 256, (n, size), dtype=np.uint8)
    scales = rng.normal(size=(n, 2)).astype(np.float16).view(np.uint8)
    if qtype == "Q4_K":
        blocks[:, 0:4] = scales  # d, dmin
    else:
        blocks[:, 208:210] = scales[:, :2]  # d
    return blocks


@pytest.mark.parametrize("qtype, decode", [("Q4_K", decode_q4_k), ("Q6_K", decode_q6_k)])
def test_hand_decoder_equals_gguf_dequantize_bit_for_bit(qtype, decode):
    blocks = random_blocks(qtype, 300)
    want = dequantize(blocks, GGMLQuantizationType[qtype]).reshape(len(blocks), -1)
    got = np.stack([decode(b.tobytes())["values"] for b in blocks])
    assert got.shape == (300, 256) and np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_q4_k_fields_cover_their_ranges():
    decoded = [decode_q4_k(b.tobytes()) for b in random_blocks("Q4_K", 300)]
    scales = np.concatenate([d["scales"] for d in decoded])
    mins = np.concatenate([d["mins"] for d in decoded])
    codes = np.concatenate([d["codes"] for d in decoded])
    assert scales.min() == mins.min() == 0 and scales.max() == mins.max() == 63  # six bits each
    assert set(np.unique(codes)) == set(range(16))


def test_q6_k_codes_are_six_bit_signed():
    codes = np.concatenate([decode_q6_k(b.tobytes())["codes"] for b in random_blocks("Q6_K", 100)])
    assert codes.min() == -32 and codes.max() == 31


@pytest.mark.parametrize("qtype", list(LAYOUTS))
def test_bits_per_weight_from_the_layout_match_ggml(qtype):
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    assert sum(LAYOUTS[qtype].values()) == size
    assert layout_bits_per_weight(qtype) == 8 * size / block


def test_a_block_of_the_wrong_size_is_refused():
    with pytest.raises(LabsError, match="144 bytes"):
        decode_q4_k(bytes(143))
