"""TensorRT-LLM where it exists: run a Model Optimizer checkpoint with its LLM API and time prefill and decode.

TensorRT-LLM ships in NVIDIA's release containers (see docker/run_trtllm.sh); it is not pip-installable here.
Where `tensorrt_llm` cannot be imported, `trtllm_status` says so and which container provides it.
"""

from __future__ import annotations

import time
from pathlib import Path

from .hardware import device_info

__all__ = ["CONTAINER", "PLAYBOOK", "trtllm_status", "serve_command", "playbook_request", "trtllm_benchmark"]

# the image the DGX Spark TRT-LLM playbook runs (https://build.nvidia.com/spark/trt-llm)
CONTAINER = "nvcr.io/nvidia/tensorrt-llm/release:spark-single-gpu-dev"
PLAYBOOK = "https://build.nvidia.com/spark/trt-llm"


def trtllm_status() -> dict:
    """Whether tensorrt_llm imports, its version, and which checkpoint format this GPU can run natively."""
    info = device_info()
    try:
        import tensorrt_llm
    except ImportError:
        return {"available": False, "version": None, "native": None,
                "message": f"TensorRT-LLM is not installed on this machine ({info['name']}). It ships in NVIDIA's "
                           f"TensorRT-LLM release container ({CONTAINER} on DGX Spark; docker/run_trtllm.sh starts "
                           "it with the playbook's flags). The rest of this lab runs without it."}
    native = "NVFP4" if info["native_fp4"] else "FP8" if info["native_fp8"] else None
    return {"available": True, "version": tensorrt_llm.__version__, "native": native,
            "message": f"TensorRT-LLM {tensorrt_llm.__version__} on {info['name']}: "
                       + (f"{native} checkpoints run on tensor cores." if native else "no FP8/FP4 tensor cores here.")}


def serve_command(model: str, port: int = 8000, max_batch_size: int = 4) -> str:
    """trtllm-serve with the flags this lab uses (each checked against the trtllm-serve reference:
    https://nvidia.github.io/TensorRT-LLM/commands/trtllm-serve/trtllm-serve.html)."""
    return f"trtllm-serve {model} --backend pytorch --max_batch_size {max_batch_size} --host 0.0.0.0 --port {port}"


def playbook_request(model: str, port: int = 8000) -> tuple[str, dict]:
    """The DGX Spark playbook's check of a running server: one chat request (URL, JSON body)."""
    body = {"model": model, "messages": [{"role": "user", "content": "Paris is great because"}], "max_tokens": 64}
    return f"http://localhost:{port}/v1/chat/completions", body


def trtllm_benchmark(folder: Path, prompts: list[str], new_tokens: int = 128) -> dict:
    """Prefill and decode tokens/s of `folder` through the LLM API (PyTorch backend), batch = len(prompts):
    a 1-token generation times the prefill; the extra time of a `new_tokens` generation is decode."""
    from tensorrt_llm import LLM, SamplingParams

    llm = LLM(model=str(folder))
    try:
        llm.generate(prompts, SamplingParams(max_tokens=4))  # warm-up: kernels, CUDA graphs
        start = time.perf_counter()
        first = llm.generate(prompts, SamplingParams(max_tokens=1))
        prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        outputs = llm.generate(prompts, SamplingParams(max_tokens=new_tokens))
        total_s = time.perf_counter() - start
    finally:
        getattr(llm, "shutdown", lambda: None)()
    prompt_tokens = sum(len(o.prompt_token_ids) for o in first)
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"prefill tok/s": round(prompt_tokens / prefill_s, 1),
            "decode tok/s": round((generated - len(prompts)) / max(total_s - prefill_s, 1e-9), 1),
            "batch": len(prompts), "generated tokens": generated, "sample": outputs[0].outputs[0].text[:120]}
