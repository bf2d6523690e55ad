"""Load the documents of the local tasks from the folder lm-eval passes as metadata (`data_dir`)."""

import json
from pathlib import Path

from datasets import Dataset, DatasetDict


def _load(data_dir: str, name: str) -> DatasetDict:
    rows = [json.loads(line) for line in (Path(data_dir) / f"{name}.jsonl").read_text().splitlines()]
    return DatasetDict({"test": Dataset.from_list(rows)})


def perplexity_documents(data_dir: str, **_) -> DatasetDict:
    return _load(data_dir, "labs_ppl")


def multiple_choice_items(data_dir: str, **_) -> DatasetDict:
    return _load(data_dir, "labs_mc")

