"""Profiles and lab header, results files and the report, the hardware note."""

import importlib.metadata
import json

import pytest
import torch

from labs_lib.errors import LabsError
from labs_lib.lab import PROFILES, setup_lab


def test_setup_lab_fills_sizes_from_profile(monkeypatch, capsys):
    monkeypatch.delenv("LABS_PROFILE", raising=False)
    cfg = setup_lab("99", "test", profile="quick", eval_tokens=1234)
    assert cfg.eval_tokens == 1234 and cfg.calib_samples == PROFILES["quick"]["calib_samples"]
    out = capsys.readouterr().out
    assert "profile  quick" in out and "model" in out and "corpus" in out and "FP4" in out
    with pytest.raises(LabsError, match="Unknown profile 'huge'"):
        setup_lab("99", "test", profile="huge")


def test_a_lab_that_does_not_fit_is_refused_before_loading(monkeypatch):
    from labs_lib import lab

    monkeypatch.setattr(lab, "default_device", lambda: "cpu")
    cfg = setup_lab("03", "test", profile="quick")
    plan = cfg.memory_plan
    # MemAvailable excludes what this process already holds, which the plan counts: enough for the rest fits
    monkeypatch.setattr(lab, "available_memory_bytes", lambda device: plan["total_bytes"] - plan["fixed_bytes"] // 2)
    lab.check_lab_fits(cfg)
    monkeypatch.setattr(lab, "available_memory_bytes", lambda device: plan["total_bytes"] - plan["fixed_bytes"] * 2)
    with pytest.raises(LabsError, match=r"Lab 03 needs about \d+ GB .* Choose a smaller model \(LABS_MODEL\)"):
        lab.check_lab_fits(cfg)


def test_results_and_report(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from labs_lib.report import build_report
    from labs_lib.results import save_figure, save_results

    monkeypatch.setenv("LABS_RESULTS_DIR", str(tmp_path))
    cfg = setup_lab("98", "Report test", profile="quick")
    fig, ax = plt.subplots()
    ax.plot([1, 2])
    save_figure(fig, cfg, "line")
    save_results(cfg, {"perplexity": 12.5}, tables={"rows": [{"a": 1}]})
    record = json.loads((tmp_path / "98.json").read_text())
    assert record["headline"] == {"perplexity": 12.5} and record["figures"] == ["figures/98-line.png"]
    assert record["versions"]["torch"] == importlib.metadata.version("torch") and record["profile"] == "quick"
    report = build_report(tmp_path).read_text()
    assert "Lab 98 · Report test" in report and "| perplexity | 12.5 |" in report and "![figures/98-line.png]" in report
    assert not list(tmp_path.glob(".*"))  # no temporary files left


@pytest.mark.parametrize("capability, fp8, fp4", [((12, 1), True, True),  # GB10 (DGX Spark)
                                                  ((10, 0), True, True),  # B200
                                                  ((11, 0), True, True),  # Jetson Thor
                                                  ((9, 0), True, False),  # H100: FP8, no FP4
                                                  ((8, 9), True, False),  # Ada
                                                  ((8, 0), False, False)])  # A100
def test_fp4_and_fp8_status_follow_the_compute_capability(monkeypatch, capability, fp8, fp4):
    from labs_lib import hardware

    monkeypatch.delenv("LABS_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Some GPU")
    info = hardware.device_info()
    assert (info["native_fp8"], info["native_fp4"]) == (fp8, fp4)
    assert info["compute_capability"] == f"{capability[0]}.{capability[1]}"
    assert hardware.fp4_status().startswith("Native FP4: yes" if fp4 else "Native FP4: no")
    assert ("emulated" in hardware.fp4_status()) != fp4
    assert hardware.fp8_status().startswith("Native FP8: yes" if fp8 else "Native FP8: no")


def test_fp4_status_on_a_cpu_says_emulated(monkeypatch):
    from labs_lib import hardware

    monkeypatch.delenv("LABS_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert hardware.device_info()["device"] == "cpu"
    assert "no on this CPU" in hardware.fp4_status() and "emulated" in hardware.fp4_status()


def test_atomic_writes_leave_nothing_half_written(tmp_path):
    from labs_lib.files import atomic_folder, atomic_path, write_atomic

    write_atomic(tmp_path / "a.json", b"{}")
    assert (tmp_path / "a.json").read_bytes() == b"{}"
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "a.json") as tmp:
            assert tmp.suffix == ".json" and tmp.parent == tmp_path and tmp.name.startswith(".")
            tmp.write_bytes(b'{"half":')
            raise RuntimeError("writer failed half way")
    assert (tmp_path / "a.json").read_bytes() == b"{}"  # the old version stays whole
    with pytest.raises(RuntimeError):
        with atomic_folder(tmp_path / "export") as tmp:
            (tmp / "model.safetensors").write_bytes(b"partial")
            raise RuntimeError("export failed half way")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
    with atomic_folder(tmp_path / "export") as tmp:
        (tmp / "done").write_text("ok")
    assert (tmp_path / "export" / "done").read_text() == "ok"


def test_report_puts_machines_side_by_side(tmp_path, monkeypatch):
    from labs_lib.report import build_report, side_by_side, load_run
    from labs_lib.results import save_results

    for sub, ppl, seconds in (("", 12.5, 40.0), ("gpu", 12.6, 4.0)):
        folder = tmp_path / sub
        folder.mkdir(exist_ok=True)
        monkeypatch.setenv("LABS_RESULTS_DIR", str(folder))
        cfg = setup_lab("98", "Report test", profile="quick")
        save_results(cfg, {"perplexity reference": ppl, "perplexity vs llama.cpp %": 0.5})  # a percentage: not compared
        log = {"profile": "quick", "labs": {"98": {"status": "ok", "seconds": seconds}}}
        (folder / "run_log.json").write_text(json.dumps(log))
    times, ppl = side_by_side({"CPU": load_run(tmp_path), "GPU": load_run(tmp_path / "gpu")})
    assert [times[0][k] for k in ("lab", "CPU s", "GPU s")] == ["98", 40.0, 4.0]
    assert times[0]["CPU peak GB"] > 0 and times[0]["GPU plan GB"] > 0
    assert ppl == [{"lab": "98", "measure": "perplexity reference", "CPU": 12.5, "GPU": 12.6, "GPU vs CPU %": 0.8}]
    report = build_report(tmp_path / "gpu").read_text()  # a GPU run writes the one report of both machines
    assert "## CPU run" in report and "## GPU run" in report and "![figures" not in report
    failed = {"profile": "quick", "labs": {"98": {"status": "failed: PapermillExecutionError", "seconds": 3.0}}}
    (tmp_path / "gpu" / "run_log.json").write_text(json.dumps(failed))
    report = build_report(tmp_path / "gpu").read_text()  # the lab's file is an older run's: named failed, not shown
    assert "Lab 98: failed: PapermillExecutionError after 3.0 s; no record from this run." in report
    assert report.count("### Lab 98") == 1  # the CPU run's section only


def test_committed_agreement_compares_the_cpu_and_gpu_quick_records(tmp_path, monkeypatch):
    from labs_lib.report import committed_agreement
    from labs_lib.results import save_results

    for sub, ppl in (("", 20.0), ("gpu-quick", 19.5)):
        folder = tmp_path / sub
        folder.mkdir(exist_ok=True)
        monkeypatch.setenv("LABS_RESULTS_DIR", str(folder))
        newer = {"perplexity added later": 21.0} if sub == "" else {}  # a measure only the newer record has
        save_results(setup_lab("98", "Agreement test", profile="quick"), {"perplexity W4A4": ppl} | newer)
    assert committed_agreement("98", tmp_path) == [{"lab": "98", "measure": "perplexity W4A4", "CPU": 20.0,
                                                    "GPU quick": 19.5, "GPU quick vs CPU %": -2.5}]
    assert committed_agreement("97", tmp_path) == []  # a lab one run lacks: nothing to compare


def test_report_names_runs_that_read_different_text(tmp_path, monkeypatch):
    from labs_lib.report import build_report
    from labs_lib.results import save_results

    for sub, ppl in (("", 12.86), ("gpu-quick", 12.65)):
        folder = tmp_path / sub
        folder.mkdir(exist_ok=True)
        monkeypatch.setenv("LABS_RESULTS_DIR", str(folder))
        cfg = setup_lab("98", "Report test", profile="quick")
        save_results(cfg, {"perplexity llama.cpp F16": ppl})
        (folder / "run_log.json").write_text(json.dumps({"profile": "quick", "labs": {"98": {"status": "ok",
                                                                                              "seconds": 1.0}}}))
    assert json.loads((tmp_path / "98.json").read_text())["corpus_text"].startswith("CPython 3.")
    assert "read different text" not in build_report(tmp_path).read_text()  # both read the pinned snapshot
    record = json.loads((tmp_path / "gpu-quick" / "98.json").read_text())
    record = {k: v for k, v in record.items() if k != "corpus_text"}  # a record from before the pin, made on a
    (tmp_path / "gpu-quick" / "98.json").write_text(json.dumps(record | {"versions": {"python": "3.12.3"}}))  # 3.12
    report = build_report(tmp_path).read_text()
    assert "GPU quick read different text" in report and "differs by -1.63 %" in report


def test_study_guide_run_times_are_the_committed_run_logs():
    from pathlib import Path

    from labs_lib.report import run_times_table

    guide = (Path(__file__).resolve().parents[1] / "STUDY_GUIDE.md").read_text()
    table = run_times_table()
    assert "CPU run (quick" in table and "GPU run (full" in table
    assert table in guide  # regenerate with: python -c "from labs_lib.report import run_times_table; ..."
