"""Batch-1 decode speed of a Llama-shaped model against its memory-bandwidth floor, in BF16 and with FP8 weights.

At batch 1 every weight is read once per token, so a step can never take less than bytes / bandwidth. Eager
PyTorch spends most of a step launching hundreds of small kernels; a static KV cache lets the whole step be
captured once as a CUDA graph (optionally after torch.compile fuses the small kernels) and replayed per token.
Weights are random: speed does not depend on their values. `python -m labs_lib.decode_speed` on a GPU writes
results/08_engine_gpu.json.
"""

from __future__ import annotations

import time
import torch
import torch.nn.functional as F

from .blockquant import E4M3_MAX
from .errors import LabsError
from .gemv import PackedWeight, gemv_op, pack_weight
from .roofline import LLAMA_3_1_8B
from .sizing import ModelShape

__all__ = ["DecodeModel", "time_decode", "time_prefill", "kernel_breakdown", "measure_copy_bandwidth",
           "GPU_DECODE_FILE", "WEIGHT_LABELS"]

WEIGHT_LABELS = {"bf16": "BF16 (Triton GEMV)", "fp8": "FP8 E4M3 (per-channel, Triton GEMV)",
                 "int4": "INT4 g128 (Triton GEMV)", "nvfp4": "NVFP4 (Triton GEMV)"}

GPU_DECODE_FILE = "08_engine_gpu.json"
PREFILL_TOKENS = 2048  # the prompt length of the prefill measurement: RoPE tables cover at least this many positions


class DecodeModel:
    """A Llama decoder as plain tensors: fused QKV and gate/up projections, RoPE, GQA over a static KV cache."""

    def __init__(self, shape: ModelShape, max_len: int = 512, device: str = "cuda", dtype=torch.bfloat16,
                 seed: int = 0, rope_theta: float = 500000.0):
        torch.manual_seed(seed)
        s, d = shape, shape.head_dim
        self.shape, self.max_len, self.device, self.dtype = shape, max_len, device, dtype

        def w(n_out, n_in):  # scaled like a trained layer, so activations stay O(1)
            return (torch.randn(n_out, n_in, device=device, dtype=dtype) / n_in ** 0.5).contiguous()

        self.embedding = torch.randn(s.vocab, s.hidden, device=device, dtype=dtype)
        self.layers = [{"qkv": w((s.heads + 2 * s.kv_heads) * d, s.hidden), "o": w(s.hidden, s.heads * d),
                        "gate_up": w(2 * s.intermediate, s.hidden), "down": w(s.hidden, s.intermediate)}
                       for _ in range(s.layers)]
        self.lm_head = w(s.vocab, s.hidden)
        self.k_cache = torch.zeros(s.layers, 1, s.kv_heads, max_len, d, device=device, dtype=dtype)
        self.v_cache = torch.zeros_like(self.k_cache)
        inv_freq = 1.0 / (rope_theta ** (torch.arange(0, d, 2, device=device).float() / d))
        angles = torch.outer(torch.arange(max(max_len, PREFILL_TOKENS), device=device).float(), inv_freq)
        self.cos, self.sin = angles.cos().to(dtype), angles.sin().to(dtype)
        self.positions = torch.arange(max_len, device=device)
        self.fp8 = False
        self.weights_label = str(dtype).removeprefix("torch.")
        self.bf16_layers, self.bf16_lm_head = self.layers, self.lm_head
        self.compile(False)

    def to_fp8_weights(self) -> None:
        """Per-tensor E4M3 weights with a static input scale of 1 (what an FP8 checkpoint's input_scale fixes);
        lm_head stays BF16, as Model Optimizer's FP8 export leaves it. `to_bf16_weights` restores the BF16 ones."""
        self.layers = []
        for bf16 in self.bf16_layers:
            layer = {}
            for name, weight in bf16.items():
                scale = weight.abs().amax().float() / E4M3_MAX
                layer[name] = ((weight.float() / scale).to(torch.float8_e4m3fn), scale)
            self.layers.append(layer)
        self.fp8, self.weights_label = True, "FP8 E4M3 (per-tensor)"

    def to_gemv_weights(self, fmt: str, lm_head: bool = True) -> None:
        """Weight-only `fmt` weights (labs_lib.gemv) multiplied by its Triton GEMV; lm_head too when `lm_head` (the
        bytes per token count it either way)."""
        self.layers = [{name: pack_weight(w, fmt) for name, w in layer.items()} for layer in self.bf16_layers]
        self.lm_head = pack_weight(self.bf16_lm_head, fmt) if lm_head else self.bf16_lm_head
        self.fp8, self.weights_label = False, WEIGHT_LABELS[fmt]

    def to_bf16_weights(self) -> None:
        """Back to the original BF16 weights (freeing any converted copy)."""
        self.layers, self.lm_head = self.bf16_layers, self.bf16_lm_head
        self.fp8, self.weights_label = False, str(self.dtype).removeprefix("torch.")
        torch.cuda.empty_cache()

    def weight_bytes_per_token(self) -> int:
        """Bytes of weights one decode step reads: every matrix once, and one row of the embedding."""
        def nbytes(t) -> int:
            if isinstance(t, PackedWeight):
                return t.nbytes()
            t = t[0] if isinstance(t, tuple) else t
            return t.numel() * t.element_size()

        weights = [t for layer in self.layers for t in layer.values()] + [self.lm_head]
        return sum(nbytes(t) for t in weights) + self.shape.hidden * self.embedding.element_size()

    def kv_bytes_per_token(self, context: int) -> int:
        """Bytes of K and V cache read per step at `context` cached tokens."""
        s = self.shape
        return 2 * s.layers * s.kv_heads * s.head_dim * context * self.k_cache.element_size()

    def _linear(self, x: torch.Tensor, weight) -> torch.Tensor:
        if isinstance(weight, PackedWeight):
            return gemv_op(x, weight)
        if not isinstance(weight, tuple):
            return x @ weight.t()
        w8, scale = weight
        x8 = F.pad(x, (0, 0, 0, 16 - x.shape[0])).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)  # M padded to 16
        one = torch.ones((), device=x.device)
        return torch._scaled_mm(x8, w8.t(), scale_a=one, scale_b=scale, out_dtype=self.dtype)[: x.shape[0]]

    @staticmethod
    def _rms_norm(x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5).to(x.dtype)

    def _rope(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Rotary embedding in Hugging Face Llama's layout (rotate the two halves of each head)."""
        cos, sin = self.cos.index_select(0, pos.view(1)), self.sin.index_select(0, pos.view(1))  # no host sync
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    def _attention_inputs(self, x: torch.Tensor, qkv_weight, pos: torch.Tensor):
        s, d = self.shape, self.shape.head_dim
        qkv = self._linear(self._rms_norm(x), qkv_weight)
        q, k, v = qkv.split([s.heads * d, s.kv_heads * d, s.kv_heads * d], dim=-1)
        return (self._rope(q.view(1, s.heads, 1, d), pos), self._rope(k.view(1, s.kv_heads, 1, d), pos),
                v.view(1, s.kv_heads, 1, d))

    def _block_output(self, x: torch.Tensor, attn: torch.Tensor, o_weight, gate_up_weight, down_weight) -> torch.Tensor:
        x = x + self._linear(attn.reshape(1, -1), o_weight)
        gate, up = self._linear(self._rms_norm(x), gate_up_weight).chunk(2, dim=-1)
        return x + self._linear(F.silu(gate) * up, down_weight)

    def compile(self, enabled: bool = True, mode: str | None = None) -> None:
        """torch.compile the two pure parts of a layer (the small ops around the matmuls fuse into a few kernels);
        the KV-cache writes stay outside, so the compiled code never copies a whole cache it mutates. `mode` is
        torch.compile's (e.g. "max-autotune-no-cudagraphs")."""
        compiled = (lambda f: torch.compile(f, fullgraph=True, mode=mode)) if enabled else (lambda f: f)
        self.attention_inputs = compiled(self._attention_inputs)
        self.block_output = compiled(self._block_output)

    def step(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One decode step for token (1,) at position pos (0-d): writes K/V at pos, returns the greedy next token."""
        attention_inputs, block_output = self.attention_inputs, self.block_output
        x = self.embedding[token]
        mask = (self.positions <= pos).view(1, 1, 1, -1)
        for i, layer in enumerate(self.layers):
            q, k, v = attention_inputs(x, layer["qkv"], pos)
            self.k_cache[i].index_copy_(2, pos.view(1), k)
            self.v_cache[i].index_copy_(2, pos.view(1), v)
            attn = F.scaled_dot_product_attention(q, self.k_cache[i], self.v_cache[i], attn_mask=mask, enable_gqa=True)
            x = block_output(x, attn, layer["o"], layer["gate_up"], layer["down"])
        return self._linear(self._rms_norm(x), self.lm_head).argmax(-1)

    def _prefill_layer(self, x: torch.Tensor, layer: dict) -> torch.Tensor:
        """One layer over a whole prompt x (T, hidden), causal attention; the KV cache is not written (speed only)."""
        s, d, t = self.shape, self.shape.head_dim, x.shape[0]
        qkv = self._prefill_linear(self._rms_norm(x), layer["qkv"])
        q, k, v = qkv.split([s.heads * d, s.kv_heads * d, s.kv_heads * d], dim=-1)
        cos, sin = self.cos[:t, None, :], self.sin[:t, None, :]

        def rope(z, heads):
            z1, z2 = z.view(t, heads, d).chunk(2, dim=-1)
            return torch.cat((z1 * cos - z2 * sin, z2 * cos + z1 * sin), dim=-1).transpose(0, 1)[None]

        attn = F.scaled_dot_product_attention(rope(q, s.heads), rope(k, s.kv_heads),
                                              v.view(t, s.kv_heads, d).transpose(0, 1)[None], is_causal=True,
                                              enable_gqa=True)
        x = x + self._prefill_linear(attn[0].transpose(0, 1).reshape(t, -1), layer["o"])
        gate, up = self._prefill_linear(self._rms_norm(x), layer["gate_up"]).chunk(2, dim=-1)
        return x + self._prefill_linear(F.silu(gate) * up, layer["down"])

    def _prefill_linear(self, x: torch.Tensor, weight) -> torch.Tensor:
        """BF16 matmul, or FP8 with a dynamic per-tensor activation scale (torch._scaled_mm) for FP8 weights."""
        if not isinstance(weight, tuple):
            return x @ weight.t()
        w8, w_scale = weight
        x_scale = (x.abs().amax().float() / E4M3_MAX).clamp(min=1e-12)
        x8 = (x.float() / x_scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        return torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=self.dtype)

    def prefill_flops(self, tokens: int) -> float:
        """FLOPs of one prefill of `tokens` tokens: 2 per weight per token, plus causal attention (QK^T and PV)."""
        s = self.shape
        weights = sum(w.numel() for w in self.bf16_layers[0].values()) * s.layers
        attention = 2 * 2 * s.layers * s.heads * s.head_dim * tokens * (tokens + 1) / 2
        return 2 * weights * tokens + attention


def time_decode(model: DecodeModel, mode: str = "graph", tokens: int = 128, context: int = 256,
                profile: bool = False, compile_mode: str | None = None) -> dict:
    """ms per decoded token after `context` positions, for mode 'eager', 'graph' (CUDA graph of the eager step)
    or 'compiled' (`DecodeModel.compile` with `compile_mode`, then a CUDA graph of the step). `profile` adds
    "top kernels"."""
    device = model.device
    token = torch.zeros(1, dtype=torch.long, device=device)
    pos = torch.tensor(context, device=device)
    model.compile(mode == "compiled", compile_mode)

    def advance():
        token.copy_(model.step(token, pos))
        pos.add_(1)

    stream = torch.cuda.Stream() if device == "cuda" else None
    if mode in ("graph", "compiled"):
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm-up (and compilation) off the default stream, as graph capture requires
                advance()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            advance()
        run = graph.replay
    else:
        advance()
        run = advance
    pos.fill_(context)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(tokens):
        run()
    if device == "cuda":
        torch.cuda.synchronize()
    ms = 1000 * (time.perf_counter() - start) / tokens
    bytes_per_token = model.weight_bytes_per_token() + model.kv_bytes_per_token(context)
    label = mode if compile_mode is None else f"{mode} ({compile_mode})"
    row = {"mode": label, "weights": model.weights_label, "ms/token": round(ms, 3), "tokens/s": round(1000 / ms, 1),
           "GB read/token": round(bytes_per_token / 1e9, 3), "achieved GB/s": round(bytes_per_token / ms / 1e6, 0)}
    if profile:
        try:
            row["top kernels"] = kernel_breakdown(run)
        except Exception as error:  # noqa: BLE001 - the timing stands without its breakdown
            row["top kernels"] = [{"error": f"{type(error).__name__}: {error}"[:300]}]
    return row


def kernel_breakdown(run, steps: int = 10, top: int = 12) -> list[dict]:
    """The `top` CUDA kernels by total device time over `steps` calls of `run` (torch.profiler), with their share
    of all kernel time and their time per call."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            run()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA" and e.self_device_time_total > 0]
    total = sum(e.self_device_time_total for e in events) or 1
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    return [{"kernel": e.key[:90], "calls/step": round(e.count / steps, 1),
             "us/step": round(e.self_device_time_total / steps, 1),
             "share %": round(100 * e.self_device_time_total / total, 1)} for e in events[:top]]


def cuda_seconds(fn, repeats: int, warmup: int = 1) -> float:
    """Mean wall seconds of `fn()` on the GPU over `repeats` calls, after `warmup` calls (synchronized around)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def time_prefill(model: DecodeModel, tokens: int = PREFILL_TOKENS, repeats: int = 5) -> dict:
    """One compiled forward over a `tokens`-token prompt (all layers; lm_head on the last token): tok/s and
    achieved TFLOP/s. BF16 weights use BF16 matmuls; FP8 weights torch._scaled_mm with per-tensor scales."""
    if tokens > len(model.cos):
        raise LabsError(f"a {tokens}-token prefill needs RoPE tables that long: build the DecodeModel with "
                        f"max_len={tokens}.")
    torch.manual_seed(1)
    x0 = torch.randn(tokens, model.shape.hidden, device=model.device, dtype=model.dtype)
    layer_fn = torch.compile(model._prefill_layer, fullgraph=True)

    def forward():
        x = x0
        for layer in model.layers:
            x = layer_fn(x, layer)
        return model._rms_norm(x[-1:]) @ model.lm_head.t()

    seconds = cuda_seconds(forward, repeats, warmup=2)
    flops = model.prefill_flops(tokens)
    return {"weights": model.weights_label, "tokens": tokens, "ms": round(1000 * seconds, 2),
            "tokens/s": round(tokens / seconds, 0), "TFLOP/s": round(flops / seconds / 1e12, 1),
            "TFLOP per prefill": round(flops / 1e12, 2),
            "GB of weights": round(model.weight_bytes_per_token() / 1e9, 3)}


def measure_copy_bandwidth(n_bytes: int = 2 << 30, device: str = "cuda", repeats: int = 10) -> float:
    """GB/s of a large device-to-device copy (bytes read + bytes written): the bandwidth code can actually reach."""
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * n_bytes * repeats / (time.perf_counter() - start) / 1e9


def nvfp4_pack_speed(rows: int = 8192, cols: int = 8192, repeats: int = 20) -> dict:
    """NVFP4 quantize + pack of a (rows, cols) BF16 tensor: the Triton kernel (labs_lib.gemv), labs_lib's torch
    NVFP4().quantize and Model Optimizer's NVFP4QTensor.quantize when it imports; GB/s of BF16 input, bytes compared."""
    from .blockquant import NVFP4
    from .gemv import nvfp4_quantize_pack

    w = (torch.randn(rows, cols, device="cuda") * 0.02).to(torch.bfloat16)

    def timed(fn):
        ms = 1000 * cuda_seconds(fn, repeats)
        return {"ms": round(ms, 3), "GB/s of input": round(w.numel() * 2 / ms / 1e6, 1)}

    ours, reference = nvfp4_quantize_pack(w), NVFP4().quantize(w)
    out = {"shape": [rows, cols], "Triton nvfp4_quantize_pack": timed(lambda: nvfp4_quantize_pack(w)),
           "labs_lib NVFP4().quantize (torch)": timed(lambda: NVFP4().quantize(w)),
           "bytes identical to labs_lib": all(torch.equal(ours[k].view(torch.uint8), reference[k].view(torch.uint8))
                                              for k in ("weight", "weight_scale"))
           and torch.equal(ours["weight_scale_2"], reference["weight_scale_2"])}
    try:
        from modelopt.torch.quantization.qtensor import NVFP4QTensor
    except ImportError:
        out["Model Optimizer NVFP4QTensor.quantize"] = "not installed"
        return out
    out["Model Optimizer NVFP4QTensor.quantize"] = timed(lambda: NVFP4QTensor.quantize(w, 16))
    packed, scale, _ = NVFP4QTensor.quantize(w, 16)
    out["bytes identical to Model Optimizer"] = (torch.equal(ours["weight"], packed._quantized_data)
                                                 and torch.equal(ours["weight_scale"].view(torch.uint8),
                                                                 scale.view(torch.uint8)))
    return out


def _attempt(errors: dict, name: str, fn):
    """fn(), or None with the error recorded under `name`: one failed measurement must not stop the others."""
    import traceback

    try:
        return fn()
    except Exception as error:  # noqa: BLE001 - recorded and reported, the run goes on
        errors[name] = f"{type(error).__name__}: {error}"[:500]
        traceback.print_exc()
        return None


def _summary(record: dict) -> list[str]:
    """One line per number with its target (issue 20)."""
    lines = []
    rows = {(r["mode"], r["weights"]): r for r in record["rows"]}
    bf16 = rows.get(("compiled", "bfloat16"))
    best_bf16 = max((r for r in record["rows"] if r["weights"] in ("bfloat16", WEIGHT_LABELS["bf16"])),
                    key=lambda r: r["tokens/s"], default=None)
    if best_bf16:
        lines.append(f"BF16 decode {best_bf16['weights']} {best_bf16['mode']}: {best_bf16['ms/token']} ms/token, "
                     f"{best_bf16.get('% of ceiling')}% of ceiling (target >= 80%)")
    for fmt, target in (("fp8", "% of ceiling >= 70"), ("int4", "speed-up >= 2.5x BF16"),
                        ("nvfp4", "speed-up >= 2.5x BF16")):
        row = rows.get(("compiled", WEIGHT_LABELS[fmt]))
        if row:
            speedup = round(best_bf16["ms/token"] / row["ms/token"], 2) if best_bf16 else None
            lines.append(f"{row['weights']}: {row['ms/token']} ms/token, {row.get('% of ceiling')}% of ceiling, "
                         f"{speedup}x best BF16 (target {target})")
    if bf16:
        lines.append(f"(BF16 compiled with cuBLAS: {bf16['ms/token']} ms/token, {bf16.get('% of ceiling')}%)")
    for row in record.get("prefill", []):
        lines.append(f"prefill {row['weights']}: {row['tokens/s']} tok/s, {row['TFLOP/s']} TFLOP/s = "
                     f"{row.get('% of peak')}% of dense peak")
    pack = record.get("nvfp4 quantize+pack")
    if pack:
        theirs = pack.get("Model Optimizer NVFP4QTensor.quantize")
        theirs = f"{theirs['GB/s of input']} GB/s" if isinstance(theirs, dict) else theirs
        lines.append(f"NVFP4 pack: Triton {pack['Triton nvfp4_quantize_pack']['GB/s of input']} GB/s vs Model "
                     f"Optimizer {theirs} (target: at least as fast), bytes identical to labs_lib "
                     f"{pack['bytes identical to labs_lib']}, to Model Optimizer "
                     f"{pack.get('bytes identical to Model Optimizer', 'not checked')}")
    for name, error in record.get("errors", {}).items():
        lines.append(f"FAILED {name}: {error[:200]}")
    return lines


def _measure_models(parts: set[str], errors: dict, add, add_prefill, hardware) -> None:
    """The decode and prefill parts on one Llama-3.1-8B-shaped model, most wanted first; each row goes to `add`."""
    model = DecodeModel(LLAMA_3_1_8B)
    if "decode" in parts:
        add(_attempt(errors, "decode: BF16 compiled", lambda: time_decode(model, "compiled", profile=True)))
    if "gemv" in parts:
        for fmt in ("int4", "nvfp4", "fp8", "bf16"):
            def run(fmt=fmt):
                model.to_gemv_weights(fmt, lm_head=fmt != "fp8")  # FP8 checkpoints keep lm_head BF16
                return time_decode(model, "compiled", profile=True)

            add(_attempt(errors, f"gemv: {fmt}", run))
            model.to_bf16_weights()
    if "decode" in parts:
        for mode in ("eager", "graph"):
            tokens = 32 if mode == "eager" else 128
            add(_attempt(errors, f"decode: BF16 {mode}", lambda: time_decode(model, mode, tokens=tokens)))
    if "max-autotune" in parts:
        add(_attempt(errors, "max-autotune: BF16", lambda: time_decode(model, "compiled",
                                                                      compile_mode="max-autotune-no-cudagraphs")))
    if "prefill" in parts:
        add_prefill(_attempt(errors, "prefill: BF16", lambda: time_prefill(model)), hardware and hardware.bf16_tflops)
    if "decode" in parts or "prefill" in parts:
        model.to_fp8_weights()
    if "decode" in parts:
        for mode in ("graph", "compiled"):
            add(_attempt(errors, f"decode: FP8 per-tensor {mode}", lambda: time_decode(model, mode)))
    if "prefill" in parts:
        add_prefill(_attempt(errors, "prefill: FP8", lambda: time_prefill(model)), hardware and hardware.fp8_tflops)


def _part_of(label: str) -> str:
    """The part of main() that measures a decode row or profile entry, from its weights and mode text."""
    return "gemv" if "Triton GEMV" in label else "max-autotune" if "max-autotune" in label else "decode"


def _keep_other_parts(record: dict, path, parts: set[str], device_name: str) -> None:
    """Carry over from the previous record on the same GPU what this run does not measure again, so parts can run
    as separate commands; everything of the parts run now starts empty."""
    import json

    if not path.exists():
        return
    previous = json.loads(path.read_text())
    if previous.get("device", {}).get("name") != device_name:
        return
    record["rows"] = [r for r in previous.get("rows", []) if _part_of(f"{r['weights']} {r['mode']}") not in parts]
    record["profile"] = {k: v for k, v in previous.get("profile", {}).items() if _part_of(k) not in parts}
    if "prefill" not in parts:
        record["prefill"] = previous.get("prefill", [])
    if "pack" not in parts and "nvfp4 quantize+pack" in previous:
        record["nvfp4 quantize+pack"] = previous["nvfp4 quantize+pack"]
    record["errors"].update({k: v for k, v in previous.get("errors", {}).items() if k.split(":")[0] not in parts})
    earlier = previous.get("parts measured (UTC)", {"decode": previous.get("date_utc")})
    record["parts measured (UTC)"] = {**{p: d for p, d in earlier.items() if p not in parts},
                                      **record["parts measured (UTC)"]}


PARTS = ("decode", "gemv", "prefill", "pack", "training", "max-autotune")
DEFAULT_PARTS = ("decode", "gemv", "prefill")
ALL_PARTS = ("decode", "gemv", "prefill", "pack", "training")
ROW_ORDER = [("eager", "bfloat16"), ("graph", "bfloat16"), ("compiled", "bfloat16"), ("graph", "FP8 E4M3 (per-tensor)"),
             ("compiled", "FP8 E4M3 (per-tensor)")]  # the rows the labs have always read come first, in this order


def main(argv: list[str] | None = None) -> None:
    """On a CUDA GPU: decode speed (BF16, FP8, INT4, NVFP4) and prefill; writes results/08_engine_gpu.json after each
    measurement. --all also measures NVFP4 packing and the FP8 training step (results/06_fp8_gpu.json)."""
    import argparse
    import datetime as dt
    import json
    import os

    from .files import write_atomic
    from .hardware import device_info
    from .results import library_versions, results_dir
    from .roofline import HARDWARE

    parser = argparse.ArgumentParser(prog="python -m labs_lib.decode_speed", description=main.__doc__)
    parser.add_argument("--all", action="store_true", help="every part but max-autotune: " + ",".join(ALL_PARTS))
    parser.add_argument("--parts", default=",".join(DEFAULT_PARTS),
                        help=f"comma-separated, of {','.join(PARTS)} (default: %(default)s)")
    parser.add_argument("--out", help="results folder (default: $LABS_RESULTS_DIR, else results/)")
    args = parser.parse_args(argv)
    parts = set(ALL_PARTS if args.all else args.parts.split(","))
    if parts - set(PARTS):
        raise SystemExit(f"Unknown part(s) {', '.join(sorted(parts - set(PARTS)))}: choose from {', '.join(PARTS)}.")
    if args.out:
        os.environ["LABS_RESULTS_DIR"] = args.out
        os.makedirs(args.out, exist_ok=True)
    if not torch.cuda.is_available():
        raise SystemExit("No CUDA GPU: this measurement needs one (the lab reads the recorded file instead).")
    torch._dynamo.config.cache_size_limit = 64  # each weight format compiles the layer functions once more
    name = torch.cuda.get_device_name()
    key = "h200_sxm" if "H200" in name else "h100_sxm" if "H100" in name else None
    hardware = HARDWARE[key] if key else None
    peak = hardware.bandwidth_gb_s if hardware else None
    copy_gb_s = measure_copy_bandwidth()
    errors: dict[str, str] = {}
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
    record = {"date_utc": now, "device": device_info(), "versions": library_versions(),
              "shape": LLAMA_3_1_8B.__dict__, "context": 256, "published bandwidth GB/s": peak,
              "measured copy bandwidth GB/s": round(copy_gb_s, 0), "rows": [], "profile": {}, "prefill": [],
              "errors": errors, "parts measured (UTC)": {part: now for part in sorted(parts)}}
    path = results_dir() / GPU_DECODE_FILE
    _keep_other_parts(record, path, parts, name)

    def add(row: dict | None) -> None:
        if row is None:
            return
        if "top kernels" in row:
            record["profile"][f"{row['weights']} ({row['mode']})"] = row.pop("top kernels")
        if peak:
            row["floor ms (published bandwidth)"] = round(row["GB read/token"] / peak * 1000, 3)
            row["% of ceiling"] = round(100 * row["floor ms (published bandwidth)"] / row["ms/token"], 1)
        row["% of measured-copy ceiling"] = round(100 * row["GB read/token"] / copy_gb_s * 1000 / row["ms/token"], 1)
        record["rows"].append(row)
        record["rows"].sort(key=lambda r: ROW_ORDER.index((r["mode"], r["weights"]))
                            if (r["mode"], r["weights"]) in ROW_ORDER else len(ROW_ORDER))
        write_atomic(path, json.dumps(record, indent=1).encode())

    def add_prefill(row: dict | None, tflops: float | None) -> None:
        if row is None:
            return
        row["dense peak TFLOP/s"] = tflops
        row["% of peak"] = round(100 * row["TFLOP/s"] / tflops, 1) if tflops else None
        record["prefill"].append(row)
        write_atomic(path, json.dumps(record, indent=1).encode())

    _measure_models(parts, errors, add, add_prefill, hardware)
    torch.cuda.empty_cache()
    if "pack" in parts:
        record["nvfp4 quantize+pack"] = _attempt(errors, "pack: NVFP4 quantize+pack", nvfp4_pack_speed)
        write_atomic(path, json.dumps(record, indent=1).encode())
    if "training" in parts:
        from . import training

        training_record = _attempt(errors, "training: FP8 training step", training.main)
        if training_record:
            print("training step rows:")
            for row in training_record["rows"]:
                print(f"  {row['path']}: {row['ms/step']} ms, {row['speed-up vs compiled BF16']}x compiled BF16"
                      + (" (target >= 1.2x)" if "TensorwiseFP8Linear" in row["path"] else ""))
    write_atomic(path, json.dumps(record, indent=1).encode())
    print(f"wrote {path}")
    print("\n".join(_summary(record)))


if __name__ == "__main__":
    main()
