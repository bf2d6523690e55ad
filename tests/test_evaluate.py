"""Perplexity, storage accounting and fake quantization on the embedded model."""

import math

import pytest
import torch

from labs_lib.blockquant import NVFP4, IntGroup, PerTensor
from labs_lib.data import evaluation_tokens
from labs_lib.evaluate import measure_method, paired_change, perplexity, quantization_error, storage_report
from labs_lib.fake_quant import calibrate_input_amax, fake_quantized_copy
from labs_lib.layerwise import linear_layers
from labs_lib.report import markdown_table
from labs_lib.rtn import RTN


@pytest.fixture(scope="module")
def eval_ids(tokenizer, corpus):
    return evaluation_tokens(tokenizer, corpus, 2048)


@pytest.fixture(scope="module")
def fp32_ppl(model, eval_ids):
    return perplexity(model, eval_ids, window=512)


def test_perplexity_matches_a_direct_computation(model, eval_ids, fp32_ppl):
    windows = eval_ids[:2048].reshape(4, 512)
    with torch.inference_mode():
        losses = [model(w[None], labels=w[None]).loss.item() for w in windows]  # mean over 511 tokens each
    assert fp32_ppl == pytest.approx(math.exp(sum(losses) / 4), rel=1e-4)
    assert 5 < fp32_ppl < 40  # a working 135M model on English technical text


def test_quantization_orders_perplexity(model, eval_ids, fp32_ppl):
    bf16 = perplexity(fake_quantized_copy(model, PerTensor("bf16", scaled=False)), eval_ids, window=512)
    nvfp4 = perplexity(fake_quantized_copy(model, NVFP4()), eval_ids, window=512)
    fp4_tensor = perplexity(fake_quantized_copy(model, PerTensor("fp4_e2m1")), eval_ids, window=512)
    assert abs(bf16 / fp32_ppl - 1) < 0.01
    assert fp32_ppl < nvfp4 < fp4_tensor


def test_fake_quantized_copy_leaves_original_and_head_alone(model, facts):
    before = model.model.layers[0].mlp.down_proj.weight.clone()
    q = fake_quantized_copy(model, NVFP4())
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, before)
    assert not torch.equal(q.model.layers[0].mlp.down_proj.weight, before)
    assert torch.equal(q.lm_head.weight, model.lm_head.weight)  # lm_head (tied to the embedding) is skipped
    assert len(linear_layers(model)) == facts.linears


def test_activation_quantization_changes_outputs(model, tokenizer, corpus, facts):
    from labs_lib.data import calibration_batches

    calib = calibration_batches(tokenizer, corpus, 2, 64)
    amax = calibrate_input_amax(model, calib)
    assert len(amax) == facts.linears and all(a > 0 for a in amax.values())
    w4 = fake_quantized_copy(model, NVFP4())
    w4a4 = fake_quantized_copy(model, NVFP4(), NVFP4(), amax)
    with torch.inference_mode():
        assert not torch.equal(w4(calib[:1]).logits, w4a4(calib[:1]).logits)


def test_storage_report_counts_tied_weights_once(model, facts):
    bf16 = storage_report(model)
    assert bf16["total_bytes"] == facts.parameters * 2 and bf16["bits/weight"] == 16
    nvfp4 = storage_report(model, NVFP4())
    linear_weights = sum(layer.weight.numel() for layer in linear_layers(model).values())
    assert nvfp4["quantized_bytes"] == pytest.approx(linear_weights * 4.5 / 8 + facts.linears * 4)  # + FP32 scale each
    assert nvfp4["bits/weight"] == pytest.approx(4.5 + facts.linears * 32 / linear_weights)
    assert storage_report(model, IntGroup(4, 64))["total_bytes"] < nvfp4["total_bytes"]


def test_measure_method_row_counts_bits_of_the_quantized_linears_only(model, eval_ids):
    row = measure_method(model, RTN(IntGroup(4, 64, symmetric=False)), None, eval_ids[:1024], window=512)
    assert row["variant"] == "RTN INT4-g64-asym"
    assert row["bits/weight"] == pytest.approx(4 + (16 + 4) / 64, abs=1e-3)  # FP16 scale and 4-bit zero per 64
    assert row["size MB"] == round(storage_report(model, IntGroup(4, 64, symmetric=False))["total_bytes"] / 1e6, 1)


def test_quantization_error_and_table():
    x = torch.ones(100)
    assert quantization_error(x, x * 1.1)["snr_db"] == pytest.approx(20.0)
    assert markdown_table([{"a": 1, "b": 0.123456}]).splitlines() == ["| a | b |", "|---|---|", "| 1 | 0.1235 |"]


def test_paired_change_is_the_perplexity_ratio_with_a_block_standard_error():
    reference = torch.rand(1024, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 4
    shift = torch.tensor([0.0, 0.02]).repeat(512).double()  # alternating, so every block of 128 has mean 0.01
    change, two_se = paired_change(reference + shift, reference, block=128)
    assert change == pytest.approx(100 * (math.exp((reference + shift).mean()) / math.exp(reference.mean()) - 1))
    assert two_se == pytest.approx(0, abs=1e-9)  # 8 blocks, all with the same mean difference
    blocks = torch.tensor([0.0, 0.02]).repeat_interleave(128).repeat(4).double()  # block means 0, 0.02, 0, ...
    _, two_se = paired_change(reference[:1024] + blocks, reference[:1024], block=128)
    block_se = torch.tensor([0.0, 0.02] * 4).std().item() / math.sqrt(8)
    assert two_se == pytest.approx(100 * math.exp(0.01) * 2 * block_se)  # in % of perplexity, like the change
    with pytest.raises(ValueError, match="error bar"):
        paired_change(reference[:200], reference[:200], block=128)
