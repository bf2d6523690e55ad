"""The main job: execute every lab headlessly with papermill, then build results/REPORT.md.

    python -m labs_lib.run_labs [--profile quick|full] [--model ID_OR_PATH] [--labs 01 02] [--jobs N]

The profile follows the device (quick on a CPU, full on a GPU) unless given. A CPU run writes results/ and
results/executed/; a GPU run writes results/gpu/ and results/executed-gpu/, so the report holds one run per machine.
A run at the other profile goes beside them (results/gpu-quick/, results/cpu-full/): the GPU's quick run evaluates
the CPU's exact tokens, which is how the report checks that both machines compute the same perplexities.
--jobs N executes N labs at a time, each in its own kernel, the longest first by this machine's last log, so the run
ends sooner, and each on its share of the CPU cores ($LABS_THREADS); the log records N, since labs that share a machine
take longer each. By default (default_jobs) a GPU runs four labs of the embedded model at a time, a CPU one.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from .files import write_atomic
from .hardware import cpu_threads, default_device, device_info
from .lab import PROFILES, default_profile
from .models import EMBEDDED, available_memory_bytes, model_config
from .sizing import ModelShape, lab_memory_plan
from .training import fp8_comparison_bytes
from .report import build_report

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"


def machine_folders(device: str, profile: str) -> tuple[Path, Path]:
    """(results folder, executed-notebook folder) of a run; $LABS_RESULTS_DIR overrides the first."""
    name = {("cpu", "quick"): "", ("cuda", "full"): "gpu", ("cpu", "full"): "cpu-full", ("cuda", "quick"): "gpu-quick"}
    sub = name[device, profile]
    results = Path(os.environ["LABS_RESULTS_DIR"]) if os.environ.get("LABS_RESULTS_DIR") else REPO / "results" / sub
    return results, REPO / "results" / ("executed" + (f"-{sub}" if sub else ""))


def execute(notebook: Path, executed: Path) -> tuple[str, float]:
    """Execute one lab headlessly into `executed`; (status, wall seconds). A failure is reported, not raised."""
    import papermill

    start = time.perf_counter()
    try:
        papermill.execute_notebook(str(notebook), str(executed / notebook.name), cwd=str(NOTEBOOKS),
                                   progress_bar=False)
        status = "ok"
    except Exception as exc:  # keep going: the report says which lab failed and where
        status = f"failed: {type(exc).__name__}"
        print(exc, file=sys.stderr)
    return status, round(time.perf_counter() - start, 1)


def _set_environment(values: dict[str, str]) -> None:
    """A worker process's start: these variables for the kernels it launches."""
    os.environ.update(values)


def default_jobs(device: str, model: str | None, free_bytes: int | None = None) -> int:
    """Labs at a time: on a GPU with the embedded model up to 4, as many as the GPU's free memory holds at the largest
    lab's memory plan (most of a lab's time is not GPU-bound); else 1: a CPU's cores, or a learner's own model, are
    for one lab at a time."""
    if device != "cuda" or model not in (None, EMBEDDED):
        return 1
    shape, full = ModelShape.from_config(model_config(EMBEDDED)), PROFILES["full"]
    labs = [nb.name[:2] for nb in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")]
    largest = max(lab_memory_plan(shape, lab, 2, full["calib_samples"], full["seq_len"], full["window"],
                                  fp8_comparison_bytes() if lab == "06" else 0)["total_bytes"] for lab in labs)
    free = available_memory_bytes("cuda") if free_bytes is None else free_bytes
    return max(1, min(4, int(free // largest)))


def longest_first(notebooks: list[Path], last_log: dict) -> list[Path]:
    """The labs ordered by their time in `last_log`, longest first; a lab without a time (new) goes first."""
    seconds = {lab: entry.get("seconds", 0) for lab, entry in last_log.get("labs", {}).items()}
    return sorted(notebooks, key=lambda nb: -seconds.get(nb.name[:2], float("inf")))


def run(profile: str | None, model: str | None, labs: list[str] | None, jobs: int | None = None) -> int:
    """Execute the labs (all, or `labs`), `jobs` at a time (default_jobs); log each lab's status, wall time and the
    run's machine."""
    device = default_device()
    notebooks = [nb for nb in sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")) if not labs or nb.name[:2] in labs]
    # a rerun of one lab runs, and is logged, one at a time
    jobs = min(jobs or default_jobs(device, model or os.environ.get("LABS_MODEL")), len(notebooks)) or 1
    profile = profile or default_profile()
    results, executed = machine_folders(device, profile)
    results.mkdir(parents=True, exist_ok=True)
    executed.mkdir(parents=True, exist_ok=True)
    # the kernels read these, exactly as a learner's notebook does: no injected parameter cell
    os.environ.update({"LABS_PROFILE": profile, "LABS_RESULTS_DIR": str(results)}
                      | ({"LABS_MODEL": model} if model else {}))
    # several labs at a time: each kernel gets its share of the cores (llama.cpp's threads spin-wait, and 4 x 16 on
    # 16 cores stalled); set in the worker processes only, so this process's environment stays as it was
    share = {name: os.environ.get(name) or str(max(1, (os.cpu_count() or 1) // jobs))
             for name in ("LABS_THREADS", "OMP_NUM_THREADS")} if jobs > 1 else {}
    log_path = results / "run_log.json"
    last_log = json.loads(log_path.read_text()) if log_path.is_file() else {}
    previous = last_log if labs else {}
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
    # a rerun keeps the run's machine and names its own: a lab rerun on another card must not relabel the others
    log = {"machine": previous.get("machine", device_info()), "profile": profile,
           "started_utc": previous.get("started_utc", started),
           "jobs": previous.get("jobs", jobs),
           "cpu_threads_per_lab": previous.get("cpu_threads_per_lab", int(share.get("LABS_THREADS") or cpu_threads())),
           "labs": previous.get("labs", {})}
    if previous:  # a rerun of some labs joins the machine's run, and says so
        log["reruns"] = previous.get("reruns", []) + [{"labs": labs, "started_utc": started, "jobs": jobs,
                                                        "machine": device_info()["name"]}]
    if jobs > 1:
        notebooks = longest_first(notebooks, last_log)
    for nb in notebooks:
        print(f"== lab {nb.name[:2]}: {nb.name} (profile {profile}, {device}, {jobs} at a time)", flush=True)
    failures, start = 0, time.perf_counter()
    with ProcessPoolExecutor(max_workers=jobs, initializer=_set_environment, initargs=(share,)) as pool:
        futures = {pool.submit(execute, nb, executed): nb for nb in notebooks}
        for future in as_completed(futures):
            nb, (status, seconds) = futures[future], future.result()
            failures += status != "ok"
            log["labs"][nb.name[:2]] = {"notebook": nb.name, "status": status, "seconds": seconds}
            print(f"   lab {nb.name[:2]}: {status} in {seconds} s", flush=True)
    log["labs"] = dict(sorted(log["labs"].items()))
    # the run's wall time from start to end; a rerun of some labs leaves the run's as it was
    log["wall_s"] = previous.get("wall_s", "") if previous else round(time.perf_counter() - start, 1)
    # written once the run ends, so each lab's header shows the last complete run's times, not a half-written log
    write_atomic(log_path, json.dumps(log, indent=1).encode())
    print(f"report: {build_report()}")
    return 1 if failures else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default=None, choices=["quick", "full"],
                        help="default: full on a GPU, quick on a CPU")
    parser.add_argument("--model", default=None,
                        help="Hugging Face id or local folder (default: LABS_MODEL or the embedded model)")
    parser.add_argument("--labs", nargs="*", help="two-digit lab numbers to run (default: all)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="labs executed at a time, each in its own kernel (default: 4 on a GPU, 1 on a CPU)")
    args = parser.parse_args()
    if args.jobs is not None and args.jobs < 1:
        parser.error("--jobs takes a whole number of at least 1")
    sys.exit(run(args.profile, args.model, args.labs, args.jobs))


if __name__ == "__main__":
    main()
