"""Every variant Lab 07 compares, one class per kind behind one interface: `build(ctx) -> Built`.

All are built from the same base model and calibration batches. What takes minutes (GPTQ, AWQ, GGUF files)
is cached on disk by (model, method, settings, calibration), so a second run, or a later lab, reuses it.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .blockquant import MXFP4, NVFP4, IntGroup, PerTensor, Scheme
from .errors import LabsError
from .evaluate import storage_report
from .fake_quant import calibrate_input_amax, fake_quantized_copy
from .files import atomic_folder, atomic_path
from .layerwise import SKIP, linear_layers
from .models import cache_path, calibration_key
from .quantizer import Quantizer, settings_key

__all__ = ["BuildContext", "Built", "Cast", "FakeQuant", "SmoothQuantW8A8", "QuantizedKV", "QAT", "MixedPrecision",
           "Layerwise", "BitsAndBytes", "GGUF", "default_variants", "group_size_for"]


@dataclass
class BuildContext:
    """What every variant is built from: the base model (float32), its name and tokenizer, the calibration batches,
    and the cache root (None: labs_lib.models.cache_dir())."""

    model_name: str
    base: torch.nn.Module
    tokenizer: Any
    batches: torch.Tensor
    cache: Path | None = None
    _input_amax: dict | None = field(default=None, repr=False)

    def input_amax(self) -> dict:
        """Static per-tensor activation ranges of every Linear, calibrated once and shared by W8A8 and W4A4."""
        if self._input_amax is None:
            self._input_amax = calibrate_input_amax(self.base, self.batches)
        return self._input_amax


@dataclass
class Built:
    name: str
    engine: str  # "transformers" (a torch model, evaluated in BF16) or "llama.cpp" (a GGUF file)
    model: Any
    bits_per_weight: float  # the decoder's Linear weights, their scales included (a GGUF's too: linear_bits_per_weight)
    size_mb: float  # the whole checkpoint: quantized Linears plus every other tensor in BF16 (or the GGUF file)
    build_s: float
    cached: bool = False


def _size(model, scheme: Scheme | None, skip: tuple[str, ...] = SKIP) -> tuple[float, float]:
    """(bits per quantized weight, checkpoint MB) from evaluate.storage_report; 16 bits without a scheme."""
    report = storage_report(model, scheme, skip=skip)
    return round(report["bits/weight"], 3), round(report["total_bytes"] / 1e6, 1)


@dataclass
class Cast:
    """The base model cast to a 16-bit float type: the reference every other variant is compared with."""

    name: str = "BF16"
    dtype: torch.dtype = torch.bfloat16

    def build(self, ctx: BuildContext) -> Built:
        start = time.perf_counter()
        model = copy.deepcopy(ctx.base).to(self.dtype)
        return Built(self.name, "transformers", model, *_size(model, None), round(time.perf_counter() - start, 1))


@dataclass
class FakeQuant:
    """Weights (and, for W8A8/W4A4, inputs with calibrated static ranges) rounded to a scheme from
    labs_lib.blockquant."""

    name: str
    weights: Scheme
    activations: Scheme | None = None

    def build(self, ctx: BuildContext) -> Built:
        start = time.perf_counter()
        amax = ctx.input_amax() if self.activations is not None else None
        model = fake_quantized_copy(ctx.base, self.weights, self.activations, amax).to(torch.bfloat16)
        seconds = round(time.perf_counter() - start, 1)
        return Built(self.name, "transformers", model, *_size(model, self.weights), seconds)


def _placement_key(model) -> str:
    """The part of a cache key that keeps results of one dtype and device type apart (e.g. 'bfloat16-cuda')."""
    base = next(model.parameters())
    return f"{str(base.dtype).removeprefix('torch.')}-{base.device.type}"


def _save_codes(folder: Path, codes: dict[str, dict[str, torch.Tensor]], changed: dict[str, torch.Tensor]) -> None:
    """Cache what a scheme's `quantize` gave for each Linear, and the other parameters a method changed."""
    from safetensors.torch import save_file

    flat = {f"{n}.{part}": t.contiguous() for n, q in codes.items() for part, t in q.items()}
    with atomic_folder(folder) as tmp:
        save_file(flat, tmp / "codes.safetensors")
        save_file(changed, tmp / "changed.safetensors")


@torch.no_grad()
def _load_codes(folder: Path, model, scheme: Scheme, skip: tuple[str, ...]) -> None:
    """Put a `_save_codes` cache into `model` in place: changed parameters, then each Linear's dequantized weight."""
    from safetensors.torch import load_file

    stored: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(folder / "codes.safetensors").items():
        name, _, part = key.rpartition(".")
        stored.setdefault(name, {})[part] = tensor
    for name, tensor in load_file(folder / "changed.safetensors").items():
        model.get_parameter(name).copy_(tensor)
    for name, linear in linear_layers(model, skip).items():
        linear.weight.copy_(scheme.dequantize(stored[name]).reshape(linear.weight.shape))


@dataclass
class SmoothQuantW8A8:
    """INT8 W8A8 (labs_lib.smoothquant.W8A8) after SmoothQuant's per-channel scales are folded into the model (Lab 10):
    each input's static per-tensor amax is that of the smoothed activations."""

    name: str
    alpha: float = 1.0  # Model Optimizer's SmoothQuantCalibConfig default, and Lab 10's best in its quick run

    def build(self, ctx: BuildContext) -> Built:
        from .smoothquant import W8A8, channel_amax, smooth_model, smoothed_input_amax

        start = time.perf_counter()
        act_amax = channel_amax(ctx.base, ctx.batches)
        smoothed = copy.deepcopy(ctx.base)
        scales = smooth_model(smoothed, act_amax, self.alpha)
        model = fake_quantized_copy(smoothed, *W8A8, input_amax=smoothed_input_amax(act_amax, scales))
        del smoothed
        model = model.to(torch.bfloat16)
        return Built(self.name, "transformers", model, *_size(model, W8A8[0]), round(time.perf_counter() - start, 1))


@dataclass
class QuantizedKV:
    """Weights fake-quantized as FakeQuant does, and a KV cache in `kv` (labs_lib.kv_cache, Lab 10): K and V of every
    layer rounded with a per-layer amax calibrated on the base model over the calibration batches joined into rows of
    `calib_len` tokens, so that every position an evaluation window of that length reaches is calibrated."""

    name: str
    weights: Scheme
    kv: str = "fp8"
    calib_len: int = 1024

    def build(self, ctx: BuildContext) -> Built:
        from .kv_cache import KV_FORMATS, KVQuant, attach_kv_quant, calibrate_kv_amax

        start = time.perf_counter()
        tokens = ctx.batches.flatten()
        rows = len(tokens) // self.calib_len
        if rows == 0:
            raise LabsError(f"{len(tokens)} calibration tokens make no row of {self.calib_len}: use more calibration "
                            "samples, or a shorter window.")
        amax = calibrate_kv_amax(ctx.base, tokens[: rows * self.calib_len].reshape(rows, self.calib_len))
        model = fake_quantized_copy(ctx.base, self.weights).to(torch.bfloat16)
        attach_kv_quant(model, KVQuant(KV_FORMATS[self.kv], amax))
        seconds = round(time.perf_counter() - start, 1)
        return Built(self.name, "transformers", model, *_size(model, self.weights), seconds)


@dataclass
class QAT:
    """Quantization-aware distillation (labs_lib.qat, Lab 11): a float32 copy whose Linears compute with `scheme`'s
    round trip, trained `steps` AdamW steps towards the base model's logits on the calibration batches (cycled), then
    rounded to `scheme` as FakeQuant does. The cache holds the trained weights' codes (as Layerwise's does), keyed by
    model, every field, the base model's dtype and device type, and the calibration batches."""

    name: str
    scheme: Scheme
    steps: int
    batch_size: int = 2
    lr: float = 1e-4  # Lab 11's QAT_LR

    def _folder(self, ctx: BuildContext) -> Path:
        return cache_path("variants", ctx.model_name, "qat", settings_key(self), _placement_key(ctx.base),
                          calibration_key(ctx.batches),
                          root=ctx.cache)

    def build(self, ctx: BuildContext) -> Built:
        from .qat import distill, prepare_qat, remove_qat

        start = time.perf_counter()
        folder = self._folder(ctx)
        cached = (folder / "codes.safetensors").is_file()
        if cached:
            model = copy.deepcopy(ctx.base)
            _load_codes(folder, model, self.scheme, SKIP)
        else:
            model = copy.deepcopy(ctx.base).float()  # FP32 master weights, as Lab 11 trains them
            prepare_qat(model, self.scheme)
            distill(model, ctx.base, ctx.batches, self.steps, lr=self.lr, batch_size=self.batch_size, desc=self.name)
            remove_qat(model)
            codes = {}
            with torch.no_grad():
                for name, linear in linear_layers(model).items():
                    codes[name] = self.scheme.quantize(linear.weight)
                    linear.weight.copy_(self.scheme.dequantize(codes[name]).reshape(linear.weight.shape))
            _save_codes(folder, codes, {})
        model = model.to(torch.bfloat16)
        seconds = round(time.perf_counter() - start, 1)
        return Built(self.name, "transformers", model, *_size(model, self.scheme), seconds, cached)


@dataclass
class MixedPrecision:
    """Lab 11's mixed-precision pick (labs_lib.sensitivity): each decoder block quantized alone to `low` and scored on
    the first `sensitivity_rows` calibration batches; the most sensitive blocks stay in `high` while the effective bits
    stay within `budget_bits`; every other block in `low`. The per-block perplexities are cached (JSON) by model,
    `low`, the base model's dtype and device type, and the scored rows."""

    name: str
    low: Scheme
    high: Scheme
    budget_bits: float = 5.0  # Lab 11's BUDGET_BITS
    sensitivity_rows: int = 4
    kept: list[str] = field(default_factory=list, init=False)  # the blocks the last build kept in `high`

    def build(self, ctx: BuildContext) -> Built:
        from .sensitivity import block_linears, block_sensitivity, mixed_precision_copy, pick_under_budget

        start = time.perf_counter()
        blocks = block_linears(ctx.base)
        scored = ctx.batches[: self.sensitivity_rows]
        path = cache_path("variants", ctx.model_name, "sensitivity", self.low.name, _placement_key(ctx.base),
                          calibration_key(scored),
                          root=ctx.cache) / "rows.json"
        cached = path.is_file()
        if cached:  # the per-block perplexities (seconds of forward passes each); the pick itself is instant
            rows = json.loads(path.read_text())
        else:
            _, rows = block_sensitivity(ctx.base, self.low, scored.flatten(), scored.shape[1], blocks)
            with atomic_path(path) as tmp:
                tmp.write_text(json.dumps(rows))
        self.kept = pick_under_budget(rows, self.budget_bits, self.low, self.high)
        model = mixed_precision_copy(ctx.base, blocks, self.low, self.high, self.kept).to(torch.bfloat16)
        report = storage_report(model, self.low)  # every Linear in `low`; then the kept ones at `high` instead
        linears = linear_layers(model)
        shapes = [tuple(linears[n].weight.shape) for b in self.kept for n in blocks[b]]
        extra = sum(self.high.storage_bytes(s) - self.low.storage_bytes(s) for s in shapes)
        n = sum(layer.weight.numel() for layer in linears.values())
        bits = round((report["quantized_bytes"] + extra) * 8 / n, 3)
        return Built(self.name, "transformers", model, bits, round((report["total_bytes"] + extra) / 1e6, 1),
                     round(time.perf_counter() - start, 1), cached)


@dataclass
class Layerwise:
    """A labs_lib.quantizer.Quantizer (GPTQ, AWQ, RTN) applied to the base model on the calibration batches.

    The cache holds what the method returns for each Linear (codes, scales, zeros), plus the few other tensors the
    method changed (AWQ folds its scales into the norms), so a cached build is exact, not re-run.
    """

    name: str
    method: Quantizer

    def _folder(self, ctx: BuildContext) -> Path:
        """The cache folder: model, method (its type and every constructor field) and calibration batches."""
        return cache_path("variants", ctx.model_name, self.method.name, settings_key(self.method),
                          calibration_key(ctx.batches), root=ctx.cache)

    def build(self, ctx: BuildContext) -> Built:
        start = time.perf_counter()
        folder, model, skip = self._folder(ctx), copy.deepcopy(ctx.base), self.method.skip
        cached = (folder / "codes.safetensors").is_file()
        if cached:
            _load_codes(folder, model, self.method.scheme, skip)
        else:
            codes = self.method.quantize_model(model, ctx.batches)
            base = dict(ctx.base.named_parameters())
            linears = {f"{n}.weight" for n in linear_layers(model, skip)}
            changed = {n: p.detach().contiguous() for n, p in model.named_parameters()
                       if n not in linears and not torch.equal(p, base[n])}
            _save_codes(folder, codes, changed)
        model = model.to(torch.bfloat16)
        seconds = round(time.perf_counter() - start, 1)
        return Built(self.name, "transformers", model, *_size(model, self.method.scheme, skip), seconds, cached)


def _not_cast_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")


@dataclass
class BitsAndBytes:
    """bitsandbytes, quantizing while transformers loads the checkpoint: LLM.int8 or 4-bit NF4."""

    name: str
    four_bit: bool = False

    def build(self, ctx: BuildContext) -> Built:
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        from .models import model_folder

        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise LabsError("bitsandbytes is not installed: pip install bitsandbytes==0.50.2 "
                            "(in requirements.txt).") from None
        start = time.perf_counter()
        nf4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
        config = BitsAndBytesConfig(**nf4) if self.four_bit else BitsAndBytesConfig(load_in_8bit=True)
        device = next(ctx.base.parameters()).device
        model = AutoModelForCausalLM.from_pretrained(model_folder(ctx.model_name), quantization_config=config,
                                                     dtype=torch.bfloat16, device_map=str(device))
        # LLM.int8 always multiplies in float16; bitsandbytes logs so on every call of a bf16 model (1,000+ lines)
        bnb_log = logging.getLogger("bitsandbytes.autograd._functions")
        if _not_cast_notice not in bnb_log.filters:
            bnb_log.addFilter(_not_cast_notice)
        return Built(self.name, "transformers", model, *self._size(model), round(time.perf_counter() - start, 1))

    @staticmethod
    def _size(model) -> tuple[float, float]:
        """Bytes of the tensors save_pretrained writes: codes plus quantization statistics; tied tensors once."""
        linears = linear_layers(model)
        quantized = sum(t.numel() * t.element_size() for layer in linears.values() for t in layer.state_dict().values())
        unique = {t.data_ptr(): t.numel() * t.element_size() for t in model.state_dict().values()}
        n = sum(layer.in_features * layer.out_features for layer in linears.values())
        return round(quantized * 8 / n, 3), round(sum(unique.values()) / 1e6, 1)


@dataclass
class GGUF:
    """A GGUF file made by llama.cpp (llama.cpp's converter to F16, then llama_model_quantize), run by llama.cpp."""

    name: str
    qtype: str

    def build(self, ctx: BuildContext) -> Built:
        from .gguf_io import linear_bits_per_weight, read_gguf
        from .llamacpp import gguf_file, gguf_for

        start = time.perf_counter()
        cached = gguf_file(ctx.model_name, self.qtype).is_file()
        path = gguf_for(ctx.model_name, self.qtype)
        info = read_gguf(path)
        return Built(self.name, "llama.cpp", path, linear_bits_per_weight(info), round(info["file_bytes"] / 1e6, 1),
                     round(time.perf_counter() - start, 1), cached)


def group_size_for(model, preferred: int = 128) -> int:
    """The largest of 128, 64, 32 that divides every Linear's input width (SmolLM2's 576 takes 64)."""
    widths = {layer.in_features for layer in linear_layers(model).values()}
    for size in (preferred, 64, 32):
        if all(w % size == 0 for w in widths):
            return size
    raise LabsError(f"No group size of 128, 64 or 32 divides the input widths {sorted(widths)}.")


def default_variants(model, window: int = 1024, qat_steps: int = 8, qat_batch: int = 2,
                     sensitivity_rows: int = 4) -> list:
    """Lab 07's variants, in the order of its table. `window`: the evaluation window the KV amax is calibrated
    for; `qat_steps` x `qat_batch`: the QAT variant's training; `sensitivity_rows`: rows the mixed pick scores on."""
    from .awq import AWQ
    from .gptq import GPTQ

    group = IntGroup(4, group_size_for(model), symmetric=False)
    return [
        Cast(),
        FakeQuant("FP8 W8A8", PerTensor("fp8_e4m3"), PerTensor("fp8_e4m3")),
        BitsAndBytes("INT8 LLM.int8 (bitsandbytes)"),
        BitsAndBytes("NF4 (bitsandbytes)", four_bit=True),
        FakeQuant("NVFP4 W4A16", NVFP4()),
        FakeQuant("NVFP4 W4A4", NVFP4(), NVFP4()),
        FakeQuant("MXFP4 W4A16", MXFP4()),
        SmoothQuantW8A8("INT8 W8A8 SmoothQuant"),
        QuantizedKV("NVFP4 W4A16 + FP8 KV cache", NVFP4(), "fp8", calib_len=window),
        QAT("NVFP4 W4A16 QAT", NVFP4(), steps=qat_steps, batch_size=qat_batch),
        MixedPrecision("NVFP4 + FP8 mixed (5 bits)", NVFP4(), PerTensor("fp8_e4m3"), budget_bits=5.0,
                       sensitivity_rows=sensitivity_rows),
        Layerwise(f"GPTQ INT4 g{group.group_size}", GPTQ(group)),
        Layerwise(f"AWQ INT4 g{group.group_size}", AWQ(group)),
        GGUF("GGUF F16", "F16"),  # llama.cpp's own reference: the GGUF rows below compare with it
        GGUF("GGUF Q8_0", "Q8_0"),
        GGUF("GGUF Q4_K_M", "Q4_K_M"),
    ]
