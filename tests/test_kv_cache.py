"""KV cache: bytes per token from the config; the emulated quantized cache against attention computed by hand from
the format casts."""

import math

import pytest
import torch

from labs_lib.errors import LabsError
from labs_lib.formats import cast
from labs_lib.kv_cache import KV_FORMATS, KVQuant, calibrate_kv_amax, kv_bytes_per_token, kv_cache_rows, \
    quantized_kv_cache
from labs_lib.sizing import SHAPES


def test_llama_8b_kv_bytes_per_token_from_its_config():
    # 32 layers x 8 KV heads x 128 head_dim, K and V: 65,536 values per token (meta-llama/Llama-3.1-8B config.json)
    shape = SHAPES["Llama-3.1-8B"]
    assert kv_bytes_per_token(shape, "bf16") == 65_536 * 2
    assert kv_bytes_per_token(shape, "fp8") == 65_536
    assert kv_bytes_per_token(shape, "nvfp4") == 65_536 * 4.5 / 8  # E2M1 + one E4M3 scale per 16
    with pytest.raises(LabsError, match="Unknown KV-cache format"):
        kv_bytes_per_token(shape, "int3")


def test_kv_rows_count_sequences_next_to_the_weights():
    rows = kv_cache_rows({"Llama-3.1-70B": SHAPES["Llama-3.1-70B"]}, (8192, 131072), 128)
    bf16, fp8 = rows[0], rows[1]
    assert bf16["GB at 128K"] == pytest.approx(2 * 80 * 8 * 128 * 2 * 131072 / 1e9)
    assert fp8["GB at 128K"] == pytest.approx(bf16["GB at 128K"] / 2)
    free = 128 - bf16["nvfp4 weights GB"]
    assert bf16["128K sequences in 128 GB"] == math.floor(free / bf16["GB at 128K"])


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def _reference_attention(attn, hidden, position_embeddings, fmt: str, amax: tuple[torch.Tensor, torch.Tensor]):
    """Attention of one layer written out: K after RoPE and V rounded by explicit format casts, causal softmax."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    b, t, _ = hidden.shape
    d, groups = attn.head_dim, attn.num_key_value_groups
    q = attn.q_proj(hidden).view(b, t, -1, d).transpose(1, 2)
    k = attn.k_proj(hidden).view(b, t, -1, d).transpose(1, 2)
    v = attn.v_proj(hidden).view(b, t, -1, d).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
    assert torch.equal(k.abs().amax(), amax[0]) and torch.equal(v.abs().amax(), amax[1])  # calibrated on this input

    def round_trip(x, a):
        if fmt == "fp8":
            s = a / 448
            return cast(x / s, "fp8_e4m3") * s
        g = a / (6 * 448)  # NVFP4: FP32 tensor scale, E4M3 scale per 16 values of head_dim, E2M1 values
        blocks = x.reshape(*x.shape[:-1], -1, 16)
        bs = cast((blocks.abs().amax(-1, keepdim=True) / (6 * g)).clamp(2.0**-9, 448), "fp8_e4m3")
        return (cast(blocks / (bs * g), "fp4_e2m1") * bs * g).reshape(x.shape)

    k, v = round_trip(k, amax[0]), round_trip(v, amax[1])
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1)
    return attn.o_proj(out)


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
@torch.no_grad()
def test_quantized_attention_equals_reference_from_format_casts(fmt):
    model = _tiny_llama()
    ids = torch.randint(0, 128, (1, 32), generator=torch.Generator().manual_seed(1))
    amax = calibrate_kv_amax(model, ids)
    attn = model.model.layers[0].self_attn  # its input is the same in every run
    seen = {}

    def capture(module, args, kwargs, output):
        seen.update(hidden=kwargs["hidden_states"], pos=kwargs["position_embeddings"], out=output[0])

    handle = attn.register_forward_hook(capture, with_kwargs=True)
    try:
        plain = model(ids).logits
        reference_plain = seen["out"]
        with quantized_kv_cache(model, KVQuant(KV_FORMATS[fmt], amax)):
            quantized = model(ids).logits
    finally:
        handle.remove()
    expected = _reference_attention(attn, seen["hidden"], seen["pos"], fmt, amax[0])
    assert torch.allclose(seen["out"], expected, rtol=1e-5, atol=1e-6)
    assert (seen["out"] - reference_plain).abs().max() > 1e-4  # the cast changed the attention: the test can fail
    assert not torch.equal(plain, quantized)
    assert model.config._attn_implementation == "sdpa" and not hasattr(attn, "kv_quant")  # restored
    assert torch.equal(model(ids).logits, plain)


def test_uncalibrated_layer_is_a_labs_error():
    model = _tiny_llama()
    with quantized_kv_cache(model, KVQuant(KV_FORMATS["fp8"], {})), pytest.raises(LabsError, match="calibrate"):
        model(torch.zeros(1, 4, dtype=torch.long))


@torch.no_grad()
def test_lab07_kv_variant_quantizes_the_cache_with_amax_from_window_long_rows():
    from labs_lib.blockquant import NVFP4
    from labs_lib.fake_quant import fake_quantized_copy
    from labs_lib.kv_cache import ATTENTION_NAME
    from labs_lib.variants import BuildContext, QuantizedKV

    model = _tiny_llama()
    batches = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(2))
    built = QuantizedKV("kv", NVFP4(), "fp8", calib_len=32).build(BuildContext("tiny", model, None, batches))
    assert built.model.config._attn_implementation == ATTENTION_NAME
    rows = batches.reshape(2, 32)  # positions 0-31 calibrated, as a 32-token evaluation window reaches them
    amax = built.model.model.layers[0].self_attn.kv_quant.amax
    assert all(torch.equal(amax[i][j], ref[j]) for i, ref in calibrate_kv_amax(model, rows).items() for j in (0, 1))
    weights_only = fake_quantized_copy(model, NVFP4()).to(torch.bfloat16)
    ids = rows[:1]
    with quantized_kv_cache(weights_only, KVQuant(KV_FORMATS["fp8"], amax)):
        expected = weights_only(ids).logits
    assert torch.equal(built.model(ids).logits, expected)
    assert not torch.equal(weights_only(ids).logits, expected)  # the FP8 cache changes what the weights alone give
