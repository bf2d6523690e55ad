"""Calibration data for quantization: sources named in a YAML file, rendered to text, tokenized, filtered and mixed.

A YAML file (every key optional except `sources`; see configs/calibration/ for examples):

    max_samples: 512          # samples in the set (the CLI's --calib_size overrides it)
    max_seq_len: 512          # longer samples are truncated (--max_seq_len overrides it)
    min_token_length: 16      # shorter samples are dropped
    oversample_ratio: 1.5     # candidates drawn per needed sample, before that filter
    seed: 0
    sources:
      - name: embedded:python-reference   # a Hub dataset id or an embedded corpus; or `path:` a file or folder
        split: train                      # Hub and embedded sources (embedded: train or test); not for `path`
        subset: null                      # the Hub dataset's configuration, if it has several
        weight: 1                         # its share of the samples
        formatter: raw_text               # raw_text | prompt_answer | sharegpt | chat_completion
        text_column: text                 # or `columns: [a, b]` (defaults: FORMATTER_COLUMNS)
        streaming: false                  # stream a Hub dataset instead of downloading it
        max_samples: 1000                 # read at most this many records of the source (see below)

Every source becomes an iterator of records (dicts): Hub datasets through `datasets.load_dataset`, local
.json/.jsonl/.parquet/.csv/.txt files (a .txt file gives one record per paragraph) and embedded corpora (runs of
whole paragraphs of up to RUN_CHARS characters) through readers here; from there every source takes the same path:
the first `max_samples` records (all of them if unset; for a streaming source, only as many as it has candidates)
are read, a seeded draw picks ceil(share * oversample_ratio) candidates, and candidates are formatted, tokenized,
truncated to max_seq_len and kept unless shorter than min_token_length, until the source's share is full.
Each source's share follows the weights (largest-remainder rounding). A source that yields fewer usable samples than
its share is not topped up from the others: its `sources` entry records `short_by` and `warnings` says so, so the
mix is never changed silently.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import random
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import yaml
from tqdm.auto import tqdm

from .data import EMBEDDED_CORPORA, EMBEDDED_CORPUS, embedded_documents
from .errors import LabsError

HUB_DEFAULT = "HuggingFaceH4/ultrachat_200k"  # chat conversations (`messages`), split train_sft; streamed online
EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "configs" / "calibration"
RUN_CHARS = 2000  # embedded corpora: paragraphs are grouped into records of at most this many characters
EMBEDDED_SPLITS = {"train": 0, "calibration": 0, "test": 1, "validation": 1, "evaluation": 1}

__all__ = ["CalibrationSource", "CalibrationSpec", "CalibrationSet", "FORMATTERS", "FORMATTER_COLUMNS", "HUB_DEFAULT",
           "build_calibration_set", "default_spec", "example_spec", "load_calibration_spec", "mix_counts"]


@dataclass
class CalibrationSource:
    """One entry of the YAML's `sources` list; `origin` and `line` say where it was written (not YAML keys)."""

    name: str | None = None
    path: str | None = None
    split: str = "train"
    subset: str | None = None
    weight: float = 1.0
    text_column: str | None = None
    columns: list[str] | None = None
    formatter: str = "raw_text"
    streaming: bool = False
    max_samples: int | None = None
    origin: Path | None = None
    line: int | None = None

    @property
    def label(self) -> str:
        """The source as written: its name or its path."""
        return str(self.name or self.path)

    @property
    def column_names(self) -> list[str]:
        """The record columns its formatter reads: text_column, columns, or the formatter's defaults."""
        if self.text_column:
            return [self.text_column]
        return list(self.columns or FORMATTER_COLUMNS.get(self.formatter, ()))

    def resolved_path(self) -> Path:
        """`path`, relative to the folder of the YAML file it came from (else to the working directory)."""
        path = Path(self.path).expanduser()
        return path if path.is_absolute() or self.origin is None else Path(self.origin).parent / path


@dataclass
class CalibrationSpec:
    """Sources plus the global settings (defaults as in hf_ptq.py: 512 samples of up to 512 tokens)."""

    sources: list[CalibrationSource]
    max_samples: int = 512
    max_seq_len: int = 512
    min_token_length: int = 16
    oversample_ratio: float = 1.5
    seed: int = 0
    origin: Path | None = None


@dataclass
class CalibrationSet:
    """Token-id samples (1-D int64, min_token_length <= len <= max_seq_len) and what each source gave."""

    samples: list[torch.Tensor]
    sources: list[dict]
    warnings: list[str] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        """Tokens in all samples together."""
        return sum(len(s) for s in self.samples)


# ---------------------------------------------------------------- formatters: record values -> text

def _chat(tokenizer, messages: list[dict]) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise LabsError("This tokenizer has no chat template, which the prompt_answer, sharegpt and chat_completion "
                        "formatters need: use formatter: raw_text with `columns:` naming the text columns.")
    return tokenizer.apply_chat_template(messages, tokenize=False)


def raw_text(values: list, tokenizer) -> str:
    """Plain text: the columns' values joined by blank lines."""
    return "\n\n".join(str(v) for v in values if v is not None)


def prompt_answer(values: list, tokenizer) -> str:
    """A prompt column and an answer column, rendered as a user and an assistant turn with the chat template."""
    prompt, answer = values
    return _chat(tokenizer, [{"role": "user", "content": str(prompt)}, {"role": "assistant", "content": str(answer)}])


_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "chatgpt": "assistant"}


def sharegpt(values: list, tokenizer) -> str:
    """ShareGPT conversations (a list of {from, value}; from: system, human or gpt), rendered with the chat template."""
    (turns,) = values
    return _chat(tokenizer, [{"role": _SHAREGPT_ROLES[t["from"]], "content": str(t["value"])} for t in turns])


def chat_completion(values: list, tokenizer) -> str:
    """OpenAI-style messages (a list of {role, content}), rendered with the chat template."""
    (messages,) = values
    return _chat(tokenizer, [{"role": str(m["role"]), "content": str(m["content"])} for m in messages])


FORMATTERS: dict[str, Callable[[list, Any], str]] = {
    "raw_text": raw_text, "prompt_answer": prompt_answer, "sharegpt": sharegpt, "chat_completion": chat_completion}
FORMATTER_COLUMNS: dict[str, tuple[str, ...]] = {
    "raw_text": ("text",), "prompt_answer": ("prompt", "answer"), "sharegpt": ("conversations",),
    "chat_completion": ("messages",)}


# ---------------------------------------------------------------- readers: source -> (where, record) pairs

Record = tuple[str, dict]


def _read_jsonl(path: Path) -> Iterator[Record]:
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield f"{path.name} line {n}", json.loads(line)
                except json.JSONDecodeError as exc:
                    raise LabsError(f"{path} line {n} is not valid JSON ({exc.msg}): fix that line.") from None


def _read_json(path: Path) -> Iterator[Record]:
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise LabsError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg}).") from None
    if not isinstance(items, list):
        raise LabsError(f"{path} must hold a JSON list of records (objects); for one record per line use .jsonl.")
    yield from ((f"{path.name} item {n}", item) for n, item in enumerate(items, 1))


def _read_csv(path: Path) -> Iterator[Record]:
    with path.open(encoding="utf-8", newline="") as f:
        yield from ((f"{path.name} row {n}", row) for n, row in enumerate(csv.DictReader(f), 1))


def _read_parquet(path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    rows = (row for batch in pq.ParquetFile(path).iter_batches() for row in batch.to_pylist())
    yield from ((f"{path.name} row {n}", row) for n, row in enumerate(rows, 1))


def _read_txt(path: Path) -> Iterator[Record]:
    paragraphs = (p.strip() for p in path.read_text(encoding="utf-8").split("\n\n"))
    yield from ((f"{path.name} paragraph {n}", {"text": p}) for n, p in enumerate(filter(None, paragraphs), 1))


READERS: dict[str, Callable[[Path], Iterator[Record]]] = {
    ".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet, ".txt": _read_txt}


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in READERS)
    if not files:
        raise LabsError(f"The folder {path} holds no {'/'.join(READERS)} files.")
    return files


def _paragraph_runs(text: str, max_chars: int = RUN_CHARS) -> Iterator[str]:
    """Consecutive whole paragraphs of `text`, grouped into runs of at most `max_chars` characters (a longer
    paragraph is a run of its own)."""
    run: list[str] = []
    for paragraph in filter(None, (p.strip() for p in text.split("\n\n"))):
        if run and sum(len(p) + 2 for p in run) + len(paragraph) > max_chars:
            yield "\n\n".join(run)
            run = []
        run.append(paragraph)
    if run:
        yield "\n\n".join(run)


def _embedded_records(source: CalibrationSource) -> Iterator[Record]:
    documents = embedded_documents(source.name)[EMBEDDED_SPLITS[source.split]]
    runs = (run for document in documents for run in _paragraph_runs(document))
    yield from ((f"{source.name} record {n}", {"text": run}) for n, run in enumerate(runs, 1))


def _hub_records(source: CalibrationSource) -> Iterator[Record]:
    from datasets import load_dataset

    try:
        dataset = load_dataset(source.name, source.subset, split=source.split, streaming=source.streaming)
    except (OSError, ValueError) as exc:
        raise LabsError(f"{_where(source)}: could not load the dataset '{source.name}' (split '{source.split}'): "
                        f"{exc}. Check the id, subset and split, or use `path:` for a local file.") from None
    yield from ((f"{source.name} record {n}", dict(record)) for n, record in enumerate(dataset, 1))


def _records(source: CalibrationSource) -> Iterator[Record]:
    """Every record of a source, in its stored order, with where it is (for error messages)."""
    if source.path is not None:
        return itertools.chain.from_iterable(READERS[f.suffix](f) for f in _local_files(source.resolved_path()))
    if source.name in EMBEDDED_CORPORA:
        return _embedded_records(source)
    return _hub_records(source)


# ---------------------------------------------------------------- validation

_GLOBAL_KEYS = ("max_samples", "max_seq_len", "min_token_length", "oversample_ratio", "seed", "sources")
_SOURCE_KEYS = tuple(f.name for f in fields(CalibrationSource) if f.name not in ("origin", "line"))


def _is_int(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _source_problems(s: CalibrationSource) -> list[tuple[str, str]]:
    """(field, what is wrong and what to do) for each problem of a source that shows without reading its data."""
    text_fields = ("name", "path", "split", "subset", "text_column", "formatter")
    problems = [(k, f"must be text, got {getattr(s, k)!r}") for k in text_fields
                if getattr(s, k) is not None and not isinstance(getattr(s, k), str)]
    if problems:
        return problems
    if (s.name is None) == (s.path is None):  # both: point at `path`; neither: at the source itself ("")
        return [("path" if s.path is not None else "", "give exactly one of `name` (a Hub dataset id or an embedded "
                                                       "corpus) and `path` (a local file or folder)")]
    if not _is_number(s.weight) or s.weight <= 0:
        problems.append(("weight", f"must be a positive number (its share of the samples), got {s.weight!r}"))
    if s.formatter not in FORMATTERS:
        problems.append(("formatter", f"unknown formatter '{s.formatter}': use one of {', '.join(FORMATTERS)}"))
    if not isinstance(s.streaming, bool):
        problems.append(("streaming", f"must be true or false, got {s.streaming!r}"))
    if s.max_samples is not None and not _is_int(s.max_samples, 1):
        problems.append(("max_samples", f"must be a whole number of at least 1, got {s.max_samples!r}"))
    problems += _column_problems(s)
    if s.name in EMBEDDED_CORPORA and s.split not in EMBEDDED_SPLITS:
        problems.append(("split", f"the embedded corpora have the splits train and test, not '{s.split}'"))
    if s.name is not None and s.name.startswith("embedded:") and s.name not in EMBEDDED_CORPORA:
        problems.append(("name", f"unknown embedded corpus '{s.name}': use one of {', '.join(EMBEDDED_CORPORA)}"))
    if s.path is not None:
        problems += _path_problems(s)
    return problems


def _column_problems(s: CalibrationSource) -> list[tuple[str, str]]:
    if s.text_column is not None and s.columns is not None:
        return [("columns", "give `text_column` or `columns`, not both")]
    if s.columns is not None and (not isinstance(s.columns, list) or not s.columns
                                  or not all(isinstance(c, str) for c in s.columns)):
        return [("columns", f"must be a list of column names, got {s.columns!r}")]
    wanted = len(FORMATTER_COLUMNS.get(s.formatter, ()))
    if s.formatter in FORMATTERS and s.formatter != "raw_text" and len(s.column_names) != wanted:
        names = ", ".join(FORMATTER_COLUMNS[s.formatter])
        return [("columns", f"the {s.formatter} formatter reads {wanted} column(s) ({names}), got {s.column_names}")]
    return []


def _path_problems(s: CalibrationSource) -> list[tuple[str, str]]:
    path = s.resolved_path()
    relative = f" (relative paths start from {path.parent})" if not Path(s.path).expanduser().is_absolute() else ""
    if not path.exists():
        return [("path", f"{path} does not exist{relative}: check the path")]
    if path.is_file() and path.suffix not in READERS:
        return [("path", f"{path.name}: unsupported file type; use {', '.join(READERS)} or a folder of them")]
    return []


def _spec_problems(spec: CalibrationSpec) -> list[tuple[str, str]]:
    problems = [(k, f"must be a whole number of at least {least}, got {getattr(spec, k)!r}")
                for k, least in (("max_samples", 1), ("max_seq_len", 1), ("min_token_length", 1), ("seed", 0))
                if not _is_int(getattr(spec, k), least)]
    if not _is_number(spec.oversample_ratio) or spec.oversample_ratio < 1:
        problems.append(("oversample_ratio", f"must be a number of at least 1, got {spec.oversample_ratio!r}"))
    if not spec.sources:
        problems.append(("sources", "list at least one source (see configs/calibration/ for examples)"))
    return problems


def _where(source: CalibrationSource) -> str:
    if source.origin is not None:
        return f"{source.origin}:{source.line}: source '{source.label}'"
    return f"calibration source '{source.label}'"


def _check(spec: CalibrationSpec) -> None:
    """Raise a LabsError for the first problem of a spec built in code (the YAML loader names lines instead)."""
    for key, problem in _spec_problems(spec):
        raise LabsError(f"Calibration setting {key}: {problem}.")
    for source in spec.sources:
        for key, problem in _source_problems(source):
            raise LabsError(f"{_where(source)}: {key + ': ' if key else ''}{problem}.")


# ---------------------------------------------------------------- YAML with line numbers

def _key_line(node: yaml.Node, key: str) -> int:
    """The 1-based line of `key` in a mapping node (the mapping's own line if the key is absent)."""
    if isinstance(node, yaml.MappingNode):
        for key_node, _ in node.value:
            if key_node.value == key:
                return key_node.start_mark.line + 1
    return node.start_mark.line + 1


def _yaml_error(path: Path, line: int, field_name: str, problem: str) -> LabsError:
    return LabsError(f"{path}:{line}: {field_name}: {problem}.")


def _parse_yaml(path: Path) -> tuple[Any, yaml.Node | None]:
    text = path.read_text(encoding="utf-8")
    try:
        return yaml.safe_load(text), yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        if mark is not None and mark.index >= len(text.rstrip()):  # at the end of the file: where the open part began
            mark = getattr(exc, "context_mark", None) or mark
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise LabsError(f"{where}: not valid YAML ({getattr(exc, 'problem', None) or exc}): fix the syntax "
                        "there.") from None


def _source_from_yaml(path: Path, item: Any, node: yaml.Node, index: int) -> CalibrationSource:
    line = node.start_mark.line + 1
    if not isinstance(item, dict):
        raise _yaml_error(path, line, f"sources[{index}]", "each source must be a mapping such as `- path: data.jsonl`")
    for key in item:
        if key not in _SOURCE_KEYS:
            raise _yaml_error(path, _key_line(node, str(key)), f"sources[{index}].{key}",
                              f"unknown key; a source takes {', '.join(_SOURCE_KEYS)}")
    source = CalibrationSource(**item, origin=path, line=line)
    for key, problem in _source_problems(source):
        raise _yaml_error(path, _key_line(node, key), f"sources[{index}]" + (f".{key}" if key else ""), problem)
    return source


def load_calibration_spec(path: str | Path | None, online: bool) -> CalibrationSpec:
    """The calibration spec of a YAML file; None gives default_spec(online). Errors name the file, line and field."""
    if path is None:
        return default_spec(online)
    path = Path(path)
    if not path.is_file():
        raise LabsError(f"The calibration YAML {path} does not exist: check the path (examples: {EXAMPLES_DIR}).")
    data, root = _parse_yaml(path)
    if not isinstance(data, dict) or not isinstance(data.get("sources"), list):
        line = root.start_mark.line + 1 if root is not None else 1
        raise _yaml_error(path, line, "sources", "the file must be a mapping with a `sources:` list")
    for key in data:
        if key not in _GLOBAL_KEYS:
            raise _yaml_error(path, _key_line(root, str(key)), str(key),
                              f"unknown key; the top level takes {', '.join(_GLOBAL_KEYS)}")
    source_nodes = next(v for k, v in root.value if k.value == "sources").value
    sources = [_source_from_yaml(path, item, node, i)
               for i, (item, node) in enumerate(zip(data["sources"], source_nodes))]
    spec = CalibrationSpec(sources=sources, origin=path, **{k: v for k, v in data.items() if k != "sources"})
    for key, problem in _spec_problems(spec):
        raise _yaml_error(path, _key_line(root, key), key, problem)
    return spec


def default_spec(online: bool) -> CalibrationSpec:
    """The calibration data without a YAML: chat conversations from HUB_DEFAULT online, else the embedded corpus."""
    if online:
        return CalibrationSpec([CalibrationSource(name=HUB_DEFAULT, split="train_sft", formatter="chat_completion",
                                                  streaming=True)])
    return CalibrationSpec([CalibrationSource(name=EMBEDDED_CORPUS)])


def example_spec(name: str) -> Path:
    """The path of a shipped example YAML, configs/calibration/<name>.yaml in the repository checkout."""
    path = EXAMPLES_DIR / f"{name.removesuffix('.yaml')}.yaml"
    if not path.is_file():
        shipped = sorted(p.stem for p in EXAMPLES_DIR.glob("*.yaml"))
        raise LabsError(f"No example calibration YAML '{name}' in {EXAMPLES_DIR}: "
                        f"use one of {', '.join(shipped) or '(none: run from a checkout of the repository)'}.")
    return path


# ---------------------------------------------------------------- sampling

def mix_counts(weights: list[float], total: int) -> list[int]:
    """Split `total` samples in proportion to `weights`, rounding by largest remainder (ties to the earlier one)."""
    exact = [total * w / sum(weights) for w in weights]
    counts = [math.floor(e) for e in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _text(source: CalibrationSource, where: str, record: Any, tokenizer) -> str:
    if not isinstance(record, dict):
        raise LabsError(f"{_where(source)}: {where} is not a record with named columns: {str(record)[:80]!r}.")
    missing = [c for c in source.column_names if c not in record]
    if missing:
        raise LabsError(f"{_where(source)}: {where} has no column '{missing[0]}'; its columns are: "
                        f"{', '.join(map(str, record)) or '(none)'}. Set `text_column` or `columns` to the right ones.")
    try:
        return FORMATTERS[source.formatter]([record[c] for c in source.column_names], tokenizer)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        doc = FORMATTERS[source.formatter].__doc__.splitlines()[0]
        raise LabsError(f"{_where(source)}: {where} does not fit the {source.formatter} formatter ({doc}; "
                        f"problem: {type(exc).__name__} {exc}).") from None


def _token_ids(source: CalibrationSource, text: str, tokenizer) -> torch.Tensor:
    """Raw text gets the tokenizer's special tokens (a BOS, if it adds one); chat-rendered text already holds them."""
    ids = tokenizer(text, add_special_tokens=source.formatter == "raw_text", verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def _draw(source: CalibrationSource, index: int, count: int, spec: CalibrationSpec, tokenizer, max_seq_len: int,
          progress: tqdm) -> tuple[list[torch.Tensor], dict]:
    """Up to `count` samples of one source: a seeded draw of count * oversample_ratio candidate records, taken in
    that order until `count` of them pass the min_token_length filter (each truncated to max_seq_len)."""
    wanted = math.ceil(count * spec.oversample_ratio)
    limit = source.max_samples or (wanted if source.streaming else None)
    pool = list(itertools.islice(_records(source), limit)) if count else []
    candidates = random.Random(f"{spec.seed}:{index}").sample(pool, min(wanted, len(pool)))
    samples: list[torch.Tensor] = []
    dropped = truncated = 0
    for where, record in candidates:
        if len(samples) == count:
            break
        ids = _token_ids(source, _text(source, where, record, tokenizer), tokenizer)
        truncated += len(ids) > max_seq_len
        if len(ids) < spec.min_token_length:
            dropped += 1
        else:
            samples.append(ids[:max_seq_len])
            progress.update()
    entry = {"source": source.label, "formatter": source.formatter, "weight": source.weight, "requested": count,
             "records": len(pool), "candidates": len(candidates), "samples": len(samples),
             "tokens": sum(len(s) for s in samples), "dropped_short": dropped, "truncated": truncated,
             "short_by": count - len(samples)}
    return samples, entry


def build_calibration_set(spec: CalibrationSpec, tokenizer, n_samples: int | None = None,
                          max_seq_len: int | None = None) -> CalibrationSet:
    """Draw the calibration samples of `spec`, mixed by weight and shuffled with its seed; `n_samples` and
    `max_seq_len` (the CLI's --calib_size and --max_seq_len) override the spec's max_samples and max_seq_len."""
    total = n_samples if n_samples is not None else spec.max_samples
    seq_len = max_seq_len if max_seq_len is not None else spec.max_seq_len
    _check(CalibrationSpec(spec.sources, total, seq_len, spec.min_token_length, spec.oversample_ratio, spec.seed))
    if seq_len < spec.min_token_length:
        raise LabsError(f"max_seq_len={seq_len} is below min_token_length={spec.min_token_length}, so every sample "
                        "would be dropped: lower min_token_length or raise max_seq_len.")
    counts = mix_counts([s.weight for s in spec.sources], total)
    with tqdm(total=total, desc="calibration samples", unit="sample", leave=False) as progress:
        drawn = [_draw(s, i, c, spec, tokenizer, seq_len, progress)
                 for i, (s, c) in enumerate(zip(spec.sources, counts))]
    samples = [ids for source_samples, _ in drawn for ids in source_samples]
    entries = [entry for _, entry in drawn]
    if not samples:
        raise LabsError(_all_filtered_message(spec, entries))
    random.Random(spec.seed).shuffle(samples)
    warnings = [f"calibration source '{e['source']}' gave {e['samples']} of its {e['requested']} samples "
                f"({e['records']} records, {e['candidates']} candidates, {e['dropped_short']} shorter than "
                f"min_token_length={spec.min_token_length}); the other sources were not topped up"
                for e in entries if e["short_by"]]
    return CalibrationSet(samples, entries, warnings)


def _all_filtered_message(spec: CalibrationSpec, entries: list[dict]) -> str:
    candidates = sum(e["candidates"] for e in entries)
    if not candidates:
        return "The calibration sources hold no records: check their files, splits and max_samples."
    return (f"Every calibration sample was filtered out: all {candidates} candidates were shorter than "
            f"min_token_length={spec.min_token_length} tokens. Lower min_token_length, or raise max_samples "
            "or oversample_ratio to draw more candidates.")
