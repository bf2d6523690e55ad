"""The main job: execute every lab headlessly with papermill, then build results/REPORT.md.

    python -m labs_lib.run_labs [--profile full] [--model ID_OR_PATH] [--labs 01 02]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .report import build_report
from .files import write_atomic
from .results import results_dir

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def run(profile: str, model: str | None, labs: list[str] | None) -> int:
    import papermill

    out_dir = results_dir() / "executed"
    out_dir.mkdir(exist_ok=True)
    log_path = results_dir() / "run_log.json"
    log = json.loads(log_path.read_text()) if log_path.is_file() else {}
    failures = 0
    parameters = {"PROFILE": profile} | ({"MODEL": model} if model else {})
    for nb in sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")):
        lab = nb.name[:2]
        if labs and lab not in labs:
            continue
        print(f"== lab {lab}: {nb.name} (profile {profile})", flush=True)
        start = time.perf_counter()
        try:
            papermill.execute_notebook(str(nb), str(out_dir / nb.name), parameters=parameters, cwd=str(NOTEBOOKS),
                                       progress_bar=False)
            status = "ok"
        except Exception as exc:  # keep going: the report says which lab failed and where
            status = f"failed: {type(exc).__name__}"
            failures += 1
            print(exc, file=sys.stderr)
        seconds = round(time.perf_counter() - start, 1)
        log[lab] = {"notebook": nb.name, "profile": profile, "status": status, "seconds": seconds}
        write_atomic(log_path, json.dumps(log, indent=1).encode())
        print(f"   {status} in {seconds} s", flush=True)
    print(f"report: {build_report()}")
    return 1 if failures else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="full", choices=["quick", "full"])
    parser.add_argument("--model", default=None,
                        help="Hugging Face id or local folder (default: LABS_MODEL or the embedded model)")
    parser.add_argument("--labs", nargs="*", help="two-digit lab numbers to run (default: all)")
    args = parser.parse_args()
    sys.exit(run(args.profile, args.model, args.labs))


if __name__ == "__main__":
    main()
