"""Calibration data: YAML specs with line-numbered errors, the four formatters, weighted mixing, filters, examples."""

import json
from pathlib import Path

import pytest
import torch

from labs_lib import calibration
from labs_lib.calibration import (FORMATTERS, HUB_DEFAULT, CalibrationSource, CalibrationSpec, build_calibration_set,
                                  default_spec, example_spec, load_calibration_spec, mix_counts)
from labs_lib.data import EMBEDDED_CORPUS, STDLIB_MODULES, STDLIB_SOURCE, embedded_documents, load_corpus
from labs_lib.errors import LabsError

FIXTURES = Path(__file__).parent / "fixtures" / "calibration"


def _ids(tokenizer, text: str, special: bool) -> tuple[int, ...]:
    return tuple(tokenizer(text, add_special_tokens=special)["input_ids"])


def _build(tokenizer, source: CalibrationSource, n: int, **settings):
    settings = {"min_token_length": 1, "oversample_ratio": 1.0, **settings}
    return build_calibration_set(CalibrationSpec([source], **settings), tokenizer, n_samples=n)


def _write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "calib.yaml"
    path.write_text(text)
    return path


def _messages(tokenizer, turns: list[tuple[str, str]]) -> tuple[int, ...]:
    text = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in turns], tokenize=False)
    return _ids(tokenizer, text, special=False)


# ---------------------------------------------------------------- formatters on fixture files

def test_sharegpt_and_chat_completion_render_with_the_chat_template(tokenizer):
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    records = [json.loads(line)["conversations"] for line in (FIXTURES / "sharegpt.jsonl").read_text().splitlines()]
    expected = {_messages(tokenizer, [(roles[t["from"]], t["value"]) for t in r]) for r in records}
    got = _build(tokenizer, CalibrationSource(path=str(FIXTURES / "sharegpt.jsonl"), formatter="sharegpt"), 3)
    assert {tuple(s.tolist()) for s in got.samples} == expected
    assert got.sources[0]["tokens"] == sum(len(e) for e in expected) == got.tokens

    messages = json.loads((FIXTURES / "chat_completion.json").read_text())
    expected = {_messages(tokenizer, [(m["role"], m["content"]) for m in r["messages"]]) for r in messages}
    got = _build(tokenizer, CalibrationSource(path=str(FIXTURES / "chat_completion.json"),
                                              formatter="chat_completion"), 3)
    assert {tuple(s.tolist()) for s in got.samples} == expected
    text = tokenizer.decode(got.samples[0])
    assert "<|im_start|>user\n" in text and "<|im_start|>assistant\n" in text and "<|im_end|>" in text


def test_formatters_put_roles_and_content_in_the_text(tokenizer):
    text = FORMATTERS["sharegpt"]([[{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Q?"},
                                    {"from": "gpt", "value": "A."}]], tokenizer)
    assert "<|im_start|>system\nBe brief.<|im_end|>" in text
    assert "<|im_start|>user\nQ?<|im_end|>" in text and "<|im_start|>assistant\nA.<|im_end|>" in text
    text = FORMATTERS["prompt_answer"](["Why?", "Because."], tokenizer)
    assert "<|im_start|>user\nWhy?<|im_end|>" in text and "<|im_start|>assistant\nBecause.<|im_end|>" in text
    assert FORMATTERS["raw_text"](["title", "body"], tokenizer) == "title\n\nbody"


def test_prompt_answer_reads_named_csv_columns(tokenizer):
    source = CalibrationSource(path=str(FIXTURES / "prompt_answer.csv"), formatter="prompt_answer",
                               columns=["question", "response"])
    got = _build(tokenizer, source, 3)
    rows = [line.split(",", 1) for line in (FIXTURES / "prompt_answer.csv").read_text().splitlines()[1:]]
    expected = {_messages(tokenizer, [("user", q), ("assistant", a.strip('"'))]) for q, a in rows}
    assert {tuple(s.tolist()) for s in got.samples} == expected


def test_raw_text_txt_is_one_record_per_paragraph(tokenizer):
    got = _build(tokenizer, CalibrationSource(path=str(FIXTURES / "notes.txt")), 4)
    paragraphs = (FIXTURES / "notes.txt").read_text().strip().split("\n\n")
    assert {tuple(s.tolist()) for s in got.samples} == {_ids(tokenizer, p, special=True) for p in paragraphs}


def test_a_folder_reads_every_supported_file_including_parquet(tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [f"parquet row {i} about Python lists" for i in range(5)]
    pq.write_table(pa.table({"text": rows}), tmp_path / "a.parquet")
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": f"json line {i} on dicts"}) + "\n" for i in range(4)))
    (tmp_path / "c.csv").write_text("text\n" + "".join(f"csv row {i} on sets\n" for i in range(3)))
    (tmp_path / "ignored.md").write_text("not read")
    got = _build(tokenizer, CalibrationSource(path=str(tmp_path)), 12)
    assert got.sources[0]["records"] == 12 and len(got.samples) == 12
    assert sum("parquet row" in tokenizer.decode(s) for s in got.samples) == 5


def test_special_tokens_added_to_raw_text_only(tokenizer):
    """A chat template writes its own special tokens (a BOS too, for templates that have one); raw text gets the
    tokenizer's (SmolLM2 adds none, so a wrapper records what was asked)."""
    class Recording:
        chat_template = tokenizer.chat_template

        def __init__(self):
            self.asked = []

        def apply_chat_template(self, messages, tokenize):
            return tokenizer.apply_chat_template(messages, tokenize=tokenize)

        def __call__(self, text, add_special_tokens, verbose):
            self.asked.append(add_special_tokens)
            return tokenizer(text, add_special_tokens=add_special_tokens, verbose=verbose)

    for formatter, path, expected in (("sharegpt", "sharegpt.jsonl", False), ("raw_text", "notes.txt", True)):
        recording = Recording()
        _build(recording, CalibrationSource(path=str(FIXTURES / path), formatter=formatter), 3)
        assert recording.asked == [expected] * 3


def test_no_chat_template_is_a_clear_error():
    class NoTemplate:
        chat_template = None

    with pytest.raises(LabsError, match="no chat template.*raw_text"):
        FORMATTERS["chat_completion"]([[{"role": "user", "content": "hi"}]], NoTemplate())


def test_a_record_of_the_wrong_shape_names_the_formatter_and_line(tokenizer, tmp_path):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"conversations": "not a list of turns"}) + "\n")
    with pytest.raises(LabsError, match="bad.jsonl line 1 does not fit the sharegpt formatter"):
        _build(tokenizer, CalibrationSource(path=str(tmp_path / "bad.jsonl"), formatter="sharegpt"), 1)


# ---------------------------------------------------------------- mixing, filters, oversampling, determinism

def _two_sources(tmp_path: Path, weights: tuple[float, float]) -> list[CalibrationSource]:
    sources = []
    for word, weight in zip(("alpha", "omega"), weights):
        lines = "".join(json.dumps({"text": f"{word} record {i}: " + "the quick brown fox " * 3}) + "\n"
                        for i in range(300))
        (tmp_path / f"{word}.jsonl").write_text(lines)
        sources.append(CalibrationSource(path=str(tmp_path / f"{word}.jsonl"), weight=weight))
    return sources


@pytest.mark.parametrize("weights", [(0.7, 0.3), (1.0, 3.0)])
def test_weighted_mix_follows_the_weights(tokenizer, tmp_path, weights):
    got = build_calibration_set(CalibrationSpec(_two_sources(tmp_path, weights)), tokenizer, n_samples=250)
    assert len(got.samples) == 250 and not got.warnings
    for word, weight, entry in zip(("alpha", "omega"), weights, got.sources):
        share = weight / sum(weights)
        actual = sum(tokenizer.decode(s).startswith(word) for s in got.samples)
        assert actual == entry["samples"]
        assert abs(actual / 250 - share) <= 0.1 * share
    first = [tokenizer.decode(s).split()[0] for s in got.samples[:40]]
    assert len(set(first)) == 2  # the sources are shuffled together, not one block after the other


def test_mix_counts_largest_remainder():
    assert mix_counts([0.5, 0.3, 0.2], 7) == [4, 2, 1]  # exact 3.5, 2.1, 1.4: the 0.5 remainder gets the extra
    assert mix_counts([1, 1, 1], 100) == [34, 33, 33]
    assert mix_counts([2, 1], 0) == [0, 0]
    assert sum(mix_counts([0.13, 0.29, 0.58], 1001)) == 1001


def test_min_token_length_drops_short_samples_and_max_seq_len_truncates(tokenizer):
    source = CalibrationSource(path=str(FIXTURES / "notes.txt"))
    got = _build(tokenizer, source, 4, min_token_length=8)
    assert got.sources[0]["dropped_short"] == 2 and len(got.samples) == 2  # "Hi." and "Ok." are dropped
    long = [p for p in (FIXTURES / "notes.txt").read_text().split("\n\n") if len(p) > 10]
    assert {tuple(s.tolist()) for s in got.samples} == {_ids(tokenizer, p.strip(), special=True) for p in long}
    got = build_calibration_set(CalibrationSpec([source], min_token_length=1), tokenizer, n_samples=4, max_seq_len=10)
    assert all(len(s) <= 10 for s in got.samples) and got.sources[0]["truncated"] == 2


def test_oversampling_draws_more_candidates_and_a_short_source_says_so(tokenizer, tmp_path):
    records = [{"text": "ok"}] * 10 + [{"text": f"sample {i}, long enough, about Python sets"} for i in range(10)]
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    source = CalibrationSource(path=str(tmp_path / "mixed.jsonl"))
    tight = _build(tokenizer, source, 10, min_token_length=5, oversample_ratio=1.0)
    entry = tight.sources[0]  # 10 candidates out of 20 records: all 10 long ones with probability 1/184,756
    assert entry["candidates"] == 10 and entry["short_by"] == entry["dropped_short"] == 10 - len(tight.samples) > 0
    assert "gave" in tight.warnings[0] and "not topped up" in tight.warnings[0]
    wide = _build(tokenizer, source, 10, min_token_length=5, oversample_ratio=2.0)
    assert wide.sources[0]["candidates"] == 20 and len(wide.samples) == 10 and not wide.warnings


def test_a_short_source_does_not_change_the_others_share(tokenizer, tmp_path):
    sources = _two_sources(tmp_path, (0.5, 0.5))
    sources[1].max_samples = 20  # read only 20 records of the second source
    got = build_calibration_set(CalibrationSpec(sources, oversample_ratio=1.0), tokenizer, n_samples=100)
    assert [e["samples"] for e in got.sources] == [50, 20] and got.sources[1]["short_by"] == 30
    assert len(got.samples) == 70 and len(got.warnings) == 1


def test_same_seed_same_samples(tokenizer, tmp_path):
    def draw(seed):
        spec = CalibrationSpec(_two_sources(tmp_path, (0.5, 0.5)), seed=seed)
        return build_calibration_set(spec, tokenizer, n_samples=20).samples

    a, b, c = draw(0), draw(0), draw(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == len(b) == 20
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert all(s.dtype == torch.int64 and s.dim() == 1 for s in a)


# ---------------------------------------------------------------- sources: embedded corpora and the Hub

def test_embedded_corpora_as_sources(tokenizer):
    train = _build(tokenizer, CalibrationSource(name=STDLIB_SOURCE), 30)
    test = _build(tokenizer, CalibrationSource(name=STDLIB_SOURCE, split="test"), 30)
    train_ids = {tuple(s.tolist()) for s in train.samples}
    assert len(train_ids) == 30 and not train_ids & {tuple(s.tolist()) for s in test.samples}
    reference = _build(tokenizer, CalibrationSource(name=EMBEDDED_CORPUS), 10)
    assert reference.sources[0]["records"] > 100 and len(reference.samples) == 10


def test_stdlib_source_corpus_splits_by_module():
    calibration_files, evaluation_files = embedded_documents(STDLIB_SOURCE)
    assert len(calibration_files) + len(evaluation_files) == len(STDLIB_MODULES) == 28
    assert len(evaluation_files) == len(STDLIB_MODULES) // 3 and not set(calibration_files) & set(evaluation_files)
    corpus = load_corpus(STDLIB_SOURCE)
    assert "def " in corpus.calibration and "def " in corpus.evaluation
    assert corpus.calibration == "\n\n".join(calibration_files)


def test_hub_source_streams_through_load_dataset(tokenizer, monkeypatch):
    """The Hub path with `datasets.load_dataset` standing in for the network: a streaming source reads only the
    candidates it needs from a long stream."""
    import datasets

    calls = []

    def stream(path, name, split, streaming):
        calls.append((path, name, split, streaming))
        for i in range(1, 1000):
            yield {"messages": [{"role": "user", "content": f"question {i}"},
                                {"role": "assistant", "content": f"answer {i}"}]}

    monkeypatch.setattr(datasets, "load_dataset", stream)
    spec = default_spec(online=True)
    got = build_calibration_set(spec, tokenizer, n_samples=8)
    assert calls == [(HUB_DEFAULT, None, "train_sft", True)]
    assert got.sources[0]["records"] == 12 and len(got.samples) == 8  # 8 x oversample_ratio 1.5
    assert "<|im_start|>assistant\nanswer" in tokenizer.decode(got.samples[0])


# ---------------------------------------------------------------- the shipped examples and the defaults

def test_shipped_examples_load_and_build(tokenizer):
    embedded = load_calibration_spec(example_spec("embedded"), online=False)
    default = default_spec(online=False)
    assert [(s.name, s.split, s.formatter, s.weight) for s in embedded.sources] == \
        [(s.name, s.split, s.formatter, s.weight) for s in default.sources]
    assert (embedded.max_samples, embedded.max_seq_len, embedded.min_token_length, embedded.oversample_ratio,
            embedded.seed) == (default.max_samples, default.max_seq_len, default.min_token_length,
                               default.oversample_ratio, default.seed)
    assert load_calibration_spec(None, online=False) == default
    assert len(build_calibration_set(embedded, tokenizer, n_samples=32).samples) == 32

    mix = build_calibration_set(load_calibration_spec(example_spec("chat_mix"), online=False), tokenizer)
    assert [e["samples"] for e in mix.sources] == [19, 19, 13, 13] and not mix.warnings
    assert [e["records"] for e in mix.sources] == [32, 32, 32, 16]  # as configs/calibration/README.md says
    assert [e["formatter"] for e in mix.sources] == ["sharegpt", "chat_completion", "prompt_answer", "raw_text"]
    assert all(16 <= len(s) <= 512 for s in mix.samples) and mix.tokens == sum(e["tokens"] for e in mix.sources)
    with pytest.raises(LabsError, match="use one of chat_mix, embedded"):
        example_spec("nope")


# ---------------------------------------------------------------- bad input: short errors that name the place

GOOD = "sources:\n  - path: {path}\n"


@pytest.mark.parametrize("text, line, pattern", [
    ("sources:\n  - path: [unclosed\n", 2, "not valid YAML"),  # the '[' that is never closed
    ("sources:\n  - path: {path}\n   weight: 2\n", 3, "not valid YAML"),  # bad indentation
    ("sources:\n  - path: {path}\n    weight: -1\n", 3, r"sources\[0\]\.weight: must be a positive number"),
    ("sources:\n  - path: {path}\n    weight: 0\n", 3, r"sources\[0\]\.weight: must be a positive number"),
    ("sources:\n  - path: {path}\n    weight: lots\n", 3, r"sources\[0\]\.weight: must be a positive number"),
    ("sources:\n  - path: {path}\n\n    formatter: alpaca\n", 4,
     "unknown formatter 'alpaca': use one of raw_text, prompt_answer, sharegpt, chat_completion"),
    ("sources:\n  - path: {path}\n  - path: missing.jsonl\n", 3, r"sources\[1\]\.path: .*missing.jsonl does not exist"),
    ("sources:\n  - split: train\n", 2, r"sources\[0\]: give exactly one of `name`.*and `path`"),
    ("sources:\n  - path: {path}\n    name: embedded:python-reference\n", 2, r"sources\[0\]\.path: give exactly one"),
    ("sources:\n  - path: {path}\n    formater: sharegpt\n", 3, r"sources\[0\]\.formater: unknown key"),
    ("max_seq_len: 512\nmin_token_lenght: 4\nsources:\n  - path: {path}\n", 2, "min_token_lenght: unknown key"),
    ("oversample_ratio: 0.5\nsources:\n  - path: {path}\n", 1, "oversample_ratio: must be a number of at least 1"),
    ("sources:\n  - path: {path}\n    formatter: prompt_answer\n    columns: [q]\n", 4, "reads 2 column"),
    ("sources:\n  - name: embedded:python-manual\n", 2, "unknown embedded corpus"),
    ("sources: []\n", 1, "list at least one source"),
    ("- path: {path}\n", 1, "must be a mapping with a `sources:` list"),
])
def test_bad_yaml_names_file_line_and_field(tmp_path, text, line, pattern):
    path = _write_yaml(tmp_path, text.format(path=FIXTURES / "notes.txt"))
    with pytest.raises(LabsError, match=rf"calib\.yaml:{line}: .*{pattern}") as error:
        load_calibration_spec(path, online=False)
    assert "\n" not in str(error.value) and len(str(error.value)) < 400


def test_missing_yaml_file(tmp_path):
    with pytest.raises(LabsError, match="nothing.yaml does not exist"):
        load_calibration_spec(tmp_path / "nothing.yaml", online=False)


def test_missing_column_names_it_and_lists_the_present_ones(tokenizer, tmp_path):
    path = _write_yaml(tmp_path, f"sources:\n  - path: {FIXTURES / 'prompt_answer.csv'}\n    text_column: body\n")
    spec = load_calibration_spec(path, online=False)
    with pytest.raises(LabsError, match=r"calib\.yaml:2: .*row \d has no column 'body'; its columns are: question, "
                                        r"response"):
        build_calibration_set(spec, tokenizer)


def test_every_sample_filtered_out_says_which_filter(tokenizer):
    spec = CalibrationSpec([CalibrationSource(path=str(FIXTURES / "notes.txt"))], min_token_length=400)
    with pytest.raises(LabsError, match="filtered out.*shorter than min_token_length=400.*Lower min_token_length"):
        build_calibration_set(spec, tokenizer, n_samples=4, max_seq_len=512)
    with pytest.raises(LabsError, match="max_seq_len=8 is below min_token_length=16"):
        build_calibration_set(CalibrationSpec(spec.sources), tokenizer, max_seq_len=8)


def test_specs_built_in_code_are_checked_too(tokenizer):
    with pytest.raises(LabsError, match="weight: must be a positive number"):
        build_calibration_set(CalibrationSpec([CalibrationSource(name=EMBEDDED_CORPUS, weight=0)]), tokenizer)
    with pytest.raises(LabsError, match="does not exist"):
        build_calibration_set(CalibrationSpec([CalibrationSource(path="no/such/file.jsonl")]), tokenizer)
    with pytest.raises(LabsError, match="max_samples: must be a whole number"):
        build_calibration_set(CalibrationSpec([CalibrationSource(name=EMBEDDED_CORPUS)]), tokenizer, n_samples=0)
    with pytest.raises(LabsError, match="splits train and test"):
        build_calibration_set(CalibrationSpec([CalibrationSource(name=EMBEDDED_CORPUS, split="dev")]), tokenizer)


def test_formatters_are_listed_with_a_description():
    assert list(FORMATTERS) == ["raw_text", "prompt_answer", "sharegpt", "chat_completion"]
    assert all(f.__doc__ and len(f.__doc__.splitlines()[0]) < 120 for f in FORMATTERS.values())
    assert set(calibration.FORMATTER_COLUMNS) == set(FORMATTERS)
