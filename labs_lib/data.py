"""Calibration and evaluation text: wikitext-2 from the Hub, or one of two embedded corpora on disk.

The embedded corpora are Python's own texts, so they work with no network at all: `pydoc_data.topics` (the English
text of `help()` topics), split by topic, and the source code of a fixed list of standard-library modules, split by
module, each into disjoint calibration and evaluation parts. Both are read from a snapshot of one CPython release
(embedded_corpora.json.gz), not from the running Python: the texts change between releases (3.11 and 3.12 differ),
and every machine must evaluate the same tokens for their perplexities to be comparable.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import LabsError
from .network import hub_reachable

EMBEDDED_CORPUS = "embedded:python-reference"
STDLIB_SOURCE = "embedded:python-stdlib-source"
WIKITEXT = "wikitext-2-raw-v1"
# pure-Python modules present from Python 3.10 on, in name order; every third one is held out for evaluation
STDLIB_MODULES = ("base64", "bisect", "calendar", "colorsys", "contextlib", "copy", "csv", "dataclasses", "difflib",
                  "fnmatch", "fractions", "functools", "gettext", "heapq", "ipaddress", "json.decoder", "json.encoder",
                  "operator", "pprint", "queue", "random", "shlex", "statistics", "string", "textwrap", "tokenize",
                  "uuid", "weakref")
EMBEDDED_CORPORA = {
    EMBEDDED_CORPUS: "English prose: the help() topics of the Python reference manual (pydoc_data.topics).",
    STDLIB_SOURCE: f"Python code: the source files of {len(STDLIB_MODULES)} standard-library modules (a domain far "
                   "from prose).",
}

__all__ = ["Corpus", "EMBEDDED_CORPUS", "STDLIB_SOURCE", "EMBEDDED_CORPORA", "STDLIB_MODULES", "WIKITEXT",
           "embedded_snapshot", "default_corpus", "embedded_documents", "load_corpus", "calibration_batches",
           "evaluation_tokens", "tokenize"]


@dataclass(frozen=True)
class Corpus:
    name: str
    calibration: str
    evaluation: str


def default_corpus() -> str:
    """$LABS_CORPUS if set; else wikitext-2 when the Hub is reachable, else the embedded corpus."""
    return os.environ.get("LABS_CORPUS", "").strip() or (WIKITEXT if hub_reachable() else EMBEDDED_CORPUS)


SNAPSHOT = Path(__file__).with_name("embedded_corpora.json.gz")


@functools.cache
def embedded_snapshot() -> dict:
    """The pinned texts: {"python": version, "topics": pydoc_data.topics, "stdlib": {module: source}}."""
    return json.loads(gzip.decompress(SNAPSHOT.read_bytes()))


def _python_reference() -> tuple[list[str], list[str]]:
    topics = embedded_snapshot()["topics"]
    names = sorted(topics)
    calibration = [topics[n].strip() for i, n in enumerate(names) if i % 3 != 2]
    # every third topic (in name order) is held out for evaluation; some topics repeat paragraphs of
    # others, so evaluation keeps only paragraphs that calibration never saw
    seen = {p.strip() for p in "\n\n".join(calibration).split("\n\n")}
    held_out = ([p.strip() for p in topics[n].split("\n\n") if p.strip() not in seen]
                for i, n in enumerate(names) if i % 3 == 2)
    return calibration, ["\n\n".join(kept) for kept in held_out if kept]


def _stdlib_source() -> tuple[list[str], list[str]]:
    texts = [embedded_snapshot()["stdlib"][m] for m in STDLIB_MODULES]
    return ([t for i, t in enumerate(texts) if i % 3 != 2], [t for i, t in enumerate(texts) if i % 3 == 2])


def embedded_documents(name: str) -> tuple[list[str], list[str]]:
    """The calibration and evaluation documents (topics or source files) of an embedded corpus."""
    if name == EMBEDDED_CORPUS:
        return _python_reference()
    if name == STDLIB_SOURCE:
        return _stdlib_source()
    raise LabsError(f"Unknown embedded corpus '{name}': use one of {', '.join(EMBEDDED_CORPORA)}.")


def _wikitext() -> Corpus:
    if not hub_reachable():
        raise LabsError(f"{WIKITEXT} needs the Hugging Face Hub, which cannot be reached: unset LABS_CORPUS to use "
                        "the embedded corpus.")
    from datasets import load_dataset

    ds = load_dataset("wikitext", WIKITEXT)
    return Corpus(WIKITEXT, "".join(ds["train"]["text"]), "".join(ds["test"]["text"]))


def load_corpus(name: str | None = None) -> Corpus:
    """A corpus by name: one of EMBEDDED_CORPORA, or wikitext-2 (needs the Hub); None gives default_corpus()."""
    name = name or default_corpus()
    if name in EMBEDDED_CORPORA:
        calibration, evaluation = embedded_documents(name)
        return Corpus(name, "\n\n".join(calibration), "\n\n".join(evaluation))
    if name in (WIKITEXT, "wikitext", "wikitext2"):
        return _wikitext()
    raise LabsError(f"Unknown corpus '{name}': use one of {', '.join(EMBEDDED_CORPORA)} or '{WIKITEXT}'.")


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of `text` without special tokens (no warning for texts longer than the model context)."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_batches(tokenizer, corpus: Corpus, n_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """`n_samples` windows of `seq_len` tokens at seeded random places of the calibration text."""
    ids = tokenize(tokenizer, corpus.calibration)
    if len(ids) < seq_len + 1:
        raise LabsError(f"The calibration text has {len(ids)} tokens, fewer than seq_len={seq_len}.")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len, (n_samples,), generator=g)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def evaluation_tokens(tokenizer, corpus: Corpus, n_tokens: int) -> torch.Tensor:
    """The first `n_tokens` tokens of the evaluation text (the same tokens for every variant)."""
    ids = tokenize(tokenizer, corpus.evaluation)
    if len(ids) < n_tokens:
        raise LabsError(f"The evaluation text has {len(ids)} tokens; ask for at most that many.")
    return ids[:n_tokens]
