"""The main job's runner: labs run side by side are logged each with its own status; a failure fails the run."""

import json

import nbformat

from labs_lib import run_labs


def _notebook(path, source: str) -> None:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)])
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nbformat.write(nb, path)


def test_jobs_run_side_by_side_and_log_each_lab(tmp_path, monkeypatch):
    notebooks, results = tmp_path / "notebooks", tmp_path / "results"
    notebooks.mkdir()
    _notebook(notebooks / "01_ok.ipynb", "print(6 * 7)")
    _notebook(notebooks / "02_broken.ipynb", "raise ValueError('a broken lab')")
    monkeypatch.setattr(run_labs, "NOTEBOOKS", notebooks)
    monkeypatch.setattr(run_labs, "machine_folders", lambda device, profile: (results, tmp_path / "executed"))
    monkeypatch.setattr(run_labs, "build_report", lambda: "no report in this test")
    for name in ("LABS_PROFILE", "LABS_RESULTS_DIR"):  # run() sets them for its kernels: restored after the test
        monkeypatch.setenv(name, "")

    assert run_labs.run("quick", None, None, jobs=2) == 1
    log = json.loads((results / "run_log.json").read_text())
    assert log["jobs"] == 2 and log["wall_s"] > 0
    assert log["labs"]["01"]["status"] == "ok"
    assert log["labs"]["02"]["status"] == "failed: PapermillExecutionError"
    executed = nbformat.read(tmp_path / "executed" / "01_ok.ipynb", as_version=4)
    assert executed.cells[0].outputs[0]["text"] == "42\n"


def test_longest_first_puts_new_labs_then_the_slowest_first(tmp_path):
    notebooks = [tmp_path / f"{lab}_x.ipynb" for lab in ("01", "02", "03", "04")]
    last_log = {"labs": {"01": {"seconds": 20.0}, "02": {"seconds": 300.0}, "03": {"seconds": 90.0}}}
    order = [nb.name[:2] for nb in run_labs.longest_first(notebooks, last_log)]
    assert order == ["04", "02", "03", "01"]
    assert run_labs.longest_first(notebooks, {}) == notebooks  # no log: the lab order
