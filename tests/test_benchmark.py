"""Lab 07: the local lm-eval tasks run offline and agree with labs_lib; llama.cpp through LlamaCppLM agrees with
transformers through HFLM; the variant cache and the bitsandbytes 4-bit round trip give back the same model."""

import copy
import importlib.util
import math

import pytest
import torch

from labs_lib.benchmark import (LlamaCppLM, discordant_items, next_word_items, paired_accuracy_change, run_tasks,
                                write_task_data)
from labs_lib.blockquant import IntGroup
from labs_lib.data import calibration_batches, evaluation_tokens
from labs_lib.errors import LabsError
from labs_lib.evaluate import perplexity
from labs_lib.models import EMBEDDED, model_folder
from labs_lib.rtn import RTN
from labs_lib.variants import BuildContext, Layerwise


@pytest.fixture(scope="module")
def task_data(tokenizer, corpus, tmp_path_factory):
    ids = evaluation_tokens(tokenizer, corpus, 2048)
    return ids, write_task_data(tokenizer, corpus, ids, 1024, 100, tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="module")
def bf16_results(model, tokenizer, task_data):
    from lm_eval.models.huggingface import HFLM

    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    lm = HFLM(pretrained=bf16, tokenizer=tokenizer, batch_size=32, max_length=1024)
    return run_tasks(lm, task_data[1]), perplexity(bf16, task_data[0], window=1024)


def test_items_are_deterministic_true_continuations(tokenizer, corpus):
    items = next_word_items(tokenizer, corpus.evaluation, 500)
    assert items == next_word_items(tokenizer, corpus.evaluation, 500) and len(items) == 500
    text = " ".join(corpus.evaluation.split())
    for item in items[:50]:
        assert len(set(item["choices"])) == 4
        assert item["context"] + " " + item["choices"][item["gold"]] in text
    golds = [item["gold"] for item in items]
    assert all(golds.count(g) > 80 for g in range(4))  # the answer's position is shuffled


def test_local_tasks_run_offline_and_beat_chance_by_more_than_three_stderr(bf16_results):
    results, _ = bf16_results
    assert results["items"] == 100
    assert results["accuracy"] - 0.25 > 3 * results["accuracy stderr"]
    assert results["bits per byte"] == pytest.approx(math.log2(results["byte perplexity"]))
    assert 1 < results["token perplexity"] < results["word perplexity"]


def test_item_correctness_gives_the_accuracy_and_a_paired_error_below_the_unpaired_one(bf16_results):
    results, _ = bf16_results
    correct = results["item correct"]
    assert len(correct) == 100 and set(correct) <= {0.0, 1.0}
    assert sum(correct) / len(correct) == pytest.approx(results["accuracy"])
    assert paired_accuracy_change(correct, correct) == (0.0, 0.0)
    flipped = [1.0 - c if i < 10 else c for i, c in enumerate(correct)]  # ten answers changed, the rest shared
    change, se = paired_accuracy_change(flipped, correct)
    d = torch.tensor(flipped, dtype=torch.float64) - torch.tensor(correct, dtype=torch.float64)
    assert change == pytest.approx(d.mean().item()) and se == pytest.approx(d.std().item() / 10)
    assert se < math.hypot(results["accuracy stderr"], results["accuracy stderr"])
    with pytest.raises(LabsError, match="same items"):
        paired_accuracy_change(correct[:50], correct)


def test_discordant_items_give_mcnemars_exact_p_value():
    from scipy.stats import binomtest

    reference = [1.0] * 60 + [0.0] * 40
    variant = [0.0] * 4 + [1.0] * 56 + [1.0] * 1 + [0.0] * 39  # 4 lost, 1 gained
    result = discordant_items(variant, reference)
    assert (result["gained"], result["lost"]) == (1, 4)
    assert result["p"] == pytest.approx(binomtest(1, 5, 0.5).pvalue)  # 0.375
    assert discordant_items(reference, reference) == {"gained": 0, "lost": 0, "p": 1.0}
    assert discordant_items([0.0] * 12, [1.0] * 12)["p"] == pytest.approx(binomtest(0, 12, 0.5).pvalue)
    with pytest.raises(LabsError, match="same items"):
        discordant_items(variant[:10], reference)


def test_lm_eval_perplexity_agrees_with_labs_lib_within_one_percent(bf16_results):
    results, ours = bf16_results
    assert abs(results["token perplexity"] / ours - 1) < 0.01


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_llama_cpp_through_lm_eval_agrees_with_transformers(model, tokenizer, task_data, tmp_path):
    from lm_eval.models.huggingface import HFLM

    from labs_lib.gguf_io import write_gguf

    path = write_gguf(model, tokenizer, tmp_path / "f32.gguf", dtype="F32")
    lm = LlamaCppLM(path, n_ctx=1024)
    try:
        ours = run_tasks(lm, task_data[1])
    finally:
        lm.scorer.close()
    theirs = run_tasks(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=32, max_length=1024), task_data[1])
    assert ours["token perplexity"] == pytest.approx(theirs["token perplexity"], rel=2e-3)
    assert abs(ours["accuracy"] - theirs["accuracy"]) <= 0.02  # at most 2 of 100 near-ties may flip


def test_variant_cache_gives_back_the_same_weights(model, tokenizer, corpus, tmp_path):
    batches = calibration_batches(tokenizer, corpus, 2, 64)
    ctx = BuildContext(EMBEDDED, model, tokenizer, batches, tmp_path)
    variant = Layerwise("RTN INT4 g64", RTN(IntGroup(4, 64, symmetric=False)))
    first, second = variant.build(ctx), variant.build(ctx)
    assert not first.cached and second.cached
    for (name, a), b in zip(first.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert first.bits_per_weight == pytest.approx(4 + 20 / 64, abs=1e-3)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_bitsandbytes_nf4_saved_before_any_forward_reloads_exactly(tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    nf4 = AutoModelForCausalLM.from_pretrained(model_folder(EMBEDDED), quantization_config=config, dtype=torch.bfloat16,
                                               device_map="cpu")
    nf4.save_pretrained(tmp_path)  # before any forward pass: see TROUBLESHOOTING.md, "bitsandbytes"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, device_map="cpu")
    x = torch.arange(1, 33).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(nf4(x).logits, reloaded(x).logits)
