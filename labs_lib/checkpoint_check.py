"""Check a Model Optimizer unified Hugging Face checkpoint the way TensorRT-LLM and vLLM will read it.

Every Linear layer that is not excluded must carry its packed weight and scales with the right names,
dtypes and shapes; the shapes come from the model's own config (a meta-device model, no weights loaded).
Problems are returned as readable sentences, so a broken export fails here, not deep inside an engine build.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

__all__ = ["EXPECTED", "KV_SCALES", "DEFECTS", "CheckpointReport", "check_checkpoint", "checkpoint_inventory",
           "make_broken_copy"]

# Per quantized Linear: tensor suffix -> (safetensors dtype(s), shape as a function of (out, in, group)), as Model
# Optimizer 0.47's unified export writes them (read from real exports of a Llama). Scalars are 0-d tensors.
# Suffixes in OPTIONAL may be absent: `input_scale` in weight-only checkpoints, `pre_quant_scale` where the export
# folded the AWQ/SmoothQuant scale into the layer before (the norm in front of q/k/v and gate/up).
_NVFP4_WEIGHTS = {
    "weight": ("U8", lambda o, i, g: (o, i // 2)),          # two E2M1 codes per byte
    "weight_scale": ("F8_E4M3", lambda o, i, g: (o, i // g)),  # one E4M3 scale per `group` inputs
    "weight_scale_2": ("F32", lambda o, i, g: ()),           # per-tensor FP32 scale
}
_INPUT_SCALE = {"input_scale": ("F32", lambda o, i, g: ())}
_PRE_QUANT_SCALE = {"pre_quant_scale": (("BF16", "F16", "F32"), lambda o, i, g: (i,))}  # the model's dtype
_INT4_WEIGHTS = {
    "weight": ("U8", lambda o, i, g: (o // 2, i)),           # two INT4 codes per byte, packed along the rows
    "weight_scale": ("F32", lambda o, i, g: (o, i // g)),    # one scale per `group` inputs
}
EXPECTED = {
    "NVFP4": _NVFP4_WEIGHTS | _INPUT_SCALE,
    "NVFP4_AWQ": _NVFP4_WEIGHTS | _INPUT_SCALE | _PRE_QUANT_SCALE,
    "W4A16_NVFP4": _NVFP4_WEIGHTS,
    "mxfp4": {
        "weight": ("U8", lambda o, i, g: (o, i // 2)),
        "weight_scale": ("U8", lambda o, i, g: (o, i // g)),  # E8M0 exponents, one per 32 inputs
    },
    "FP8": {
        "weight": ("F8_E4M3", lambda o, i, g: (o, i)),
        "weight_scale": ("F32", lambda o, i, g: ()),
    } | _INPUT_SCALE,
    "W4A16_AWQ": _INT4_WEIGHTS | _PRE_QUANT_SCALE,
    "W4A8_AWQ": _INT4_WEIGHTS | {"weight_scale_2": ("F32", lambda o, i, g: ())} | _INPUT_SCALE | _PRE_QUANT_SCALE,
    "W8A8_SQ_PER_CHANNEL": {
        "weight": ("I8", lambda o, i, g: (o, i)),
        "weight_scale": ("F32", lambda o, i, g: (o,)),        # one scale per output row
    } | _INPUT_SCALE | _PRE_QUANT_SCALE,
}
OPTIONAL = ("input_scale", "pre_quant_scale")
MIXED = "MIXED_PRECISION"  # a format per layer, listed in hf_quant_config.json's quantized_layers (AutoQuantize)
# The block size when hf_quant_config.json has no group_size (MXFP4: fixed by the OCP format).
DEFAULT_GROUP = {"NVFP4": 16, "NVFP4_AWQ": 16, "W4A16_NVFP4": 16, "mxfp4": 32, "W4A16_AWQ": 128, "W4A8_AWQ": 128}
# kv_cache_quant_algo -> the per-tensor FP32 scales each attention layer carries (on its k_proj and v_proj)
KV_SCALES = {"FP8": ("k_scale", "v_scale"), "NVFP4": ("k_scale", "v_scale")}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


@dataclass
class CheckpointReport:
    folder: Path
    quant_algo: str | None = None
    group_size: int | None = None
    quantized_layers: int = 0
    tensors_checked: int = 0
    findings: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    @property
    def problems(self) -> list[str]:
        """The findings, with ones that differ only in layer numbers and sizes folded into one line."""
        groups: dict[str, list[str]] = {}
        for message in self.findings:
            layer = re.sub(r"\S+\.(weight\w*|input_scale|pre_quant_scale|[kv]_scale)\b", r"<layer>.\1", message)
            key = re.sub(r"\d+", "#", layer)
            groups.setdefault(key, []).append(message)
        return [m[0] if len(m) == 1 else f"{m[0]} (and {len(m) - 1} more layers like it)" for m in groups.values()]

    def summary(self) -> dict:
        return {"checkpoint": self.folder.name, "quant_algo": self.quant_algo, "group_size": self.group_size,
                "quantized layers": self.quantized_layers, "tensors checked": self.tensors_checked,
                "problems": len(self.findings), "warnings": len(self.warnings)}


def _read_json(path: Path, report: CheckpointReport) -> dict | None:
    if not path.exists():
        report.findings.append(f"{path.name} is missing.")
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        report.findings.append(f"{path.name} is not valid JSON ({exc.msg}, line {exc.lineno}).")
        return None


def _tensor_index(folder: Path, report: CheckpointReport) -> dict[str, tuple[str, tuple[int, ...], Path]]:
    """name -> (dtype, shape, file) from the safetensors headers of every shard."""
    index = {}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        report.findings.append("no *.safetensors file in the folder.")
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    tensor = f.get_slice(name)
                    index[name] = (tensor.get_dtype(), tuple(tensor.get_shape()), path)
        except Exception as exc:  # a truncated or corrupt file: say which one
            report.findings.append(f"{path.name} cannot be read as safetensors ({exc}).")
    return index


def _linear_shapes(config: dict) -> tuple[dict[str, tuple[int, int]], set[str], bool]:
    """(Linear name -> (out, in)), every parameter name, and whether lm_head is tied, from config.json alone."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "quantization_config"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    linears = {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return linears, set(model.state_dict()), bool(getattr(cfg, "tie_word_embeddings", False))


def _excluded(name: str, patterns: list[str]) -> bool:
    return any(name == p or fnmatch.fnmatch(name, p) for p in patterns)


def _check_values(names: list[tuple[str, Path]], report: CheckpointReport) -> None:
    """Scales must be finite and positive: a zero or NaN scale turns a whole layer into zeros or NaNs."""
    by_file: dict[Path, list[str]] = {}
    for name, path in names:
        by_file.setdefault(path, []).append(name)
    for path, keys in by_file.items():
        with safe_open(str(path), framework="pt") as f:
            for name in keys:
                values = f.get_tensor(name).float()
                if not torch.isfinite(values).all():
                    report.findings.append(f"{name} holds NaN or infinite values.")
                elif (values <= 0).any():
                    report.findings.append(f"{name} holds {(values <= 0).sum().item()} scale(s) <= 0.")


def _layer_formats(q: dict, linears: dict, report: CheckpointReport) -> dict[str, tuple[str, int]]:
    """Linear name -> (quant_algo, group size) of each quantized Linear: the one format of the checkpoint for all
    Linears not in exclude_modules, or under MIXED_PRECISION (AutoQuantize's export) each listed layer's own."""
    if q.get("quant_algo") != MIXED:
        algo, excluded = q["quant_algo"], q.get("exclude_modules") or []
        group = q.get("group_size") or DEFAULT_GROUP.get(algo, 16)
        return {name: (algo, group) for name in linears if not _excluded(name, excluded)}
    formats = {}
    for name, layer in (q.get("quantized_layers") or {}).items():
        algo = layer.get("quant_algo")
        if name not in linears:
            report.findings.append(f"quantized_layers names {name}, which is not a Linear layer of this model.")
        elif algo not in EXPECTED:
            report.findings.append(f"{name} has quant_algo {algo!r}; this checker knows {', '.join(EXPECTED)}.")
        else:
            formats[name] = (algo, layer.get("group_size") or DEFAULT_GROUP.get(algo, 16))
    return formats


def _check_kv_scales(kv_algo: str | None, linears: dict, tensors: dict, report: CheckpointReport,
                     scales: list) -> set[str]:
    """With a quantized KV cache every k_proj/v_proj carries a scalar FP32 k_scale/v_scale (whether or not the
    Linear itself is excluded); returns the names checked, and queues them for the value check."""
    if kv_algo is None:
        return set()
    if kv_algo not in KV_SCALES:
        report.findings.append(f"kv_cache_quant_algo is {kv_algo!r}; this checker knows {', '.join(KV_SCALES)}.")
        return set()
    checked = set()
    for name in linears:
        for scale in KV_SCALES[kv_algo]:
            if name.endswith(f".{scale[0]}_proj"):
                key = f"{name}.{scale}"
                if key not in tensors:
                    report.findings.append(f"{key} is missing (kv_cache_quant_algo {kv_algo}).")
                    continue
                dtype, shape, path = tensors[key]
                if (dtype, shape) != ("F32", ()):
                    report.findings.append(f"{key} is {dtype} {list(shape)}, expected a scalar F32.")
                else:
                    scales.append((key, path))
                checked.add(key)
                report.tensors_checked += 1
    if not checked and not report.findings:
        report.findings.append(f"kv_cache_quant_algo is {kv_algo} but the model has no k_proj/v_proj layers.")
    return checked


def check_checkpoint(folder: str | Path) -> CheckpointReport:
    """Validate `folder` (config.json, hf_quant_config.json, safetensors) and return every problem found."""
    folder = Path(folder)
    report = CheckpointReport(folder)
    if not folder.is_dir():
        report.findings.append(f"{folder} is not a folder.")
        return report
    config = _read_json(folder / "config.json", report)
    quant = _read_json(folder / "hf_quant_config.json", report)
    if config is None or quant is None:
        return report
    q = quant.get("quantization", {})
    report.quant_algo, report.group_size = q.get("quant_algo"), q.get("group_size")
    if report.quant_algo not in (*EXPECTED, MIXED):
        report.findings.append(f"quant_algo is {report.quant_algo!r}; this checker knows {', '.join(EXPECTED)} "
                               f"and {MIXED}.")
        return report
    if report.quant_algo == "NVFP4" and report.group_size != 16:
        report.findings.append(f"group_size is {report.group_size}; NVFP4 uses one E4M3 scale per 16 values.")
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") != "modelopt" or qc.get("quant_algo") != report.quant_algo:
        report.findings.append(f"config.json's quantization_config (quant_method {qc.get('quant_method')!r}, "
                               f"quant_algo {qc.get('quant_algo')!r}) does not match hf_quant_config.json "
                               f"({report.quant_algo}).")
    if not any((folder / f).exists() for f in TOKENIZER_FILES):
        report.warnings.append("no tokenizer in the folder: pass --tokenizer to trtllm-serve or save the tokenizer "
                               "here.")

    before = len(report.findings)
    tensors = _tensor_index(folder, report)
    if len(report.findings) > before:  # an unreadable file: every tensor in it would be reported missing
        return report
    linears, parameters, tied = _linear_shapes(config)
    formats = _layer_formats(q, linears, report)
    seen, scales = set(), []
    for name, (out_f, in_f) in linears.items():
        if name not in formats:
            continue
        algo, group = formats[name]
        report.quantized_layers += 1
        for suffix, (dtype, shape_of) in EXPECTED[algo].items():
            key = f"{name}.{suffix}"
            if key not in tensors:
                if suffix not in OPTIONAL:
                    report.findings.append(f"{key} is missing.")
                continue
            seen.add(key)
            report.tensors_checked += 1
            got_dtype, got_shape, path = tensors[key]
            want_shape = shape_of(out_f, in_f, group)
            allowed = dtype if isinstance(dtype, tuple) else (dtype,)
            if got_dtype not in allowed:
                report.findings.append(f"{key} is {got_dtype}, expected {' or '.join(allowed)}.")
            per_tensor_as_vector = want_shape == () and got_shape in ((1,), (out_f, 1), (out_f,))
            if got_shape != want_shape and not (per_tensor_as_vector and suffix == "weight_scale"):
                grouping = f", group {group}" if algo in DEFAULT_GROUP else ""
                report.findings.append(f"{key} has shape {list(got_shape)}, expected {list(want_shape)} "
                                       f"(layer {out_f}x{in_f}{grouping}).")
            if suffix != "weight" and got_dtype in allowed and got_dtype != "U8":  # U8 scales: E8M0 exponents
                scales.append((key, path))
    seen |= _check_kv_scales(q.get("kv_cache_quant_algo"), linears, tensors, report, scales)
    _check_values(scales, report)
    # every other parameter (norms, embeddings) must be there, and nothing unknown may be
    for name in sorted(parameters):
        if name in seen or name in tensors:
            seen.add(name)
            continue
        if tied and name == "lm_head.weight":
            continue
        module = name.rsplit(".", 1)[0]
        if not (module in formats and name.endswith(".weight")):
            report.findings.append(f"{name} is missing.")
    unknown = sorted(set(tensors) - seen - parameters)
    if unknown:
        report.findings.append(f"{len(unknown)} tensor(s) the model does not have, e.g. {unknown[0]}.")
    return report


_DTYPE_BYTES = {"U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "BF16": 2, "F16": 2, "F32": 4, "I32": 4, "I64": 8}


def checkpoint_inventory(folder: str | Path) -> list[dict]:
    """What an engine build reads: tensors grouped by role (suffix) and dtype, with their count and size."""
    groups: dict[tuple[str, str], list] = {}
    for name, (dtype, shape, _) in _tensor_index(Path(folder), CheckpointReport(Path(folder))).items():
        module, _, leaf = name.rpartition(".")
        # e.g. weight_scale, norm.weight
        role = leaf if module.endswith("_proj") else f"{module.rpartition('.')[2]}.{leaf}"
        numel = math.prod(shape)
        entry = groups.setdefault((role, dtype), [0, 0, shape])
        entry[0] += 1
        entry[1] += numel * _DTYPE_BYTES[dtype]
    return [{"tensor": role, "dtype": dtype, "count": n, "example shape": list(shape), "MB": round(nbytes / 1e6, 2)}
            for (role, dtype), (n, nbytes, shape) in sorted(groups.items(), key=lambda kv: -kv[1][1])]


def _edit_tensors(folder: Path, edit) -> None:
    path = next(folder.glob("*.safetensors"))
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _set_group_size(folder: Path, size: int) -> None:
    path = folder / "hf_quant_config.json"
    config = json.loads(path.read_text())
    config["quantization"]["group_size"] = size
    path.write_text(json.dumps(config, indent=4))


def _truncate(folder: Path) -> None:
    path = next(folder.glob("*.safetensors"))
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size // 2)


# Ways an export goes wrong, each applied to one layer (`{layer}`) of a copy of a good NVFP4 checkpoint.
DEFECTS = {
    "weight_scale missing": lambda f, layer: _edit_tensors(f, lambda t: t.pop(f"{layer}.weight_scale")),
    "block scales left in float32": lambda f, layer: _edit_tensors(
        f, lambda t: t.update({f"{layer}.weight_scale": t[f"{layer}.weight_scale"].float()})),
    "weight_scale_2 is zero": lambda f, layer: _edit_tensors(
        f, lambda t: t.update({f"{layer}.weight_scale_2": torch.zeros_like(t[f"{layer}.weight_scale_2"])})),
    "group_size 32 in hf_quant_config.json": lambda f, layer: _set_group_size(f, 32),
    "file cut in half": lambda f, layer: _truncate(f),
}


def make_broken_copy(folder: str | Path, target: str | Path, defect: str,
                     layer: str = "model.layers.0.mlp.down_proj") -> Path:
    """A copy of checkpoint `folder` at `target` with one defect from DEFECTS, for the checker to find."""
    target = Path(target)
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(folder, target)
    DEFECTS[defect](target, layer)
    return target
