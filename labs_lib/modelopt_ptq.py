"""NVIDIA Model Optimizer post-training quantization and unified Hugging Face export, made safe:
a clear error when it is missing, calibration with a progress bar, export written atomically."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from .errors import LabsError
from .files import atomic_folder

__all__ = ["require_modelopt", "modelopt_config", "modelopt_quantize", "modelopt_export", "export_folder",
           "exported_checkpoint", "checkpoint_files"]

EXPORT_SUFFIX = {"NVFP4_DEFAULT_CFG": "nvfp4", "FP8_DEFAULT_CFG": "fp8"}


def require_modelopt():
    try:
        import modelopt.torch.quantization as mtq
    except ImportError:
        raise LabsError("NVIDIA Model Optimizer is not installed: pip install nvidia-modelopt==0.47.0") from None
    return mtq


def modelopt_config(config_name: str) -> dict:
    """Model Optimizer's config `mtq.<config_name>`, or a LabsError listing the configs there are."""
    mtq = require_modelopt()
    if not hasattr(mtq, config_name):
        choices = ", ".join(n for n in dir(mtq) if n.endswith("_CFG"))
        raise LabsError(f"Model Optimizer has no config {config_name}; choose one of: {choices}")
    return getattr(mtq, config_name)


def modelopt_quantize(model, config: str | dict, batches: torch.Tensor | None = None,
                      forward_loop: Callable | None = None):
    """`mtq.quantize(model, config, forward_loop)` in place. `config` is a config name (mtq.<name>) or a config
    dict; the forward loop is `forward_loop`, else one that runs each row of `batches` (a progress bar)."""
    mtq = require_modelopt()
    label = config if isinstance(config, str) else "model"
    if isinstance(config, str):
        config = modelopt_config(config)
    if forward_loop is None:
        device = next(model.parameters()).device

        def forward_loop(m):
            for batch in tqdm(batches, desc=f"calibrating {label}", leave=False):
                m(batch.unsqueeze(0).to(device))

    return mtq.quantize(model, config, forward_loop)


def modelopt_export(model, folder: Path, fill: Callable[[Path], None] | None = None) -> Path:
    """`export_hf_checkpoint` into a temporary folder, then `fill(temporary folder)` (tokenizer, report), renamed
    to `folder` only when all of it is complete."""
    from modelopt.torch.export import export_hf_checkpoint

    with atomic_folder(folder) as tmp:
        export_hf_checkpoint(model, export_dir=str(tmp))
        if fill is not None:
            fill(tmp)
    return Path(folder)


def export_folder(model_name: str, config_name: str) -> Path:
    """Where the unified checkpoint of `model_name` under `config_name` is cached (Lab 02 writes the NVFP4 one)."""
    from .models import cache_path

    return cache_path("exports", model_name, EXPORT_SUFFIX.get(config_name, config_name.lower()))


def exported_checkpoint(model_name: str, config_name: str, batches: torch.Tensor, tokenizer=None,
                        device: str | None = None) -> tuple[Path, float | None]:
    """The cached export if there is one, else BF16 model on `device` (None: the labs' policy, the GPU when
    there is one) -> mtq.quantize -> export. Returns (folder, seconds spent, None when cached). The tokenizer is
    saved next to the weights, as trtllm-serve and vLLM expect."""
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
