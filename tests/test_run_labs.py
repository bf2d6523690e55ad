"""The main job's runner: labs run side by side are logged each with its own status; a failure fails the run."""

import json
import os

import nbformat
import pytest

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
    for name in ("LABS_THREADS", "OMP_NUM_THREADS"):  # unset for run(); whatever run() sets is undone after the test
        monkeypatch.setenv(name, "1")  # (delenv alone records nothing to undo when the variable is absent: run()'s
        monkeypatch.delenv(name)  # share of the cores would leak into every later test, the notebooks' kernels too)

    assert run_labs.run("quick", None, None, jobs=2) == 1
    log = json.loads((results / "run_log.json").read_text())
    assert log["jobs"] == 2 and log["wall_s"] > 0
    assert log["cpu_threads_per_lab"] == max(1, (os.cpu_count() or 1) // 2)  # each lab's share of the cores
    assert log["labs"]["01"]["status"] == "ok"
    assert log["labs"]["02"]["status"] == "failed: PapermillExecutionError"
    executed = nbformat.read(tmp_path / "executed" / "01_ok.ipynb", as_version=4)
    assert executed.cells[0].outputs[0]["text"] == "42\n"
    # a rerun of one lab on another machine joins the run, names its machine and keeps the run's
    monkeypatch.setattr(run_labs, "device_info", lambda: {"device": "cpu", "name": "another machine"})
    assert run_labs.run("quick", None, ["01"], jobs=1) == 0
    rerun = json.loads((results / "run_log.json").read_text())
    assert rerun["machine"] == log["machine"] and rerun["labs"]["02"] == log["labs"]["02"]
    assert rerun["reruns"][0]["labs"] == ["01"] and rerun["reruns"][0]["machine"] == "another machine"
    assert rerun["jobs"] == 2 and rerun["cpu_threads_per_lab"] == log["cpu_threads_per_lab"]  # the run's share


def test_default_jobs_runs_four_embedded_labs_on_a_gpu_and_one_elsewhere():
    from labs_lib.models import EMBEDDED

    h200 = 140e9  # free bytes of a GPU
    assert run_labs.default_jobs("cuda", None, h200) == run_labs.default_jobs("cuda", EMBEDDED, h200) == 4
    assert run_labs.default_jobs("cuda", None, 24e9) == 2  # the largest lab plans about 11.4 GB
    assert run_labs.default_jobs("cuda", None, 8e9) == 1
    assert run_labs.default_jobs("cuda", "meta-llama/Llama-3.1-8B-Instruct", h200) == 1
    assert run_labs.default_jobs("cpu", None) == 1


def test_longest_first_puts_new_labs_then_the_slowest_first(tmp_path):
    notebooks = [tmp_path / f"{lab}_x.ipynb" for lab in ("01", "02", "03", "04")]
    last_log = {"labs": {"01": {"seconds": 20.0}, "02": {"seconds": 300.0}, "03": {"seconds": 90.0}}}
    order = [nb.name[:2] for nb in run_labs.longest_first(notebooks, last_log)]
    assert order == ["04", "02", "03", "01"]
    assert run_labs.longest_first(notebooks, {}) == notebooks  # no log: the lab order


def test_cpu_threads_reads_the_share_and_refuses_nonsense(monkeypatch):
    from labs_lib.errors import LabsError
    from labs_lib.hardware import cpu_threads

    monkeypatch.delenv("LABS_THREADS", raising=False)
    assert cpu_threads() == os.cpu_count()
    monkeypatch.setenv("LABS_THREADS", "3")
    assert cpu_threads() == 3
    monkeypatch.setenv("LABS_THREADS", "0")
    with pytest.raises(LabsError, match="LABS_THREADS='0'"):
        cpu_threads()
