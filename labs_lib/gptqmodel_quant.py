"""GPTQModel, the maintained GPTQ/AWQ toolkit, run on the same model and calibration data as labs_lib.

Configured as the textbook algorithm that labs_lib implements (no act-order, no group-aware
reordering, whole-layer Hessians, damp 0.01), so a difference in perplexity measures the two
implementations, not two recipes. Checkpoints are cached by (model, method, scheme, calibration
data), written atomically, and reload in plain transformers (through optimum).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .blockquant import IntGroup
from .errors import LabsError
from .files import atomic_folder
from .hardware import cpu_threads, default_device
from .models import _resolve, cache_path, calibration_key

__all__ = ["require_gptqmodel", "LibraryRun", "gptqmodel_quantize", "load_quantized_checkpoint"]

METHODS = ("gptq", "awq")


def require_gptqmodel():
    # On CPU GPTQModel sizes its worker pools from this; the default asks for more workers than a
    # 2-core machine has and stops ("Virtual pool 'model_loader:cpu' requests 2 workers").
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(cpu_threads()))
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its import prints a banner
            import gptqmodel
        from logbar import LogBar
    except ImportError:
        raise LabsError("GPTQModel is not installed: run `make setup` (it installs gptqmodel==7.6.0 with "
                        "--no-deps, because its exact numpy pin would replace numpy).") from None
    LogBar.shared().setLevel(logging.WARNING)  # keep its warnings, drop its per-module INFO lines
    return gptqmodel


@dataclass
class LibraryRun:
    folder: Path
    seconds: float  # quantization wall time when the checkpoint was built
    cached: bool  # True when this call found the checkpoint already built


def gptqmodel_quantize(model_name: str, method: str, scheme: IntGroup, batches: torch.Tensor,
                       damp: float = 0.01) -> LibraryRun:
    """Quantize `model_name` with GPTQModel (method "gptq" or "awq") on `batches`; cached on disk."""
    if method not in METHODS:
        raise LabsError(f"Unknown method '{method}': use one of {', '.join(METHODS)}.")
    folder = cache_path("quantized", model_name, method, scheme.name, f"damp{damp}", calibration_key(batches))
    if (folder / "labs_run.json").is_file():
        return LibraryRun(folder, json.loads((folder / "labs_run.json").read_text())["seconds"], True)
    source = _resolve(model_name)[1]  # a broken local folder fails here, before anything is written
    source = str(source.resolve() if isinstance(source, Path) else source)
    require_gptqmodel()
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
    from gptqmodel.quantization.config import METHOD

    cuda = default_device() == "cuda"
    common = dict(bits=scheme.bits, group_size=scheme.group_size or -1, sym=scheme.symmetric, desc_act=False)
    if method == "gptq":
        config = QuantizeConfig(**common, act_group_aware=False, damp_percent=damp, true_sequential=False)
        backend = BACKEND.GPTQ_TRITON if cuda else BACKEND.AUTO
    else:
        config = QuantizeConfig(**common, quant_method=METHOD.AWQ)
        backend = BACKEND.AWQ_TORCH  # packs on any device (AUTO on a CPU cannot run AWQ; its Triton kernel cannot pack)
    dtype = torch.bfloat16 if cuda or method == "awq" else torch.float32  # its AWQ packer refuses float32
    print(f"GPTQModel: quantizing {model_name} ({method.upper()} {scheme.name}) on {len(batches)} sequences...")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch, contextlib.chdir(scratch):  # it writes ./logs/ wherever it runs
        model = GPTQModel.load(source, config, device="cuda" if cuda else "cpu", dtype=dtype)
        examples = [{"input_ids": b.tolist(), "attention_mask": [1] * len(b)} for b in batches]
        # batches of 16 on a GPU: one sequence at a time left GPTQModel's AWQ search running for minutes on an H200
        model.quantize(examples, batch_size=16 if cuda else 1, backend=backend)
    seconds = time.perf_counter() - start
    with atomic_folder(folder) as tmp:
        model.save(str(tmp))
        (tmp / "labs_run.json").write_text(json.dumps({"seconds": seconds, "model": model_name, "method": method,
                                                       "scheme": scheme.name, "damp": damp}, indent=1))
    return LibraryRun(folder, seconds, False)


def load_quantized_checkpoint(folder: Path, device: str | None = None):
    """A GPTQ/AWQ checkpoint loaded by transformers itself (the way a user would deploy it), on `device`
    (None: the labs' policy, the GPU when there is one, where GPTQModel picks its CUDA kernels)."""
    require_gptqmodel()
    from transformers import AutoModelForCausalLM, AwqConfig, GPTQConfig

    device = device or default_device()
    run = json.loads((Path(folder) / "labs_run.json").read_text())
    kernel = {}
    if device == "cuda":
        # GPTQModel's automatic choice on Hopper is its Machete kernel, which needs every out_features divisible by 128
        # (SmolLM2's k/v projections are 192 wide: it refused on an H200); the Triton kernels take widths of 32 | 8.
        config = GPTQConfig(bits=4, backend="gptq_triton") if run["method"] == "gptq" else \
            AwqConfig(bits=4, backend="gemm_triton")
        kernel = {"quantization_config": config}
    return AutoModelForCausalLM.from_pretrained(folder, device_map=device, **kernel).eval()
