"""Build results/REPORT.md from the labs' results files: one run per machine (CPU in results/, GPU in results/gpu/),
side by side where both measured the same thing, then each lab's headline numbers, tables and plots."""

from __future__ import annotations

import json
from pathlib import Path

from .files import write_atomic
from .results import COMMITTED_RESULTS, results_dir

__all__ = ["build_report", "committed_agreement", "load_run", "markdown_table", "run_times_table", "side_by_side"]

# sub-folder of results/ -> column name: each machine's default run, then the runs at the other profile
MACHINES = {"": "CPU", "gpu": "GPU", "gpu-quick": "GPU quick", "cpu-full": "CPU full"}


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


def markdown_table(rows: list[dict]) -> str:
    """A Markdown table from a list of dicts with the same keys (display with IPython's Markdown)."""
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_cell(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def load_run(folder: Path) -> dict:
    """A machine's run: its log (machine, profile, per-lab times) and its lab records, keyed by lab number."""
    log = json.loads((folder / "run_log.json").read_text()) if (folder / "run_log.json").is_file() else {}
    records = {}
    for path in sorted(folder.glob("[0-9][0-9]*.json")):
        record = json.loads(path.read_text())
        if "headline" in record:  # a lab's own record, not a side file such as 06_fp8_gpu.json
            records[record["lab"]] = record
    return {"log": log, "records": records}


def _perplexities(record: dict) -> dict[str, float]:
    """Every perplexity a lab reports, by its structured key: headline entries named 'perplexity ...' (not the
    percentages computed from them)."""
    return {k: v for k, v in record["headline"].items()
            if "perplexity" in k and not k.endswith("%") and isinstance(v, (int, float))}


def side_by_side(runs: dict[str, dict]) -> tuple[list[dict], list[dict]]:
    """(per-lab time and peak memory on each machine, perplexities measured under the same key on each machine)."""
    labs = sorted({lab for run in runs.values() for lab in run["records"]} | {lab for run in runs.values()
                                                                               for lab in run["log"].get("labs", {})})
    times = []
    for lab in labs:
        row = {"lab": lab}
        for name, run in runs.items():
            entry, record = run["log"].get("labs", {}).get(lab, {}), run["records"].get(lab, {})
            row[f"{name} s"] = entry.get("seconds", "")
            row[f"{name} peak GB"] = record.get("peak_memory_gb", "")
            row[f"{name} plan GB"] = record.get("memory_plan_gb", "")
        times.append(row)
    first, *others = runs
    ppl = []
    for lab in labs:
        base = _perplexities(runs[first]["records"].get(lab, {"headline": {}}))
        for key, value in base.items():
            row = {"lab": lab, "measure": key, first: round(value, 3)}
            for name in others:
                other = _perplexities(runs[name]["records"].get(lab, {"headline": {}})).get(key)
                row[name] = round(other, 3) if other is not None else ""
                row[f"{name} vs {first} %"] = round(100 * (other / value - 1), 2) if other is not None else ""
            ppl.append(row)
    return times, ppl


def committed_agreement(lab: str, root: Path | None = None) -> list[dict]:
    """The perplexities `lab` recorded in both the committed CPU and GPU-quick runs (the same tokens; float32 on the
    CPU, BF16 on the GPU) and their difference in %; empty where either run has no record of the lab."""
    root = Path(root) if root else COMMITTED_RESULTS
    runs = {name: load_run(root / sub) for sub, name in (("", "CPU"), ("gpu-quick", "GPU quick"))}
    if not all(lab in run["records"] for run in runs.values()):
        return []
    return [row for row in side_by_side(runs)[1]  # measures both records hold (a newer one may add its own)
            if row["lab"] == lab and isinstance(row["GPU quick vs CPU %"], (int, float))]


def _lab_section(record: dict, seconds: float | None, machine: str) -> list[str]:
    device = record["device"]
    capability = device["compute_capability"]
    where = device["name"] + (f" (compute capability {capability})" if capability else "")
    lines = [
        f"### Lab {record['lab']} · {record['title']} · {machine}",
        "",
        f"Profile **{record['profile']}** · model `{record['model']}` · corpus `{record['corpus']}` · "
        f"{device['device']}: {where} · models in {record.get('dtype', 'float32')} · {record['date_utc']} UTC"
        + (f" · ran in {seconds:.0f} s" if seconds is not None else "")
        + (f" · peak memory {record['peak_memory_gb']:.2f} GB" if "peak_memory_gb" in record else ""),
        "",
    ]
    if record["headline"]:
        lines += [markdown_table([{"measure": k, "value": v} for k, v in record["headline"].items()]), ""]
    for name, rows in record["tables"].items():
        lines += [f"**{name}**", "", markdown_table(rows), ""]
    prefix = next((f"{sub}/" for sub, name in MACHINES.items() if name == machine and sub), "")
    lines += [f"![{fig}]({prefix}{fig})" for fig in record["figures"]]
    return lines + [""]


def _record_text(record: dict) -> str:
    """The text a record's corpus stood for. Records made before the embedded corpora were pinned read them from the
    running Python's standard library, which is the snapshot's text when that Python is the snapshot's release."""
    from .data import EMBEDDED_CORPORA, embedded_snapshot

    if record.get("corpus_text"):
        return record["corpus_text"]
    python = record["versions"]["python"]
    if record["corpus"] not in EMBEDDED_CORPORA:
        return record["corpus"]
    return f"CPython {python} snapshot" if python == embedded_snapshot()["python"] else \
        f"Python {python} standard library"


def _corpus_text(run: dict) -> str:
    """The corpus texts of a run's records."""
    return "; ".join(sorted({_record_text(r) for r in run["records"].values()}))


def _text_control(runs: dict[str, dict], ppl: list[dict]) -> str:
    """Where two runs of one profile read different text: the gap of the row that only text can move (llama.cpp F16
    runs on the CPU of every machine, on the same file)."""
    first, *others = runs
    row = next((r for r in ppl if r["measure"] == "perplexity llama.cpp F16"), None)
    profile = runs[first]["log"].get("profile")
    differ = [name for name in others if _corpus_text(runs[name]) != _corpus_text(runs[first])
              and runs[name]["log"].get("profile") == profile]
    notes = [f" {name} read different text ({_corpus_text(runs[name])} vs {_corpus_text(runs[first])}): its llama.cpp "
             f"F16 perplexity, the same engine and GGUF file on each machine's CPU, differs by "
             f"{row[f'{name} vs {first} %']} %; with engine and file the same, only the text moves it that far."
             for name in differ if row and row.get(name) != ""]
    return "".join(notes)


# Minutes a learner spends reading each lab and doing its exercises: estimates, not measurements (STUDY_GUIDE.md)
READING_MINUTES = {"01": 40, "02": 50, "03": 50, "04": 45, "05": 40, "06": 45, "07": 40, "08": 45, "09": 45, "10": 45,
                   "11": 45}


def rerun_note(log: dict, lab: str) -> str:
    """"rerun alone" or "rerun" where `lab` was executed again after its run and joined the run's log, else ""."""
    rerun = next((r for r in reversed(log.get("reruns", [])) if lab in r["labs"]), None)
    if not rerun:
        return ""
    return "rerun alone" if rerun["jobs"] == 1 or len(rerun["labs"]) == 1 else "rerun"


def run_times_table(root: Path | None = None) -> str:
    """STUDY_GUIDE.md's table of run times per lab, in minutes, read from each machine's committed run log, beside
    the reading estimates: `python -c "from labs_lib.report import run_times_table; print(run_times_table())"`."""
    root = Path(root) if root else COMMITTED_RESULTS
    columns = {}
    for sub in ("", "gpu"):  # each machine's default run: quick on the CPU, full on the GPU
        log = load_run(root / sub)["log"] if (root / sub).is_dir() else {}
        if log.get("labs"):
            jobs = log.get("jobs", 1)
            at_a_time = "one lab at a time" if jobs == 1 else f"{jobs} labs at a time"
            columns[f"{MACHINES[sub]} run ({log['profile']}, {log['machine']['name']}, {at_a_time}) min"] = log
    rows = []
    for lab, reading in READING_MINUTES.items():
        row = {"lab": lab}
        for column, log in columns.items():
            entry = log["labs"].get(lab)
            note = rerun_note(log, lab)
            note = f" ({note})" if note else ""
            row[column] = "" if not entry else (f"{entry['seconds'] / 60:.1f}" if entry["status"] == "ok"
                                                else f"{entry['status']} after {entry['seconds'] / 60:.1f}") + note
        rows.append(row | {"reading and exercises min (estimate)": reading})
    return markdown_table(rows)


def build_report(root: Path | None = None) -> Path:
    """Render every machine's run under `root` (default: results/) into root/REPORT.md."""
    root = Path(root) if root else results_dir()
    root = root.parent if root.name in MACHINES and root.name else root
    runs = {name: load_run(root / sub) for sub, name in MACHINES.items() if (root / sub).is_dir()}
    runs = {name: run for name, run in runs.items() if run["records"]}
    if not runs:
        raise FileNotFoundError(f"no lab results in {root}: run the labs first (make run)")
    versions = next(iter(runs["CPU" if "CPU" in runs else next(iter(runs))]["records"].values()))["versions"]
    lines = ["# Spark Quantization Labs · results", "",
             "Every number below was computed by the labs in `notebooks/` on the machine named in each section; "
             "nothing is typed in by hand. Each machine's section is one run of the main job, `make run` or "
             "`python -m labs_lib.run_labs` (the latter for several labs at a time): quick profile on a CPU, full on "
             "a GPU.", "",
             "Libraries (CPU run): " + ", ".join(f"{k} {v}" for k, v in versions.items()), "", "## The runs", ""]
    lines += [markdown_table([{"machine": name, "device": run["log"].get("machine", {}).get("name", ""),
                               "profile": run["log"].get("profile", ""),
                               "started (UTC)": run["log"].get("started_utc", ""),
                               "labs at a time": run["log"].get("jobs", 1),
                               "lab time s": round(sum(v["seconds"] for v in run["log"].get("labs", {}).values())),
                               "run wall s": run["log"].get("wall_s", ""),
                               "corpus text": _corpus_text(run),
                               "reruns": "; ".join(f"{', '.join(r['labs'])} at {r['started_utc']}"
                                                   for r in run["log"].get("reruns", [])),
                               "labs ok": sum(v["status"] == "ok" for v in run["log"].get("labs", {}).values())}
                              for name, run in runs.items()]), ""]
    times, ppl = side_by_side(runs)
    lines += ["## Time and peak memory per lab", "", markdown_table(times), ""]
    if len(runs) > 1:
        lines += ["## The same perplexities on each machine", "",
                  "Profiles differ (CPU quick, GPU full: more calibration and evaluation tokens), and so do dtypes "
                  "(float32 on the CPU, BF16 on the GPU). The GPU-quick run uses the CPU's profile, so it evaluates "
                  "the same tokens when both runs read the same corpus text (column *corpus text* above)."
                  + _text_control(runs, ppl),
                  "", markdown_table(ppl), ""]
    for name, run in runs.items():
        lines += [f"## {name} run", ""]
        logged = run["log"].get("labs", {})
        failed = {lab: entry for lab, entry in logged.items() if entry.get("status", "ok") != "ok"}
        lines += [f"Lab {lab}: {entry['status']} after {entry['seconds']} s; no record from this run." for lab, entry
                  in sorted(failed.items())] + ([""] if failed else [])
        for lab, record in run["records"].items():
            if lab not in failed:  # a failed lab's file, if any, is an older run's
                lines += _lab_section(record, logged.get(lab, {}).get("seconds"), name)
    path = root / "REPORT.md"
    write_atomic(path, "\n".join(lines).encode())
    return path
