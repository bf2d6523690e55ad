"""Committed notebooks carry clean outputs: no cell holds a flood of progress-bar fragments."""

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
MAX_STREAMS = 20


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_cell_has_more_than_20_stream_outputs(path):
    cells = json.loads(path.read_text())["cells"]
    counts = {i: sum(o["output_type"] == "stream" for o in c.get("outputs", [])) for i, c in enumerate(cells)}
    assert NOTEBOOKS and not {i: n for i, n in counts.items() if n > MAX_STREAMS}, f"cells with > {MAX_STREAMS} streams"
