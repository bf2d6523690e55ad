"""What this machine can run natively: FP8 tensor cores (compute capability 8.9+), FP4 (Blackwell)."""

from __future__ import annotations

import os
import platform

import torch

from .errors import LabsError

__all__ = ["cpu_threads", "current_memory_bytes", "default_device", "default_dtype", "device_info", "fp4_status",
           "fp8_status", "peak_memory_bytes", "reset_peak_memory"]

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# Blackwell: 10.0 (B200), 10.3 (B300), 11.0 (Jetson Thor), 12.0 (RTX 50), 12.1 (GB10, DGX Spark), per
# https://developer.nvidia.com/cuda-gpus. Hopper 9.0 and Ada 8.9 have FP8.
FP4_MAJORS = (10, 11, 12)


def default_device() -> str:
    """$LABS_DEVICE if set (cpu or cuda); else cuda when a GPU is visible, else cpu."""
    device = os.environ.get("LABS_DEVICE", "").strip() or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise LabsError(f"LABS_DEVICE='{device}': use cpu or cuda.")
    if device == "cuda" and not torch.cuda.is_available():
        raise LabsError("LABS_DEVICE=cuda but torch sees no GPU: unset LABS_DEVICE to run on the CPU, or use a CUDA "
                        "build of torch (inside the NGC container it is there).")
    return device


def cpu_threads() -> int:
    """Cores this lab may use for CPU work (llama.cpp's tools and servers): $LABS_THREADS, which the main job sets
    to a share of the cores when it runs several labs at a time (oversubscribed llama.cpp threads stall), else all."""
    value = os.environ.get("LABS_THREADS", "").strip()
    if value and not (value.isdigit() and int(value) > 0):
        raise LabsError(f"LABS_THREADS='{value}': use a whole number of cores, at least 1, or unset it.")
    return int(value) if value else os.cpu_count() or 1


def default_dtype(device: str) -> torch.dtype:
    """$LABS_DTYPE if set; else bfloat16 on a GPU (what checkpoints ship in) and float32 on a CPU (fast there)."""
    name = os.environ.get("LABS_DTYPE", "").strip() or ("bfloat16" if device == "cuda" else "float32")
    if name not in DTYPES:
        raise LabsError(f"LABS_DTYPE='{name}': use one of {', '.join(DTYPES)}.")
    return DTYPES[name]


def device_info() -> dict:
    """Name, compute capability and native low-precision support of the device the labs use."""
    if default_device() == "cpu":
        return {"device": "cpu", "name": _cpu_name(), "compute_capability": None, "native_fp8": False,
                "native_fp4": False}
    major, minor = torch.cuda.get_device_capability()
    return {
        "device": "cuda",
        "name": torch.cuda.get_device_name(),
        "compute_capability": f"{major}.{minor}",
        "native_fp8": (major, minor) >= (8, 9),
        "native_fp4": major in FP4_MAJORS,
    }


def _cpu_name() -> str:
    """CPU model and core count, e.g. 'Intel(R) Xeon(R) ... (2 cores)'."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            name = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name} ({os.cpu_count()} cores)"


def fp4_status() -> str:
    info = device_info()
    if info["native_fp4"]:
        return (f"Native FP4: yes ({info['name']}, compute capability {info['compute_capability']}, "
                "Blackwell tensor cores).")
    gpu = f"{info['name']} (compute capability {info['compute_capability']})"
    where = "this CPU" if info["device"] == "cpu" else gpu
    return (f"Native FP4: no on {where}; FP4 tensor cores need Blackwell (compute capability 10.x, "
            "11.0 on Thor, or 12.x). "
            "FP4 is emulated here: values are rounded to the exact FP4 grid and multiplied in the lab's dtype "
            "(float32 on a CPU, BF16 on a GPU), "
            "so accuracy and sizes are real but speed is not.")


def fp8_status() -> str:
    info = device_info()
    if info["native_fp8"]:
        return f"Native FP8: yes ({info['name']}, compute capability {info['compute_capability']})."
    return ("Native FP8: no on this device (FP8 tensor cores need compute capability 8.9 or newer); "
            "FP8 is emulated with exact casts and float32 matmuls.")


def reset_peak_memory() -> None:
    """Start a new peak-memory measurement on every visible GPU (the CPU's peak RSS cannot be reset)."""
    for index in range(torch.cuda.device_count()):
        torch.cuda.reset_peak_memory_stats(index)


def current_memory_bytes() -> int:
    """This process's resident set now (Linux /proc/self/statm), in bytes."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory_bytes(device: str) -> int:
    """Peak bytes so far: `torch.cuda.max_memory_allocated` on a GPU, the process's peak resident set on a CPU."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports kilobytes
