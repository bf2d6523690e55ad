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
from .roofline import LLAMA_3_1_8B
from .sizing import ModelShape

__all__ = ["DecodeModel", "time_decode", "measure_copy_bandwidth", "GPU_DECODE_FILE"]

GPU_DECODE_FILE = "08_engine_gpu.json"


class DecodeModel:
    """A Llama decoder as plain tensors: fused QKV and gate/up projections, RoPE, GQA over a static KV cache."""

    def __init__(self, shape: ModelShape, max_len: int = 512, device: str = "cuda", dtype=torch.bfloat16, seed: int = 0,
                 rope_theta: float = 500000.0):
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
        angles = torch.outer(torch.arange(max_len, device=device).float(), inv_freq)
        self.cos, self.sin = angles.cos().to(dtype), angles.sin().to(dtype)
        self.positions = torch.arange(max_len, device=device)
        self.fp8 = False
        self.compile(False)

    def to_fp8_weights(self) -> None:
        """Per-tensor E4M3 weights with a static input scale of 1 (what an FP8 checkpoint's input_scale fixes);
        lm_head stays BF16, as Model Optimizer's FP8 export leaves it."""
        for layer in self.layers:
            for name, weight in list(layer.items()):
                scale = weight.abs().amax().float() / E4M3_MAX
                layer[name] = ((weight.float() / scale).to(torch.float8_e4m3fn), scale)
        torch.cuda.empty_cache()
        self.fp8 = True

    def weight_bytes_per_token(self) -> int:
        """Bytes of weights one decode step reads: every matrix once, and one row of the embedding."""
        tensors = [t[0] if isinstance(t, tuple) else t for layer in self.layers for t in layer.values()] + [self.lm_head]
        return sum(t.numel() * t.element_size() for t in tensors) + self.shape.hidden * self.embedding.element_size()

    def kv_bytes_per_token(self, context: int) -> int:
        """Bytes of K and V cache read per step at `context` cached tokens."""
        s = self.shape
        return 2 * s.layers * s.kv_heads * s.head_dim * context * self.k_cache.element_size()

    def _linear(self, x: torch.Tensor, weight) -> torch.Tensor:
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

    def compile(self, enabled: bool = True) -> None:
        """torch.compile the two pure parts of a layer (the small ops around the matmuls fuse into a few kernels);
        the KV-cache writes stay outside, so the compiled code never copies a whole cache it mutates."""
        self.attention_inputs = torch.compile(self._attention_inputs, fullgraph=True) if enabled else self._attention_inputs
        self.block_output = torch.compile(self._block_output, fullgraph=True) if enabled else self._block_output

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
        return (self._rms_norm(x) @ self.lm_head.t()).argmax(-1)


def time_decode(model: DecodeModel, mode: str = "graph", tokens: int = 128, context: int = 256) -> dict:
    """ms per decoded token after `context` positions, for mode 'eager', 'graph' (CUDA graph of the eager step)
    or 'compiled' (`DecodeModel.compile`, then a CUDA graph of the step)."""
    device = model.device
    token = torch.zeros(1, dtype=torch.long, device=device)
    pos = torch.tensor(context, device=device)
    model.compile(mode == "compiled")

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
    return {"mode": mode, "weights": "FP8 E4M3 (per-tensor)" if model.fp8 else str(model.dtype).removeprefix("torch."), "ms/token": round(ms, 3),
            "tokens/s": round(1000 / ms, 1), "GB read/token": round(bytes_per_token / 1e9, 3),
            "achieved GB/s": round(bytes_per_token / ms / 1e6, 0)}


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


def main() -> None:
    """On a CUDA GPU: BF16 eager / graph / compiled, then FP8 weights graph / compiled; writes results/08_engine_gpu.json."""
    import datetime as dt
    import json

    from .files import write_atomic
    from .hardware import device_info
    from .results import library_versions, results_dir
    from .roofline import HARDWARE

    if not torch.cuda.is_available():
        raise SystemExit("No CUDA GPU: this measurement needs one (the lab reads the recorded file instead).")
    copy_gb_s = measure_copy_bandwidth()
    model = DecodeModel(LLAMA_3_1_8B)
    rows = [time_decode(model, mode, tokens=32 if mode == "eager" else 128) for mode in ("eager", "graph", "compiled")]
    model.to_fp8_weights()
    rows += [time_decode(model, mode) for mode in ("graph", "compiled")]
    name = torch.cuda.get_device_name()
    key = "h200_sxm" if "H200" in name else "h100_sxm" if "H100" in name else None
    peak = HARDWARE[key].bandwidth_gb_s if key else None
    for row in rows:
        if peak:
            row["floor ms (published bandwidth)"] = round(row["GB read/token"] / peak * 1000, 3)
            row["% of ceiling"] = round(100 * row["floor ms (published bandwidth)"] / row["ms/token"], 1)
        row["% of measured-copy ceiling"] = round(100 * row["GB read/token"] / copy_gb_s * 1000 / row["ms/token"], 1)
    record = {"date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"), "device": device_info(),
              "versions": library_versions(), "shape": LLAMA_3_1_8B.__dict__, "context": 256,
              "published bandwidth GB/s": peak, "measured copy bandwidth GB/s": round(copy_gb_s, 0), "rows": rows}
    path = results_dir() / GPU_DECODE_FILE
    write_atomic(path, json.dumps(record, indent=1).encode())
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
