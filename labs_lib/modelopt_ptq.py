"""NVIDIA Model Optimizer post-training quantization and unified Hugging Face export, made safe:
a clear error when it is missing, calibration with a progress bar, export written atomically."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from .errors import LabsError
from .files import atomic_folder

__all__ = ["require_modelopt", "modelopt_quantize", "modelopt_export", "checkpoint_files"]


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


def checkpoint_files(folder: Path) -> list[dict]:
    return [{"file": p.name, "bytes": p.stat().st_size} for p in sorted(Path(folder).iterdir()) if p.is_file()]
