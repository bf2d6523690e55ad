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


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_lab_number_results_file_and_exercises_match_the_notebook(path):
    import re

    from labs_lib.exercises import EXERCISES
    from labs_lib.results import RESULT_FILES

    lab = path.name[:2]
    source = "\n".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code")
    assert re.search(rf'setup_lab\("{lab}"', source), "setup_lab is not called with the notebook's own number"
    assert RESULT_FILES.get(lab, "").startswith(f"{lab}_"), "no results file name for this lab in RESULT_FILES"
    asked = set(re.findall(r'\bask\("(\w+)"\)', source))
    assert asked and {name: EXERCISES[name].lab for name in asked} == dict.fromkeys(asked, lab)
