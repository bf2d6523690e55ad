"""Bring your own model to a served checkpoint: load, check shapes, calibrate with Model Optimizer, export the unified
Hugging Face checkpoint atomically, validate it, and say how to serve it. `python -m labs_lib.quantize` runs this.

Each step is a function with its own test; `quantize_model` chains them and returns the report it writes as
quantization_report.json.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import re
import shlex
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from .errors import LabsError
from .hardware import default_device, reset_peak_memory
from .ptq_formats import PTQ_FORMATS, PtqFormat, get_format, kv_config_name
from .sizing import SPARK_MEMORY_GB, ModelShape, calibration_memory_plan

__all__ = ["DTYPES", "PtqRequest", "pad_token_id", "resolve_device", "check_output", "size_bytes", "max_memory_map",
           "memory_plan", "plan_text", "check_fits", "quant_config", "quantized_linears", "resolve_skip_layers",
           "check_shapes", "Calibrator", "auto_quantize", "calibration_set", "next_steps", "dry_run", "quantize_model"]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_SEQ_LEN = 512  # the calibration length the plan assumes when --max_seq_len is not given
REPORT_FILE = "quantization_report.json"


@dataclass
class PtqRequest:
    """What to quantize and how: one field per CLI flag of `python -m labs_lib.quantize`."""

    model: str
    output: Path
    quant: str = "nvfp4"
    kv_cache: str = "fp8"
    dtype: str = "bf16"
    device: str = "auto"
    device_map: str | None = None
    max_gpu_memory: str | None = None
    max_cpu_memory: str | None = None
    offload_folder: Path | None = None
    clean_offload: bool = False
    trust_remote_code: bool = False
    skip_layers: list[str] = field(default_factory=list)
    dataset_yaml: Path | None = None
    calib_size: int | None = None
    max_seq_len: int | None = None
    batch_size: int = 8
    overwrite: bool = False
    validate: bool = False
    auto_quantize_bits: float | None = None

    @property
    def formats(self) -> list[PtqFormat]:
        """--quant's formats: one, or with --auto_quantize_bits the comma-separated candidates."""
        formats = [get_format(name.strip()) for name in self.quant.split(",")]
        if len(formats) > 1 and self.auto_quantize_bits is None:
            raise LabsError(f"--quant {self.quant} names several formats: add --auto_quantize_bits B to choose among "
                            "them per layer, or give one format.")
        return formats

    @property
    def placement(self) -> str | None:
        """accelerate's device_map: "auto" when asked for, or when a memory limit or an offload folder needs it."""
        if self.device_map:
            return self.device_map
        return "auto" if (self.max_gpu_memory or self.max_cpu_memory or self.offload_folder) else None


def resolve_device(choice: str) -> str:
    """--device auto|cuda|cpu -> cuda or cpu (auto: the labs' policy, the GPU when there is one)."""
    if choice == "auto":
        return default_device()
    if choice == "cuda" and not torch.cuda.is_available():
        raise LabsError("--device cuda but torch sees no GPU: use --device cpu (slow) or a CUDA build of torch.")
    if choice not in ("cuda", "cpu"):
        raise LabsError(f"--device {choice}: use auto, cuda or cpu.")
    return choice


def check_output(output: Path, overwrite: bool) -> None:
    """An existing --output is replaced only with --overwrite."""
    if Path(output).exists() and not overwrite:
        raise LabsError(f"{output} already exists: pass --overwrite to replace it, or choose another --output.")


def size_bytes(flag: str, value: str) -> int:
    """Bytes of a size flag such as 20GiB or 64GB, or a LabsError."""
    from accelerate.utils import convert_file_size_to_int

    try:
        size = convert_file_size_to_int(value)
    except ValueError:
        size = 0
    if size <= 0:
        raise LabsError(f"{flag} {value}: give a size such as 20GiB or 64GB.")
    return size


def max_memory_map(max_gpu: str | None, max_cpu: str | None) -> dict | None:
    """accelerate's max_memory ({gpu index: size, "cpu": size}) from --max_gpu_memory / --max_cpu_memory. A device
    left out of the map gets nothing, so without --max_cpu_memory the CPU gets its available memory: what does not
    fit the GPUs goes to the CPU, not to disk (an H200 run with --max_gpu_memory alone put 16 of 36 modules on disk)."""
    from .models import available_memory_bytes

    if not (max_gpu or max_cpu):
        return None
    limits: dict = {i: max_gpu for i in range(torch.cuda.device_count())} if max_gpu else {}
    limits["cpu"] = max_cpu or available_memory_bytes("cpu")
    return limits


def _available(device: str) -> tuple[list[int], int]:
    """(free bytes of each visible GPU, available CPU bytes)."""
    from .models import available_memory_bytes

    gpus = [available_memory_bytes(f"cuda:{i}") for i in range(torch.cuda.device_count())] if device == "cuda" else []
    return gpus, available_memory_bytes("cpu")


def memory_plan(config, fmt: PtqFormat, dtype: str, batch_size: int, seq_len: int | None, device: str) -> dict:
    """The bytes a run needs (labs_lib.sizing, from the config alone) and what this machine and a DGX Spark have."""
    shape = ModelShape.from_config(config)
    width = torch.finfo(DTYPES[dtype]).bits // 8
    plan = calibration_memory_plan(shape, fmt.layout, width, batch_size, seq_len or DEFAULT_SEQ_LEN)
    gpus, cpu = _available(device)
    gpu = sum(gpus)
    plan.update({"dtype": dtype, "format": fmt.name, "batch_size": batch_size, "seq_len": seq_len or DEFAULT_SEQ_LEN,
                 "gpu_free_bytes": gpu, "first_gpu_free_bytes": gpus[0] if gpus else 0, "cpu_available_bytes": cpu,
                 "fits_gpu": device == "cuda" and plan["peak_bytes"] <= gpu,
                 "fits_gpu_and_cpu": plan["peak_bytes"] <= gpu + cpu,
                 "fits_spark": plan["peak_bytes"] <= SPARK_MEMORY_GB * 1e9})
    return plan


def plan_text(plan: dict) -> str:
    """The plan as the lines --dry_run prints."""
    gb = lambda b: f"{b / 1e9:,.2f} GB"  # noqa: E731
    yes = lambda ok: "yes" if ok else "no"  # noqa: E731
    return "\n".join([
        f"parameters: {plan['parameters']:,}",
        f"weights in {plan['dtype']}: {gb(plan['weights_bytes'])}",
        f"peak while calibrating (batch {plan['batch_size']} x {plan['seq_len']} tokens): {gb(plan['peak_bytes'])}",
        f"{plan['format']} checkpoint: {gb(plan['output_bytes'])}",
        f"this machine: GPU free {gb(plan['gpu_free_bytes'])}, CPU available {gb(plan['cpu_available_bytes'])}",
        f"fits the GPU(s): {yes(plan['fits_gpu'])}; fits GPU + CPU (offload): {yes(plan['fits_gpu_and_cpu'])}; "
        f"fits a {SPARK_MEMORY_GB} GB DGX Spark: {yes(plan['fits_spark'])}",
    ])


def check_fits(plan: dict, device: str, request: PtqRequest) -> None:
    """Refuse before loading when the calibration peak exceeds the memory this run may use: the device's, plus the
    CPU's under a device map (capped by --max_*_memory); disk offload (--offload_folder) lifts the limit."""
    gpu, cpu = plan["gpu_free_bytes"], plan["cpu_available_bytes"]
    if request.max_gpu_memory:
        gpu = min(gpu, size_bytes("--max_gpu_memory", request.max_gpu_memory) * torch.cuda.device_count())
    if request.max_cpu_memory:
        cpu = min(cpu, size_bytes("--max_cpu_memory", request.max_cpu_memory))
    if request.offload_folder:
        return
    one_device = plan["first_gpu_free_bytes"] if device == "cuda" else cpu  # no device map: all on one device
    budget = one_device if request.placement is None else gpu + cpu
    if plan["peak_bytes"] > budget:
        raise LabsError(f"Not enough memory: calibration needs about {plan['peak_bytes'] / 1e9:,.2f} GB and this run "
                        f"may use {budget / 1e9:,.2f} GB; use --device_map auto with --max_gpu_memory, "
                        "--offload_folder DIR, a smaller --batch_size or --dtype bf16.\n" + plan_text(plan))


def _quantizer_enabled(config: dict, quantizer: str, parent_class: str) -> bool:
    """Whether Model Optimizer's ordered quant_cfg list leaves `quantizer` on (later entries override earlier)."""
    on = False
    for entry in config["quant_cfg"]:
        if entry.get("parent_class") not in (None, parent_class) or not fnmatch.fnmatch(quantizer,
                                                                                        entry["quantizer_name"]):
            continue
        if "enable" in entry:
            on = bool(entry["enable"])
        elif "cfg" in entry:
            on = True
    return on


def quant_config(fmt: PtqFormat, kv_cache: str, skipped: list[str]) -> dict:
    """The format's Model Optimizer config, then the KV-cache config's entries, then one entry per skipped layer that
    turns its quantizers off (quant_cfg is an ordered list: the last match wins)."""
    from .modelopt_ptq import modelopt_config

    base = modelopt_config(fmt.config)
    entries = copy.deepcopy(list(base["quant_cfg"]))
    kv = kv_config_name(kv_cache)
    if kv is not None:
        entries += copy.deepcopy(list(modelopt_config(kv)["quant_cfg"]))
    entries += [{"quantizer_name": f"{name}.*", "enable": False} for name in skipped]
    return {"quant_cfg": entries, "algorithm": copy.deepcopy(base.get("algorithm"))}


def quantized_linears(model: torch.nn.Module, config: dict) -> dict[str, torch.nn.Linear]:
    """The Linear layers whose weights `config` quantizes (its defaults skip lm_head, routers and the like)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            and _quantizer_enabled(config, f"{name}.weight_quantizer", "nn.Linear")}


def resolve_skip_layers(patterns: list[str], model: torch.nn.Module) -> list[str]:
    """The Linear layers the --skip_layers glob patterns name; a pattern that names none is an error."""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    chosen = set()
    for pattern in patterns:
        matched = [n for n in names if n == pattern or fnmatch.fnmatch(n, pattern)]
        if not matched:
            raise LabsError(f"--skip_layers '{pattern}' matches no Linear layer; names look like {names[0]} "
                            f"(glob patterns: lm_head, *.mlp.gate, model.layers.0.*).")
        chosen.update(matched)
    return sorted(chosen)


def check_shapes(linears: dict[str, torch.nn.Linear], fmt: PtqFormat) -> None:
    """A block format needs every quantized Linear's input width to be a multiple of its block: otherwise name the
    layers, and suggest --skip_layers patterns and the formats that fit."""
    if not fmt.block:
        return
    bad = {n: m.in_features for n, m in linears.items() if m.in_features % fmt.block}
    if not bad:
        return
    patterns = sorted({re.sub(r"\.\d+\.", ".*.", n) for n in bad})
    widths = {m.in_features for m in linears.values()}
    fitting = [f.name for f in PTQ_FORMATS.values() if not f.block or all(w % f.block == 0 for w in widths)]
    examples = ", ".join(f"{n} ({w})" for n, w in list(bad.items())[:3])
    raise LabsError(f"--quant {fmt.name} quantizes blocks of {fmt.block} inputs, which do not divide the input width "
                    f"of {len(bad)} layer(s): {examples}{f' and {len(bad) - 3} more' if len(bad) > 3 else ''}.\n"
                    f"Skip them with --skip_layers {' '.join(shlex.quote(p) for p in patterns)}, or choose a format "
                    f"that fits: {', '.join(fitting)}.")


def pad_token_id(tokenizer) -> int:
    """The id that pads calibration batches: the tokenizer's pad token, else its end-of-sequence token, else 0."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


class Calibrator:
    """Model Optimizer's forward loop: the calibration samples in padded batches (longest first, with an attention
    mask), through the decoder only (the lm_head is never quantized, so its logits are not computed). On CUDA out of
    memory the batch size halves and the batch is run again (max-calibration statistics do not change when a batch
    is seen twice)."""

    def __init__(self, samples: list[torch.Tensor], batch_size: int, pad_id: int,
                 log: Callable[[str], None] = print, forward: Callable | None = None):
        if batch_size < 1:
            raise LabsError(f"--batch_size {batch_size}: use 1 or more.")
        self.samples = sorted(samples, key=len, reverse=True)
        self.batch_size, self.pad_id, self.log = batch_size, pad_id, log
        self.forward = forward or self._decoder_forward

    @staticmethod
    def input_device(model) -> torch.device:
        """Where the token ids go: the embedding's device (an offloaded embedding: the CPU, accelerate moves it)."""
        device = model.get_input_embeddings().weight.device
        return torch.device("cpu") if device.type == "meta" else device

    def _decoder_forward(self, model, ids: torch.Tensor, mask: torch.Tensor):
        decoder, device = getattr(model, "base_model", model), self.input_device(model)
        return decoder(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)

    def labelled_batches(self) -> list[dict[str, torch.Tensor]]:
        """The batches with next-token labels (-100 on padding), for AutoQuantize's loss."""
        batches = []
        for start in range(0, len(self.samples), self.batch_size):
            ids, mask = self.batch(self.samples[start : start + self.batch_size])
            batches.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
        return batches

    def batch(self, chunk: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded token ids and their attention mask."""
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, sample in enumerate(chunk):
            ids[row, : len(sample)] = sample
            mask[row, : len(sample)] = 1
        return ids, mask

    def __call__(self, model) -> None:
        done = 0
        with torch.no_grad(), tqdm(total=len(self.samples), desc="calibrating", unit="sample") as bar:
            while done < len(self.samples):
                chunk = self.samples[done : done + self.batch_size]
                try:
                    self.forward(model, *self.batch(chunk))
                except torch.cuda.OutOfMemoryError:
                    if self.batch_size == 1:
                        raise LabsError("CUDA out of memory with batch size 1: lower --max_seq_len, or give the "
                                        "model less GPU memory (--device_map auto --max_gpu_memory) so that "
                                        "activations fit.") from None
                    self.batch_size //= 2
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    self.log(f"CUDA out of memory: batch size halved to {self.batch_size}, batch run again.")
                    continue
                done += len(chunk)
                bar.update(len(chunk))


def auto_quantize(model, formats: list[PtqFormat], kv_cache: str, skipped: list[str], bits: float,
                  calibrator: Calibrator):
    """Model Optimizer's AutoQuantize: for each layer group one of `formats` or none, chosen by the loss gradient on
    the calibration batches so that weights average `bits` per value (Model Optimizer counts what stays unquantized,
    the lm_head included, at 16); then the KV-cache quantizers, calibrated alone. No out-of-memory halving here."""
    from .modelopt_ptq import modelopt_config, require_modelopt

    mtq = require_modelopt()
    batches, device = calibrator.labelled_batches(), calibrator.input_device(model)

    def forward_step(m, batch):
        return m(**{k: v.to(device) for k, v in batch.items()}, use_cache=False)

    try:
        model, _ = mtq.auto_quantize(model, constraints={"effective_bits": bits},
                                     quantization_formats=[f.config for f in formats], data_loader=batches,
                                     forward_step=forward_step, loss_func=lambda output, batch: output.loss,
                                     disabled_layers=["*lm_head*", *skipped], num_calib_steps=len(batches),
                                     num_score_steps=len(batches))
    except (ValueError, AssertionError) as exc:  # Model Optimizer's two ways of saying the budget cannot be met
        if "effective_bits" not in str(exc):
            raise
        raise LabsError(f"--auto_quantize_bits {bits}: {exc}") from None
    kv = kv_config_name(kv_cache)
    if kv is not None:
        entries = list(modelopt_config(kv)["quant_cfg"])
        mtq.set_quantizer_by_cfg(model, entries)
        with mtq.set_quantizer_by_cfg_context(model, [{"quantizer_name": "*", "enable": False}, *entries]):
            mtq.calibrate(model, algorithm="max", forward_loop=calibrator)
    return model


def calibration_set(request: PtqRequest, tokenizer):
    """The calibration samples of --dataset_yaml (or the default sources) from labs_lib.calibration."""
    from .calibration import build_calibration_set, load_calibration_spec
    from .network import hub_reachable

    spec = load_calibration_spec(request.dataset_yaml, online=hub_reachable())
    return build_calibration_set(spec, tokenizer, n_samples=request.calib_size, max_seq_len=request.max_seq_len)


def next_steps(folder: Path) -> list[str]:
    """How to serve the checkpoint on the course's port, each route with the request its server answers: the container
    serves the folder as /model, trtllm-serve and vllm serve under its path; vLLM gets the FP8 KV cache it holds."""
    from .trtllm import SERVE_PORT, SERVED_MODEL, playbook_request, serve_command

    path = str(Path(folder).resolve())
    quant_config = Path(folder) / "hf_quant_config.json"
    kv_algo = json.loads(quant_config.read_text())["quantization"].get("kv_cache_quant_algo") \
        if quant_config.exists() else None
    kv_flag = " --kv-cache-dtype fp8" if kv_algo == "FP8" else ""  # vLLM's "auto" keeps a 16-bit cache in older builds

    def curl(model: str, when: str = "then") -> str:
        url, body = playbook_request(model=model, port=SERVE_PORT)
        return f"  {when}: curl -s {url} -H 'Content-Type: application/json' -d '{json.dumps(body)}'"

    return [f"TensorRT-LLM in NVIDIA's container (serves it as {SERVED_MODEL}): docker/run_trtllm.sh {path}",
            curl(SERVED_MODEL),
            f"TensorRT-LLM where it is installed: {serve_command(model=path, port=SERVE_PORT)}",
            f"vLLM: vllm serve {path} --port {SERVE_PORT}{kv_flag}",
            curl(path, "then, for either (both answer to the folder's path)")]


def _model_bytes(model: torch.nn.Module) -> tuple[int, int]:
    params = list(model.parameters())  # a tied lm_head is one parameter
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


def _placement(model) -> dict[str, int] | None:
    """How many of the model's modules accelerate put on each device (GPU index, cpu, disk); None without a map."""
    device_map = getattr(model, "hf_device_map", None)
    if not device_map or len(device_map) < 2 and "" in device_map:  # one device for everything: no map to report
        return None
    return dict(Counter(str(d) for d in device_map.values()))


def _peak_bytes(device: str) -> list[int]:
    """Peak allocated bytes of each GPU, or the process's peak resident set on a CPU."""
    from .hardware import peak_memory_bytes

    if device == "cuda":
        return [torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())]
    return [peak_memory_bytes("cpu")]


def dry_run(request: PtqRequest) -> dict:
    """The memory plan of `request` from the model's config alone (no weights read); the checkpoint size is that of
    --quant's first format."""
    from .models import model_config

    fmt, device = request.formats[0], resolve_device(request.device)
    if request.dtype not in DTYPES:
        raise LabsError(f"--dtype {request.dtype}: use one of {', '.join(DTYPES)}.")
    return memory_plan(model_config(request.model, request.trust_remote_code), fmt, request.dtype,
                       request.batch_size, request.max_seq_len, device)


def quantize_model(request: PtqRequest, log: Callable[[str], None] = print) -> dict:
    """Plan -> load -> shape check -> calibrate -> export (atomic: tokenizer, validation and report inside). Returns
    the report, which quantization_report.json holds too."""
    from .models import load_model, load_tokenizer
    from .modelopt_ptq import modelopt_export, modelopt_quantize

    check_output(request.output, request.overwrite)
    kv_config_name(request.kv_cache)
    plan = dry_run(request)
    formats, device = request.formats, resolve_device(request.device)
    for fmt in formats:
        if fmt.needs_cuda and device != "cuda":
            raise LabsError(f"--quant {fmt.name} calibrates only on a GPU (Model Optimizer needs CUDA for it); "
                            "use --device cuda or another format.")
    check_fits(plan, device, request)
    seconds: dict[str, float] = {}
    reset_peak_memory()
    try:
        start = time.perf_counter()
        model = load_model(request.model, DTYPES[request.dtype], device, trust_remote_code=request.trust_remote_code,
                           device_map=request.placement,
                           max_memory=max_memory_map(request.max_gpu_memory, request.max_cpu_memory),
                           offload_folder=request.offload_folder)
        tokenizer = load_tokenizer(request.model, request.trust_remote_code)
        parameters, bytes_before = _model_bytes(model)
        skipped = resolve_skip_layers(request.skip_layers, model)
        for fmt in formats:
            check_shapes(quantized_linears(model, quant_config(fmt, request.kv_cache, skipped)), fmt)
        seconds["load"] = time.perf_counter() - start

        start = time.perf_counter()
        calib = calibration_set(request, tokenizer)
        seconds["calibration data"] = time.perf_counter() - start
        calibrator = Calibrator(list(calib.samples), request.batch_size, pad_token_id(tokenizer), log)
        start = time.perf_counter()
        if request.auto_quantize_bits is None:
            modelopt_quantize(model, quant_config(formats[0], request.kv_cache, skipped), forward_loop=calibrator)
        else:
            model = auto_quantize(model, formats, request.kv_cache, skipped, request.auto_quantize_bits, calibrator)
        seconds["quantize"] = time.perf_counter() - start

        report = {"model": request.model, "format": request.quant,
                  "model_optimizer_config": ",".join(f.config for f in formats),
                  "auto_quantize_bits": request.auto_quantize_bits,
                  "kv_cache": request.kv_cache, "dtype": request.dtype, "device": device,
                  "device_map": request.placement, "placement": _placement(model),
                  "skipped_layers": skipped,
                  "calibration": {"sources": calib.sources, "samples": len(calib.samples), "tokens": calib.tokens,
                                  "batch_size": calibrator.batch_size},
                  "parameters": parameters, "bytes_before": bytes_before, "plan": plan}

        def fill(folder: Path) -> None:
            seconds["export"] = time.perf_counter() - start
            for step in tqdm(["tokenizer", "validate", "report"], desc="export", unit="step"):
                if step == "tokenizer":
                    tokenizer.save_pretrained(folder)
                elif step == "validate" and request.validate:
                    from .checkpoint_check import check_checkpoint

                    begin = time.perf_counter()
                    check = check_checkpoint(folder)
                    seconds["validate"] = time.perf_counter() - begin
                    summary = {k: v for k, v in check.summary().items() if k not in ("checkpoint", "problems",
                                                                                     "warnings")}
                    report["validation"] = summary | {"ok": check.ok, "problems": check.problems,
                                                      "warnings": check.warnings}
                elif step == "report":
                    quant = json.loads((folder / "hf_quant_config.json").read_text())["quantization"]
                    layers = quant.get("quantized_layers") or {}
                    report.update({"quant_algo": quant.get("quant_algo"),
                                   "layers_per_quant_algo": dict(Counter(v["quant_algo"] for v in layers.values())),
                                   "kv_cache_quant_algo": quant.get("kv_cache_quant_algo"),
                                   "exclude_modules": quant.get("exclude_modules", []),
                                   "bytes_after": sum(p.stat().st_size for p in folder.glob("*.safetensors"))})
                    report.update({"seconds": {k: round(v, 2) for k, v in seconds.items()},
                                   "peak_memory_bytes": _peak_bytes(device)})
                    (folder / REPORT_FILE).write_text(json.dumps(report, indent=1, default=str))

        start = time.perf_counter()
        modelopt_export(model, request.output, fill)
    finally:
        if request.clean_offload and request.offload_folder:
            shutil.rmtree(request.offload_folder, ignore_errors=True)
    report["next_steps"] = next_steps(request.output)
    return report
