"""Calibration and evaluation text: wikitext-2 from the Hub, or the Python reference manual on disk.

The embedded corpus is `pydoc_data.topics` from the standard library (the text of `help()` topics),
split by topic into disjoint calibration and evaluation parts, so it works with no network at all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .errors import LabsError
from .network import hub_reachable

EMBEDDED_CORPUS = "embedded:python-reference"
WIKITEXT = "wikitext-2-raw-v1"

__all__ = ["Corpus", "EMBEDDED_CORPUS", "WIKITEXT", "default_corpus", "load_corpus", "calibration_batches",
           "evaluation_tokens", "tokenize"]


@dataclass(frozen=True)
class Corpus:
    name: str
    calibration: str
    evaluation: str


def default_corpus() -> str:
    """$LABS_CORPUS if set; else wikitext-2 when the Hub is reachable, else the embedded corpus."""
    return os.environ.get("LABS_CORPUS", "").strip() or (WIKITEXT if hub_reachable() else EMBEDDED_CORPUS)


def _python_reference() -> Corpus:
    from pydoc_data.topics import topics

    names = sorted(topics)
    # every third topic (in name order) is held out for evaluation; some topics repeat paragraphs of
    # others, so evaluation keeps only paragraphs that calibration never saw
    calibration = "\n\n".join(topics[n].strip() for i, n in enumerate(names) if i % 3 != 2)
    seen = {p.strip() for p in calibration.split("\n\n")}
    evaluation = [p.strip() for i, n in enumerate(names) if i % 3 == 2
                  for p in topics[n].split("\n\n") if p.strip() not in seen]
    return Corpus(EMBEDDED_CORPUS, calibration, "\n\n".join(evaluation))


def _wikitext() -> Corpus:
    if not hub_reachable():
        raise LabsError(f"{WIKITEXT} needs the Hugging Face Hub, which cannot be reached: unset LABS_CORPUS to use "
                        "the embedded corpus.")
    from datasets import load_dataset

    ds = load_dataset("wikitext", WIKITEXT)
    return Corpus(WIKITEXT, "".join(ds["train"]["text"]), "".join(ds["test"]["text"]))


def load_corpus(name: str | None = None) -> Corpus:
    name = name or default_corpus()
    if name == EMBEDDED_CORPUS:
        return _python_reference()
    if name in (WIKITEXT, "wikitext", "wikitext2"):
        return _wikitext()
    raise LabsError(f"Unknown corpus '{name}': use '{EMBEDDED_CORPUS}' or '{WIKITEXT}'.")


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
