"""Build results/REPORT.md from the labs' results files: headline numbers, tables, plots, run times; and the
Markdown tables the labs display."""

from __future__ import annotations

import json
from pathlib import Path

from .files import write_atomic
from .results import results_dir

__all__ = ["build_report", "markdown_table"]


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


def _lab_section(record: dict, seconds: float | None) -> list[str]:
    device = record["device"]
    capability = device["compute_capability"]
    where = device["name"] + (f" (compute capability {capability})" if capability else "")
    lines = [
        f"## Lab {record['lab']} · {record['title']}",
        "",
        f"Profile **{record['profile']}** · model `{record['model']}` · corpus `{record['corpus']}` · "
        f"{device['device']}: {where} · {record['date_utc']} UTC"
        + (f" · ran in {seconds:.0f} s" if seconds is not None else ""),
        "",
    ]
    if record["headline"]:
        lines += [markdown_table([{"measure": k, "value": v} for k, v in record["headline"].items()]), ""]
    for name, rows in record["tables"].items():
        lines += [f"**{name}**", "", markdown_table(rows), ""]
    lines += [f"![{fig}]({fig})" for fig in record["figures"]]
    return lines + [""]


def build_report(folder: Path | None = None) -> Path:
    """Render every results/<lab>.json into results/REPORT.md (run times from run_log.json)."""
    folder = Path(folder) if folder else results_dir()
    records = [json.loads(p.read_text()) for p in sorted(folder.glob("[0-9][0-9]*.json"))]
    records = [r for r in records if "headline" in r]  # a lab's own record, not a side file such as 06_fp8_gpu.json
    run_log = json.loads((folder / "run_log.json").read_text()) if (folder / "run_log.json").is_file() else {}
    if not records:
        raise FileNotFoundError(f"no lab results in {folder}: run the labs first (make run)")
    versions = records[-1]["versions"]
    lines = [
        "# Spark Quantization Labs · results",
        "",
        "Every number below was computed by the labs in `notebooks/` on the machine named in each section; "
        "nothing is typed in by hand. Rebuild with `make run`.",
        "",
        "Libraries: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        "",
    ]
    if run_log:
        lines += [markdown_table([{"lab": k, **v} for k, v in run_log.items()]), ""]
    for record in records:
        lines += _lab_section(record, run_log.get(record["lab"], {}).get("seconds"))
    path = folder / "REPORT.md"
    write_atomic(path, "\n".join(lines).encode())
    return path
