"""TensorRT-LLM where it exists: its two paths from a Model Optimizer checkpoint to served tokens.

* PyTorch backend (what `trtllm-serve` and the LLM API use by default): loads the unified Hugging Face
  checkpoint directly, no engine file.
* TensorRT engine: Model Optimizer's TensorRT-LLM checkpoint export, then `trtllm-build` compiles it into an
  engine for fixed maximum batch and sequence sizes (docker/build_trtllm_engine.sh runs that step).

TensorRT-LLM ships in NVIDIA's release containers; it is not pip-installable here. Where `tensorrt_llm` cannot be
imported, `trtllm_status` says so and which container provides it.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from .hardware import device_info

__all__ = ["CONTAINER", "PLAYBOOK", "SERVE_PORT", "SERVED_MODEL", "ENGINE_LIMITS", "trtllm_status", "serve_command",
           "playbook_request", "build_command", "export_trtllm_checkpoint", "build_engine", "trtllm_benchmark"]

# the image the DGX Spark TRT-LLM playbook runs (https://build.nvidia.com/spark/trt-llm)
CONTAINER = "nvcr.io/nvidia/tensorrt-llm/release:spark-single-gpu-dev"
PLAYBOOK = "https://build.nvidia.com/spark/trt-llm"
# One port and one model name for every command this course prints or scripts (docker/run_trtllm.sh mounts the
# checkpoint folder at /model; trtllm-serve answers to the name it was started with).
SERVE_PORT = 8000
SERVED_MODEL = "/model"
# trtllm-build's size limits for the engine path: an engine is compiled for these and cannot exceed them at run time
ENGINE_LIMITS = {"max_batch_size": 4, "max_input_len": 1024, "max_seq_len": 2048}
# trtllm-build reference: https://nvidia.github.io/TensorRT-LLM/commands/trtllm-build.html
BUILD_REFERENCE = "https://nvidia.github.io/TensorRT-LLM/commands/trtllm-build.html"


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


def serve_command(model: str = SERVED_MODEL, port: int = SERVE_PORT, max_batch_size: int = 4) -> str:
    """trtllm-serve with the flags this lab uses (each checked against the trtllm-serve reference:
    https://nvidia.github.io/TensorRT-LLM/commands/trtllm-serve/trtllm-serve.html)."""
    return f"trtllm-serve {model} --backend pytorch --max_batch_size {max_batch_size} --host 0.0.0.0 --port {port}"


def playbook_request(model: str = SERVED_MODEL, port: int = SERVE_PORT) -> tuple[str, dict]:
    """The DGX Spark playbook's check of a running server: one chat request (URL, JSON body)."""
    body = {"model": model, "messages": [{"role": "user", "content": "Paris is great because"}], "max_tokens": 64}
    return f"http://localhost:{port}/v1/chat/completions", body


def build_command(checkpoint_dir: str, engine_dir: str, gemm_plugin: str = "auto", **limits: int) -> list[str]:
    """`trtllm-build` for a TensorRT-LLM checkpoint: GEMM and attention plugins, and the engine's size limits
    (ENGINE_LIMITS unless given). Every flag is in the trtllm-build reference (BUILD_REFERENCE)."""
    sizes = ENGINE_LIMITS | limits
    command = ["trtllm-build", "--checkpoint_dir", str(checkpoint_dir), "--output_dir", str(engine_dir),
               "--gemm_plugin", gemm_plugin, "--gpt_attention_plugin", "auto"]
    for name, value in sizes.items():
        command += [f"--{name}", str(value)]
    return command


def export_trtllm_checkpoint(quantized_model, folder: Path) -> Path:
    """Model Optimizer's TensorRT-LLM checkpoint export (config.json + rank0.safetensors) of a quantized Llama."""
    import torch
    from modelopt.torch.export import export_tensorrt_llm_checkpoint

    with torch.inference_mode():
        export_tensorrt_llm_checkpoint(quantized_model, "llama", torch.bfloat16, export_dir=str(folder),
                                       inference_tensor_parallel=1)
    return Path(folder)


def build_engine(checkpoint_dir: Path, engine_dir: Path, gemm_plugin: str = "auto") -> dict:
    """Run `trtllm-build` (needs TensorRT-LLM and a GPU) and time it; the engine's files and their bytes."""
    command = build_command(str(checkpoint_dir), str(engine_dir), gemm_plugin)
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    files = {p.name: p.stat().st_size for p in sorted(Path(engine_dir).iterdir()) if p.is_file()}
    return {"command": " ".join(command), "build s": round(seconds, 1), "engine files": files}


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
