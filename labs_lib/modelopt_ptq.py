"""NVIDIA Model Optimizer post-training quantization and unified Hugging Face export, made safe:
a clear error when it is missing, calibration with a progress bar, export written atomically."""

from __future__ import annotations

import re
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .errors import LabsError
from .files import atomic_folder

__all__ = ["require_modelopt", "modelopt_quantize", "modelopt_export", "export_folder", "exported_checkpoint", "checkpoint_files"]

EXPORT_SUFFIX = {"NVFP4_DEFAULT_CFG": "nvfp4", "FP8_DEFAULT_CFG": "fp8"}


def require_modelopt():
    try:
        import modelopt.torch.quantization as mtq
    except ImportError:
        raise LabsError("NVIDIA Model Optimizer is not installed: pip install nvidia-modelopt==0.47.0") from None
    return mtq


def modelopt_quantize(model, config_name: str, batches: torch.Tensor):
    """`mtq.quantize(model, mtq.<config_name>, forward_loop)` calibrated on `batches` (in place)."""
    mtq = require_modelopt()
    if not hasattr(mtq, config_name):
        choices = ", ".join(n for n in dir(mtq) if n.endswith("_CFG"))
        raise LabsError(f"Model Optimizer has no config {config_name}; choose one of: {choices}")
    device = next(model.parameters()).device

    def forward_loop(m):
        for batch in tqdm(batches, desc=f"calibrating {config_name}", leave=False):
            m(batch.unsqueeze(0).to(device))

    return mtq.quantize(model, getattr(mtq, config_name), forward_loop)


def modelopt_export(model, folder: Path) -> Path:
    """`export_hf_checkpoint` into a temporary folder, renamed to `folder` only when complete."""
    from modelopt.torch.export import export_hf_checkpoint

    with atomic_folder(folder) as tmp:
        export_hf_checkpoint(model, export_dir=str(tmp))
    return Path(folder)


def export_folder(model_name: str, config_name: str) -> Path:
    """Where the unified checkpoint of `model_name` under `config_name` is cached (Lab 02 writes the NVFP4 one)."""
    from .models import cache_dir

    suffix = EXPORT_SUFFIX.get(config_name, config_name.lower())
    return cache_dir() / "exports" / (re.sub(r"[^A-Za-z0-9_.-]+", "_", model_name) + f"-{suffix}")


def exported_checkpoint(model_name: str, config_name: str, batches: torch.Tensor, tokenizer=None,
                        device: str | None = None) -> tuple[Path, float | None]:
    """The cached export if there is one, else BF16 model on `device` (None: the labs' policy, the GPU when there is one)
    -> mtq.quantize -> export. Returns (folder, seconds spent, None when cached). The tokenizer is saved next to the
    weights, as trtllm-serve and vLLM expect."""
    from .models import load_model

    folder, seconds = export_folder(model_name, config_name), None
    if not (folder / "hf_quant_config.json").exists():
        start = time.perf_counter()
        model = load_model(model_name, dtype=torch.bfloat16, device=device)
        modelopt_quantize(model, config_name, batches)
        modelopt_export(model, folder)
        del model
        seconds = round(time.perf_counter() - start, 1)
    if tokenizer is not None and not (folder / "tokenizer.json").exists():
        with atomic_folder(folder / ".tokenizer") as tmp:
            tokenizer.save_pretrained(tmp)
        for path in (folder / ".tokenizer").iterdir():
            path.replace(folder / path.name)
        (folder / ".tokenizer").rmdir()
    return folder, seconds


def checkpoint_files(folder: Path) -> list[dict]:
    return [{"file": p.name, "bytes": p.stat().st_size} for p in sorted(Path(folder).iterdir()) if p.is_file()]
