"""A streaming benchmark client for any OpenAI-compatible server (trtllm-serve, vllm serve, llama.cpp's servers).

Per request it records time to first token (TTFT), the gaps between later tokens (inter-token latency, ITL)
and decode tokens/s; per concurrency level, total output tokens/s across all requests. A token is one streamed
chunk unless the server reports `usage` (servers stream one token per chunk unless told to batch them). Where the
server reports its own `timings` (llama.cpp's llama-server does), they are kept next to the client's numbers.

Two servers start here on the loopback address, each stopped on leaving its context, even on error:
llama-cpp-python's (one request at a time) and llama.cpp's own `llama-server` (parallel slots, continuous batching).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
from tqdm.auto import tqdm

from .errors import LabsError
from .hardware import cpu_threads

__all__ = ["RequestResult", "stream_completion", "benchmark_endpoint", "summarize", "server_timing_check", "free_port",
           "llama_cpp_server", "llama_server", "plot_serving"]

START_A_SERVER = "llama-server -m <model.gguf> --host 127.0.0.1 --port {port} -np 4"


@dataclass
class RequestResult:
    ttft_s: float
    token_times_s: list[float]  # arrival time of each token after the request was sent
    output_tokens: int
    total_s: float
    text: str
    server_timings: dict | None = None  # the server's own `timings` of this request, where it reports them

    @property
    def inter_token_s(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times_s, self.token_times_s[1:])]

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens after the first, over the time they took: the decode speed one user sees."""
        span = self.token_times_s[-1] - self.token_times_s[0] if len(self.token_times_s) > 1 else 0.0
        return (len(self.token_times_s) - 1) / span if span > 0 else None


def stream_completion(client: httpx.Client, base_url: str, model: str, prompt: str, max_tokens: int) -> RequestResult:
    """One streamed /v1/completions request (greedy), timed token by token."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True}
    start = time.perf_counter()
    times, pieces, usage, timings = [], [], None, None
    with client.stream("POST", f"{base_url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            response.read()
            raise LabsError(f"{base_url} answered {response.status_code}: {response.text[:200]}")
        for line in response.iter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            usage = chunk.get("usage") or usage
            timings = chunk.get("timings") or timings
            text = "".join(c.get("text") or "" for c in chunk.get("choices", []))
            if text:
                times.append(time.perf_counter() - start)
                pieces.append(text)
    if not times:
        raise LabsError(f"{base_url} streamed no tokens for a {max_tokens}-token request.")
    tokens = (usage or {}).get("completion_tokens") or len(times)
    return RequestResult(times[0], times, tokens, time.perf_counter() - start, "".join(pieces), timings)


def _require_listener(base_url: str) -> None:
    """A one-line LabsError naming the command that starts a server when nothing accepts connections at `base_url`."""
    url = httpx.URL(base_url)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.host, port), timeout=5).close()
    except OSError:
        start = START_A_SERVER.format(port=port)
        raise LabsError(f"nothing listens at {base_url}: start a server first, e.g. `{start}`"
                        " (or docker/run_trtllm.sh <checkpoint> for trtllm-serve on port 8000).") from None


def benchmark_endpoint(base_url: str, model: str, prompts: list[str], concurrency: int, n_requests: int,
                       max_tokens: int = 32, timeout_s: float = 120.0) -> dict:
    """`n_requests` streamed requests, `concurrency` in flight at a time; per-request results and the wall time.
    A server that answers one request at a time keeps a request waiting behind the others in flight, so the wait for
    a byte is allowed `timeout_s` per request in flight."""
    _require_listener(base_url)
    jobs = [prompts[i % len(prompts)] for i in range(n_requests)]
    # a fresh connection per request: llama-server (cpp-httplib) closes a keep-alive connection after 5 requests, and a
    # request sent on it as it closes fails with "Server disconnected" (measured: 8 requests at concurrency 1)
    no_reuse = httpx.Limits(max_keepalive_connections=0)
    timeout = httpx.Timeout(timeout_s * concurrency, connect=10.0)
    with httpx.Client(timeout=timeout, limits=no_reuse) as client, ThreadPoolExecutor(concurrency) as pool:
        start = time.perf_counter()
        futures = [pool.submit(stream_completion, client, base_url, model, p, max_tokens) for p in jobs]
        try:
            results = [f.result() for f in tqdm(futures, desc=f"concurrency {concurrency}", leave=False)]
        except httpx.TimeoutException:
            raise LabsError(f"{base_url} sent nothing for {timeout_s * concurrency:.0f} s at concurrency "
                            f"{concurrency}: the server is overloaded (other jobs on its cores?); run it alone, or "
                            "pass a larger timeout_s.") from None
        wall = time.perf_counter() - start
    return {"concurrency": concurrency, "results": results, "wall_s": wall}


def summarize(run: dict) -> dict:
    """One table row: median TTFT and ITL, p90 TTFT, decode tokens/s per request, total output tokens/s."""
    results = run["results"]
    itl = [gap for r in results for gap in r.inter_token_s]
    ttft = sorted(r.ttft_s for r in results)
    decode = [r.decode_tokens_per_s for r in results if r.decode_tokens_per_s]
    return {
        "concurrency": run["concurrency"],
        "requests": len(results),
        "output tokens": sum(r.output_tokens for r in results),
        "TTFT median ms": round(1000 * statistics.median(ttft), 1),
        "TTFT p90 ms": round(1000 * ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))], 1),
        "ITL median ms": round(1000 * statistics.median(itl), 2) if itl else None,
        "decode tok/s per request": round(statistics.median(decode), 1) if decode else None,
        "total output tok/s": round(sum(r.output_tokens for r in results) / run["wall_s"], 1),
    }


def server_timing_check(run: dict) -> dict:
    """The client's TTFT and decode rate against the server's own `timings` of the same requests (medians): TTFT
    against `prompt_ms` (the server counts from when a slot takes the request to its first token), decode tokens/s
    against `predicted_per_second` (tokens after the first over the time after the first, the client's definition)."""
    pairs = [r for r in run["results"] if r.server_timings]
    if not pairs:
        raise LabsError("this server reported no `timings` with its answers (llama.cpp's llama-server does).")
    client_ttft = statistics.median(1000 * r.ttft_s for r in pairs)
    server_ttft = statistics.median(r.server_timings["prompt_ms"] for r in pairs)
    client_rate = statistics.median(r.decode_tokens_per_s for r in pairs if r.decode_tokens_per_s)
    server_rate = statistics.median(r.server_timings["predicted_per_second"] for r in pairs)
    return {"concurrency": run["concurrency"], "requests": len(pairs),
            "TTFT ms client": round(client_ttft, 1), "TTFT ms server": round(server_ttft, 1),
            "TTFT diff %": round(100 * (client_ttft / server_ttft - 1), 1),
            "decode tok/s client": round(client_rate, 1), "decode tok/s server": round(server_rate, 1),
            "decode diff %": round(100 * (client_rate / server_rate - 1), 1)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def llama_cpp_server(gguf: Path, port: int | None = None, n_ctx: int = 2048, n_threads: int | None = None,
                     startup_timeout_s: float = 120.0):
    """llama-cpp-python's OpenAI-compatible server on the loopback address, stopped on exit. Yields the base URL.

    By default it leaves one core to the client measuring it: llama.cpp's threads wait for each other at every
    step, so a server on all cores stalls whenever the client runs (measured on 2 cores: 45 vs 35 ms per token). Its
    own process has no torch, so it takes every layer to the GPU where the binding's own libllama is a CUDA build."""
    from .gguf_io import read_gguf
    from .llamacpp import binding_gpu_layers, require_llama_cpp

    require_llama_cpp(in_process=False)  # its libllama loads in the server's own process, without torch
    read_gguf(gguf)  # a missing or damaged file gets a clear error here, not a server that dies at start
    try:
        import fastapi, sse_starlette, starlette_context, uvicorn  # noqa: F401,E401
    except ImportError as exc:
        raise LabsError(f"llama-cpp-python's server needs its [server] extra ({exc.name} is missing): "
                        "pip install -r requirements.txt") from None
    port = port or free_port()
    threads = n_threads or max(1, cpu_threads() - 1)
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
               "--port", str(port), "--n_ctx", str(n_ctx), "--n_threads", str(threads),
               "--n_gpu_layers", str(binding_gpu_layers()),
               "--interrupt_requests", "False"]  # queue concurrent requests (its default cancels the running one)
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    with _serving(command, port, "/v1/models", "llama-cpp-python's server", startup_timeout_s, env) as base_url:
        yield base_url


@contextlib.contextmanager
def llama_server(gguf: Path, parallel: int = 4, ctx_per_slot: int = 512, port: int | None = None,
                 n_threads: int | None = None, startup_timeout_s: float = 120.0):
    """llama.cpp's own `llama-server` on the loopback address with `parallel` slots (-np): requests in flight share
    each decode step (continuous batching). Stopped on exit; yields the base URL. It runs as its users run it: one
    thread per core, llama.cpp's own threading defaults (`llamacpp.tool_env`), every layer on a CUDA build's GPU."""
    from .gguf_io import read_gguf
    from .llamacpp import gpu_layers, llama_tool, tool_env

    read_gguf(gguf)
    port = port or free_port()
    threads = n_threads or cpu_threads()
    command = [str(llama_tool("llama-server")), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
               "-np", str(parallel), "-c", str(parallel * ctx_per_slot), "-t", str(threads), "-ngl", str(gpu_layers()),
               "--no-webui"]
    with _serving(command, port, "/health", "llama-server", startup_timeout_s, tool_env()) as base_url:
        yield base_url


@contextlib.contextmanager
def _serving(command: list[str], port: int, ready_path: str, name: str, startup_timeout_s: float, env: dict):
    """Start `command` in `env`, wait until GET `ready_path` answers 200, yield the base URL; always stop it on exit."""
    base_url = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile("w+", prefix="llama-server-", suffix=".log", delete=False)
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if process.poll() is not None:
                raise LabsError(f"{name} exited at start (code {process.returncode}); its log: {log.name}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base_url}{ready_path}", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise LabsError(f"{name} did not answer within {startup_timeout_s:.0f} s; its log: {log.name}")
            time.sleep(0.5)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        if process.returncode in (0, -15):
            Path(log.name).unlink(missing_ok=True)


def plot_serving(rows: list[dict], title: str):
    """Total throughput and per-request decode speed against concurrency, with median and p90 TTFT beside them; one
    colour per server where the rows name one (key "server")."""
    import matplotlib.pyplot as plt

    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row.get("server", ""), []).append(row)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, (server, group) in enumerate(groups.items()):
        conc, name = [r["concurrency"] for r in group], f"{server}: " if server else ""
        left.plot(conc, [r["total output tok/s"] for r in group], "o-", color=f"C{i}",
                  label=f"{name}total output tok/s")
        left.plot(conc, [r["decode tok/s per request"] for r in group], "s--", color=f"C{i}",
                  label=f"{name}decode tok/s per request")
        right.plot(conc, [r["TTFT median ms"] for r in group], "o-", color=f"C{i}", label=f"{name}TTFT median")
        right.plot(conc, [r["TTFT p90 ms"] for r in group], "^:", color=f"C{i}", label=f"{name}TTFT p90")
    conc = sorted({r["concurrency"] for r in rows})
    for ax, label in ((left, "tokens/s"), (right, "ms")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(conc, [str(c) for c in conc])
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
