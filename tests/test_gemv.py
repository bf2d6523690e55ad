"""labs_lib.gemv on CPU: packed weights hold exactly labs_lib's quantized values, the decode model's byte count and
prefill follow from them, the compiled-path FP8 layer computes the product, and (where Triton is installed) the
kernels themselves run in Triton's interpreter against the references."""

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from labs_lib.blockquant import NVFP4, IntGroup, PerChannel
from labs_lib.decode_speed import DecodeModel
from labs_lib.errors import LabsError
from labs_lib.gemv import dequantize, pack_weight
from labs_lib.sizing import ModelShape


@pytest.mark.parametrize("fmt, scheme", [("fp8", PerChannel("fp8_e4m3")), ("int4", IntGroup(4, 128)),
                                         ("nvfp4", NVFP4())])
def test_packed_weights_hold_labs_libs_quantized_values(fmt, scheme):
    w = torch.randn(48, 512, generator=torch.Generator().manual_seed(0)) * 0.05
    w[3, :128] = 0  # an all-zero group
    assert torch.equal(dequantize(pack_weight(w, fmt)), scheme.fake_quantize(w))


def test_asymmetric_int4_and_bad_shapes():
    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(1)) + 0.5
    assert torch.equal(dequantize(pack_weight(w, "int4", symmetric=False)), IntGroup(4, 128, False).fake_quantize(w))
    with pytest.raises(LabsError):
        pack_weight(w[:, :200], "int4")
    with pytest.raises(LabsError):
        pack_weight(w, "int3")


def test_weight_only_byte_counts():
    """What a decode step reads with packed weights: codes, scales and zero points, counted from the shape."""
    shape = ModelShape(hidden=256, layers=2, heads=4, kv_heads=2, intermediate=512, vocab=1000)
    model = DecodeModel(shape, max_len=16, device="cpu", dtype=torch.bfloat16)
    bf16 = model.weight_bytes_per_token()
    matrix_elements = (bf16 - shape.hidden * 2) // 2  # every matrix, lm_head included
    per_element = {"int4": 0.5 + 2 / 128 + 1 / 128, "nvfp4": 0.5 + 1 / 16, "fp8": 1.0}
    for fmt, bytes_per_element in per_element.items():
        model.to_gemv_weights(fmt)
        scalars = 4 * (2 * 4 + 1) if fmt == "nvfp4" else 0  # one FP32 tensor scale per matrix
        row_scales = 4 * (sum(w.shape[0] for w in model.bf16_layers[0].values()) * 2 + 1000) if fmt == "fp8" else 0
        expected = matrix_elements * bytes_per_element + scalars + row_scales + shape.hidden * 2
        assert model.weight_bytes_per_token() == expected, fmt
    model.to_bf16_weights()
    assert model.weight_bytes_per_token() == bf16


def test_prefill_layer_equals_decode_steps():
    """The prefill path (whole prompt, causal attention) gives each position what decoding it one by one gives."""
    shape = ModelShape(hidden=128, layers=1, heads=4, kv_heads=2, intermediate=256, vocab=100)
    model = DecodeModel(shape, max_len=16, device="cpu", dtype=torch.float32)
    x = torch.randn(8, 128, generator=torch.Generator().manual_seed(2))
    layer = model.layers[0]
    steps = []
    for t in range(8):
        pos = torch.tensor(t)
        q, k, v = model._attention_inputs(x[t : t + 1], layer["qkv"], pos)
        model.k_cache[0].index_copy_(2, pos.view(1), k)
        model.v_cache[0].index_copy_(2, pos.view(1), v)
        mask = (model.positions <= pos).view(1, 1, 1, -1)
        attn = F.scaled_dot_product_attention(q, model.k_cache[0], model.v_cache[0], attn_mask=mask, enable_gqa=True)
        steps.append(model._block_output(x[t : t + 1], attn, layer["o"], layer["gate_up"], layer["down"]))
    torch.testing.assert_close(model._prefill_layer(x, layer), torch.cat(steps), rtol=1e-4, atol=1e-5)
    assert model._prefill_layer(torch.randn(24, 128), layer).shape == (24, 128)  # a prompt longer than the cache
    assert model.prefill_flops(8) == 2 * sum(w.numel() for w in layer.values()) * 8 + 4 * 4 * 32 * 8 * 9 / 2


def test_tensorwise_fp8_linear_computes_the_product():
    """FP8 operands (E4M3 forward, E5M2 gradients) with per-tensor scales: within FP8 rounding of the exact values."""
    from labs_lib.fp8 import TensorwiseFP8Linear

    g = torch.Generator().manual_seed(3)
    linear = torch.nn.Linear(256, 128, bias=False).bfloat16()
    layer = TensorwiseFP8Linear.from_linear(linear)
    x = torch.randn(64, 256, generator=g).bfloat16().requires_grad_(True)
    grad = torch.randn(64, 128, generator=g).bfloat16()
    try:
        layer(x).backward(grad)
    except RuntimeError as error:  # a torch build without CPU _scaled_mm
        pytest.skip(f"torch._scaled_mm on CPU: {error}")
    fp8_grads = x.grad.clone(), linear.weight.grad.clone()
    x_ref = x.detach().float().requires_grad_(True)
    w_ref = linear.weight.detach().float().requires_grad_(True)
    y_ref = x_ref @ w_ref.t()
    y_ref.backward(grad.float())

    def rel(a, b):
        return ((a.float() - b).norm() / b.norm()).item()

    assert 1e-3 < rel(layer(x.detach()), y_ref) < 0.06
    assert 1e-3 < rel(fp8_grads[0], x_ref.grad) < 0.1 and 1e-3 < rel(fp8_grads[1], w_ref.grad) < 0.1


INTERPRETER_CHECK = """
import torch
from labs_lib.blockquant import NVFP4
from labs_lib.gemv import dequantize, gemv, nvfp4_quantize_pack, pack_weight

g = torch.Generator().manual_seed(0)
for fmt, k in [("bf16", 576), ("fp8", 512), ("int4", 512), ("nvfp4", 576), ("nvfp4", 1024)]:
    for symmetric in ((True, False) if fmt == "int4" else (True,)):
        pw = pack_weight(torch.randn(37, k, generator=g) * 0.05, fmt, symmetric=symmetric)
        x = torch.randn(1, k, generator=g) * 3
        ref = x.double() @ dequantize(pw).double().t()
        for config in (None, {"BLOCK_N": 8, "BLOCK_K": 64 if k == 576 else 256}):
            y = gemv(x, pw, config).double()
            assert ((y - ref).norm() / ref.norm()).item() < 2e-6, (fmt, k, symmetric, config)
w = torch.randn(40, 512, generator=g) * torch.exp2(torch.randint(-12, 4, (40, 1), generator=g).float())
w[0, :16] = 2688.0  # the tensor amax: global scale exactly 1, so the next rows hit E2M1's rounding ties exactly
w[1, :16] = torch.tensor([6, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5, -0.0])
w[2, :16] = 0
w[2, 16:32] = 1e-9
w = w.bfloat16()
ours, ref = nvfp4_quantize_pack(w, block_rows=16, block_cols=128), NVFP4().quantize(w)
assert torch.equal(ours["weight"], ref["weight"])
assert torch.equal(ours["weight_scale"].view(torch.uint8), ref["weight_scale"].view(torch.uint8))
assert torch.equal(ours["weight_scale_2"], ref["weight_scale_2"])
print("interpreter ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_kernels_in_the_triton_interpreter():
    """Each GEMV equals the float64 product of its dequantized weight (relative error < 2e-6, float32 input), and
    the Triton NVFP4 pack equals NVFP4().quantize byte for byte, ties and an all-zero block included."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(
        [str(root)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(INTERPRETER_CHECK)], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and "interpreter ok" in result.stdout, result.stderr[-3000:]
