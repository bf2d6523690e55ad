"""Lab 11: the straight-through estimator, QAT's student and teacher, single-block quantization, the budget pick."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from labs_lib.blockquant import NVFP4, PerTensor
from labs_lib.errors import LabsError
from labs_lib.fake_quant import fake_quantized_copy
from labs_lib.qat import QATLinear, distill, distillation_loss, held_out_kl, prepare_qat, remove_qat, ste_fake_quantize
from labs_lib.sensitivity import (block_linears, effective_bits, mixed_precision_copy, pick_under_budget,
                                  quantized_in_place)


@pytest.fixture()
def tiny():
    """A 3-block random Llama with widths that divide by 16 (NVFP4 blocks), weights wide enough for peaked logits."""
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True, initializer_range=0.1)
    return LlamaForCausalLM(cfg).eval()


def test_ste_forward_is_the_round_trip_and_its_gradient_the_identity_inside_the_range():
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(32, 64, generator=g) * 0.02).requires_grad_(True)
    upstream = torch.randn(32, 64, generator=g)
    q = ste_fake_quantize(w, NVFP4())
    assert torch.equal(q.detach(), NVFP4().fake_quantize(w.detach()))
    assert not torch.equal(q.detach(), w.detach())  # the rounding is real
    q.backward(upstream)
    assert torch.equal(w.grad, upstream)  # own amax: nothing clips, the gradient passes unchanged
    # a static range smaller than the tensor: the gradient is the identity inside it and zero where it clips
    x = torch.linspace(-3, 3, 16, requires_grad=True)
    ste_fake_quantize(x, NVFP4(), global_amax=torch.tensor(1.0)).backward(torch.ones(16))
    assert torch.equal(x.grad, (x.detach().abs() <= 1.0).float()) and 0 < x.grad.sum() < 16


def test_qat_student_computes_the_ptq_model_trains_only_linears_and_distillation_lowers_the_kl(tiny):
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(2))
    ptq = fake_quantized_copy(tiny, NVFP4())
    student = copy.deepcopy(tiny)
    names = prepare_qat(student, NVFP4())
    assert len(names) == 7 * 3 and all(isinstance(student.get_submodule(n), QATLinear) for n in names)
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.weight" for n in names}  # embedding, norms and lm_head are frozen
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, ptq(ids).logits, rtol=0, atol=1e-5)
    losses = distill(student, tiny, ids, steps=20, lr=3e-4, batch_size=4)
    assert losses[-1] < 0.5 * losses[0]
    remove_qat(student)
    assert not any(isinstance(m, QATLinear) for m in student.modules())
    assert not any(p.requires_grad for p in student.parameters())


def test_held_out_kl_is_the_distillation_loss_per_token_and_zero_for_the_teacher(tiny):
    tokens = torch.randint(0, 128, (70,), generator=torch.Generator().manual_seed(3))
    ptq = fake_quantized_copy(tiny, NVFP4())
    assert held_out_kl(tiny, tiny, tokens, window=16) == 0.0
    windows = tokens[:64].reshape(4, 16)  # 70 tokens: four whole windows, the last 6 tokens unused
    with torch.no_grad():
        expected = distillation_loss(ptq(windows).logits, tiny(windows).logits).item()
    assert held_out_kl(ptq, tiny, tokens, window=16, batch_size=3) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(LabsError, match="at least 16 tokens"):
        held_out_kl(ptq, tiny, tokens[:10], window=16)


def test_single_block_quantization_touches_only_that_block_and_restores_it(tiny):
    before = {n: p.detach().clone() for n, p in tiny.named_parameters()}
    blocks = block_linears(tiny)
    assert list(blocks) == ["model.layers.0", "model.layers.1", "model.layers.2"]
    inside = {f"{n}.weight" for n in blocks["model.layers.1"]}
    with quantized_in_place(tiny, blocks["model.layers.1"], NVFP4()):
        now = dict(tiny.named_parameters())
        changed = {n for n in before if not torch.equal(now[n], before[n])}
        assert changed == inside
        for n in inside:
            assert torch.equal(now[n], NVFP4().fake_quantize(before[n]))
    assert all(torch.equal(p, before[n]) for n, p in tiny.named_parameters())


def test_budget_pick_respects_the_budget_and_takes_the_most_sensitive_blocks_first(tiny):
    g = torch.Generator().manual_seed(3)
    rows = [{"block": f"b{i}", "change (%)": float(c), "weights": int(w)}
            for i, (c, w) in enumerate(zip(torch.rand(20, generator=g) * 10, torch.randint(1, 5, (20,), generator=g)
                                           * 1000))]
    low, high = NVFP4(), PerTensor("fp8_e4m3")
    for budget in (4.5, 4.8, 5.0, 6.0, 7.5, 8.0):
        keep = pick_under_budget(rows, budget, low, high)
        assert effective_bits(rows, low, high, keep) <= budget + 1e-9
        left = [r for r in rows if r["block"] not in keep]  # nothing more fits
        assert all(effective_bits(rows, low, high, keep + [r["block"]]) > budget for r in left)
    assert sorted(pick_under_budget(rows, 8.0, low, high)) == sorted(r["block"] for r in rows)  # FP8 fits all
    equal = [dict(r, weights=1000) for r in rows]
    keep = pick_under_budget(equal, 4.5 + 3.5 * 5 / 20, low, high)  # room for exactly 5 of 20 equal blocks
    assert keep == [r["block"] for r in sorted(equal, key=lambda r: -r["change (%)"])[:5]]
    with pytest.raises(LabsError, match="below NVFP4"):
        pick_under_budget(rows, 4.0, low, high)
    blocks = block_linears(tiny)
    mixed = mixed_precision_copy(tiny, blocks, low, None, keep=["model.layers.0"])
    assert torch.equal(mixed.get_submodule(blocks["model.layers.0"][0]).weight,
                       tiny.get_submodule(blocks["model.layers.0"][0]).weight)
    assert torch.equal(mixed.get_submodule(blocks["model.layers.2"][0]).weight,
                       low.fake_quantize(tiny.get_submodule(blocks["model.layers.2"][0]).weight))


def test_lab07_registry_has_the_new_variants_with_unique_names(tiny):
    from labs_lib.variants import MixedPrecision, QAT, QuantizedKV, SmoothQuantW8A8, default_variants

    variants = default_variants(tiny, window=512, qat_steps=3, qat_batch=1, sensitivity_rows=2)
    names = [v.name for v in variants]
    assert len(set(names)) == len(names)
    kinds = {type(v): v for v in variants}
    assert {SmoothQuantW8A8, QuantizedKV, QAT, MixedPrecision} <= set(kinds)
    assert kinds[QuantizedKV].calib_len == 512 and kinds[QAT].steps == 3 and kinds[QAT].batch_size == 1
    assert kinds[MixedPrecision].budget_bits == 5.0 and kinds[MixedPrecision].sensitivity_rows == 2


def test_lab07_qat_variant_starts_from_ptq_training_moves_it_and_the_cache_gives_it_back(tiny, tmp_path):
    from labs_lib.variants import QAT, BuildContext, FakeQuant

    batches = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(4))
    ctx = BuildContext("tiny", tiny, None, batches, tmp_path)
    ptq = dict(FakeQuant("ptq", NVFP4()).build(ctx).model.named_parameters())
    untrained = dict(QAT("qat0", NVFP4(), steps=0).build(ctx).model.named_parameters())
    variant = QAT("qat", NVFP4(), steps=2, batch_size=2, lr=1e-2)
    first = variant.build(ctx)
    trained = dict(first.model.named_parameters())
    assert all(torch.equal(untrained[n], p) for n, p in ptq.items())
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(trained[q], ptq[q])
    assert torch.equal(trained["model.norm.weight"], ptq["model.norm.weight"])  # only Linears train
    again = variant.build(ctx)
    assert not first.cached and again.cached
    assert all(torch.equal(p, trained[n]) for n, p in again.model.named_parameters())
    assert not QAT("qat", NVFP4(), steps=3, batch_size=2, lr=1e-2).build(ctx).cached  # another setting, another key


def test_lab07_mixed_variant_keeps_the_most_sensitive_block_in_fp8_within_the_budget(tiny, tmp_path):
    from labs_lib.sensitivity import block_sensitivity
    from labs_lib.variants import BuildContext, MixedPrecision

    batches = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(5))
    low, high = NVFP4(), PerTensor("fp8_e4m3")
    variant = MixedPrecision("mixed", low, high, budget_bits=6.0, sensitivity_rows=2)  # room for one of 3 blocks
    ctx = BuildContext("tiny", tiny, None, batches, tmp_path)
    built = variant.build(ctx)
    _, rows = block_sensitivity(tiny, low, batches[:2].flatten(), 16)
    assert variant.kept == [max(rows, key=lambda r: r["change (%)"])["block"]]
    blocks = block_linears(tiny)
    for block, names in blocks.items():
        scheme = high if block in variant.kept else low
        for n in names:
            w = built.model.get_submodule(n).weight
            assert torch.equal(w, scheme.fake_quantize(tiny.get_submodule(n).weight).to(w.dtype))
    assert low.bits_per_weight() < built.bits_per_weight < 6.0
    again = variant.build(ctx)  # per-block perplexities from the cache: the same pick, the same weights
    assert again.cached and not built.cached and variant.kept == [max(rows, key=lambda r: r["change (%)"])["block"]]
    assert all(torch.equal(p, dict(built.model.named_parameters())[n]) for n, p in again.model.named_parameters())
