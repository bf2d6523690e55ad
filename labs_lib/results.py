"""Each lab's measured numbers and plots, written to results/ for the report (never typed by hand)."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import io
import json
import os
import platform
from pathlib import Path

from .files import write_atomic
from .hardware import device_info, peak_memory_bytes
from .lab import LabConfig

LIBRARIES = ("torch", "transformers", "nvidia-modelopt", "gptqmodel", "gguf", "llama_cpp_python", "torchao",
             "transformer-engine", "lm_eval", "bitsandbytes", "ml-dtypes", "numpy")
RESULT_FILES = {"01": "01_data_types", "02": "02_nvfp4", "03": "03_gptq", "04": "04_awq", "05": "05_gguf",
                "06": "06_fp8", "07": "07_quality", "08": "08_engine",
                "09": "09_byom", "10": "10_kv_smoothquant", "11": "11_qat_mixed"}

__all__ = ["COMMITTED_RESULTS", "results_dir", "save_figure", "save_results", "library_versions", "recorded"]


# the records committed with this repository (what each lab's header and the report read), wherever a run writes
COMMITTED_RESULTS = Path(__file__).resolve().parents[1] / "results"


def results_dir() -> Path:
    """$LABS_RESULTS_DIR, else results/ in this repository (where labs_lib is installed editable)."""
    if os.environ.get("LABS_RESULTS_DIR"):
        path = Path(os.environ["LABS_RESULTS_DIR"])
    else:
        repo = Path(__file__).resolve().parents[1]
        path = repo / "results" if (repo / "notebooks").is_dir() else Path.cwd() / "results"
    path.mkdir(parents=True, exist_ok=True)
    return path


def recorded(file_name: str) -> dict | None:
    """A measurement taken on other hardware (e.g. a GPU record): from the results folder, else the copy
    committed in this repository's results/; None if neither exists."""
    for folder in (results_dir(), COMMITTED_RESULTS):
        if (folder / file_name).is_file():
            return json.loads((folder / file_name).read_text())
    return None


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def save_figure(fig, cfg: LabConfig, name: str) -> Path:
    """Save a matplotlib figure as results/figures/<lab>-<name>.png and remember it for the report."""
    folder = results_dir() / "figures"
    folder.mkdir(exist_ok=True)
    path = folder / f"{cfg.lab}-{name}.png"
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    write_atomic(path, buffer.getvalue())
    rel = f"figures/{path.name}"
    if rel not in cfg.figures:
        cfg.figures.append(rel)
    return path


def corpus_text(corpus: str) -> str:
    """Which text a corpus name stood for in this run: the pinned CPython snapshot of the embedded corpora, or the
    named dataset (two runs' perplexities are comparable only over the same text)."""
    from .data import EMBEDDED_CORPORA, embedded_snapshot

    return f"CPython {embedded_snapshot()['python']} snapshot" if corpus in EMBEDDED_CORPORA else corpus


def save_results(cfg: LabConfig, headline: dict, tables: dict[str, list[dict]] | None = None) -> Path:
    """results/<lab>_<topic>.json (e.g. 03_gptq.json): what ran (model, corpus, profile, device, versions) and what
    it measured."""
    record = {
        "lab": cfg.lab,
        "title": cfg.title,
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "profile": cfg.profile,
        "sizes": cfg.sizes,
        "model": cfg.model,
        "corpus": cfg.corpus,
        "corpus_text": corpus_text(cfg.corpus),
        "device": device_info(),
        "dtype": str(cfg.dtype).removeprefix("torch."),
        "peak_memory_gb": round(peak_memory_bytes(cfg.device) / 1e9, 3),
        "memory_plan_gb": round(cfg.memory_plan.get("total_bytes", 0) / 1e9, 3),
        "versions": library_versions(),
        "headline": headline,
        "tables": tables or {},
        "figures": cfg.figures,
    }
    path = results_dir() / f"{RESULT_FILES.get(cfg.lab, cfg.lab)}.json"
    write_atomic(path, json.dumps(record, indent=1, default=float).encode())
    return path
