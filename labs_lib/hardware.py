"""What this machine can run natively: FP8 tensor cores (compute capability 8.9+), FP4 (Blackwell)."""

from __future__ import annotations

import os
import platform

import torch

__all__ = ["device_info", "fp4_status", "fp8_status"]

# Blackwell: 10.0 (B200), 10.3 (B300), 12.0 (RTX 50), 12.1 (GB10, DGX Spark). Hopper 9.0 and Ada 8.9 have FP8.
FP4_MAJORS = (10, 12)


def device_info() -> dict:
    """Name, compute capability and native low-precision support of the device the labs use."""
    if not torch.cuda.is_available():
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
    return (f"Native FP4: no on {where}; FP4 tensor cores need Blackwell (compute capability 10.x or 12.x). "
            "FP4 is emulated here: values are rounded to the exact FP4 grid and multiplied in float32, "
            "so accuracy and sizes are real but speed is not.")


def fp8_status() -> str:
    info = device_info()
    if info["native_fp8"]:
        return f"Native FP8: yes ({info['name']}, compute capability {info['compute_capability']})."
    return ("Native FP8: no on this device (FP8 tensor cores need compute capability 8.9 or newer); "
            "FP8 is emulated with exact casts and float32 matmuls.")
