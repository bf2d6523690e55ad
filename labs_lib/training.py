"""A small Llama-architecture model trained from scratch, so precision recipes can be compared in minutes.

Same seed, same initial weights, same batches: the only difference between two runs is the recipe.
"""

from __future__ import annotations

import copy
import importlib.util
import time
from contextlib import nullcontext

import torch
from tqdm.auto import tqdm

from .data import Corpus, tokenize
from .errors import LabsError
from .fp8 import convert_to_fp8, convert_to_tensorwise_fp8, gemm_accumulation_error
from .hardware import device_info

__all__ = ["tiny_llama", "training_batches", "train", "lm_loss", "step_seconds", "mlp_stack", "fp8_comparison_bytes",
           "fp8_step_comparison", "GPU_STEP_FILE", "recorded_gpu_steps"]

GPU_STEP_FILE = "06_fp8_gpu.json"  # written by `python -m labs_lib.training` on an FP8 GPU


def tiny_llama(vocab_size: int, hidden: int = 256, layers: int = 4, heads: int = 4, seed: int = 0):
    """A randomly initialised LlamaForCausalLM (tied embeddings, SwiGLU MLP of width 8/3 x hidden)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=(8 * hidden // 3 + 63) // 64 * 64,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=2048, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


def training_batches(tokenizer, corpus: Corpus, steps: int, batch_size: int, seq_len: int,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(steps, batch_size, seq_len) windows of the calibration text, drawn with a seeded generator,
    and the vocabulary they are written in.

    The text uses a few thousand of the tokenizer's ids; they are renumbered 0..V-1 (the returned
    tensor maps new id -> tokenizer id), so the output layer is small and a CPU step is fast.
    """
    ids = tokenize(tokenizer, corpus.calibration)
    if len(ids) < seq_len + 1:
        raise LabsError(f"The training text has {len(ids)} tokens, fewer than seq_len={seq_len}.")
    vocabulary, compact = ids.unique(return_inverse=True)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len, (steps * batch_size,), generator=g)
    batches = torch.stack([compact[s : s + seq_len] for s in starts.tolist()])
    return batches.reshape(steps, batch_size, seq_len), vocabulary


def _autocast(device: str, dtype: torch.dtype | None):
    return torch.autocast(device, dtype=dtype) if dtype is not None else nullcontext()


def train(model, batches: torch.Tensor, lr: float = 3e-3, autocast_dtype: torch.dtype | None = torch.bfloat16,
          warmup: int = 10, desc: str = "training", on_step=None) -> list[float]:
    """AdamW with linear warm-up and cosine decay; returns the loss of every step.

    Master weights and optimizer state stay in float32; `autocast_dtype` is the compute precision of
    the ops autocast covers (FP8Linear layers ignore it and use their own FP8 operands).
    """
    device = next(model.parameters()).device.type
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    steps = len(batches)
    def lr_factor(s: int) -> float:  # linear warm-up, then cosine decay to zero
        return min(1.0, (s + 1) / warmup) * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * s / steps)).item())

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    losses = []
    model.train()
    for step in (bar := tqdm(range(steps), desc=desc, leave=False)):
        batch = batches[step].to(device)
        with _autocast(device, autocast_dtype):
            loss = model(batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if on_step is not None:
            on_step(step, model)
    model.eval()
    return losses


def lm_loss(model, batch: torch.Tensor) -> torch.Tensor:
    return model(batch, labels=batch).loss


def step_seconds(model, batch: torch.Tensor, loss_fn=lm_loss, steps: int = 20, warmup: int = 5,
                 autocast_dtype: torch.dtype | None = torch.bfloat16) -> float:
    """Median wall time of one forward + backward + optimizer step (SGD with lr 0: the weights stay)."""
    device = next(model.parameters()).device
    batch = batch.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with _autocast(device.type, autocast_dtype):
            loss = loss_fn(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def mlp_stack(hidden: int, blocks: int, device: str = "cuda",
              dtype: torch.dtype = torch.bfloat16) -> torch.nn.Sequential:
    """`blocks` transformer-style MLPs (hidden -> 4 hidden -> hidden, GELU): the matmuls FP8 speeds up."""
    layers: list[torch.nn.Module] = []
    for _ in range(blocks):
        layers += [torch.nn.Linear(hidden, 4 * hidden, bias=False), torch.nn.GELU(),
                   torch.nn.Linear(4 * hidden, hidden, bias=False)]
    return torch.nn.Sequential(*layers).to(device, dtype)


def _square_loss(model, x: torch.Tensor) -> torch.Tensor:
    return model(x).float().square().mean()


def fp8_comparison_bytes(hidden: int = 4096, blocks: int = 4, stacks: int | None = None) -> int:
    """GPU bytes fp8_step_comparison holds at its end: `stacks` MLP stacks (default: BF16 eager and compiled, two FP8
    paths, and torchao's where it is installed), each with its BF16 weights and gradients."""
    stacks = stacks or (5 if importlib.util.find_spec("torchao") else 4)
    return stacks * 2 * (blocks * 2 * hidden * 4 * hidden) * 2


def fp8_step_comparison(hidden: int = 4096, blocks: int = 4, tokens: int = 8192, steps: int = 20) -> list[dict]:
    """Training-step time of an MLP stack on this GPU in BF16 and in each FP8 path that is installed.

    Paths: labs_lib's FP8Linear (eager, torch._scaled_mm) and TensorwiseFP8Linear (compiled), torchao float8
    (tensorwise, compiled) and Transformer Engine (te.Linear, DelayedScaling HYBRID).
    Speed-ups are against compiled BF16.
    """
    info = device_info()
    if not info["native_fp8"]:
        raise LabsError("FP8 step times need a GPU with FP8 tensor cores (compute capability 8.9+); "
                        f"this is {info['name']}.")
    torch.manual_seed(0)
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    base = mlp_stack(hidden, blocks)
    runs = {"BF16 (eager)": (base, _square_loss),
            "BF16 (torch.compile)": (torch.compile(copy.deepcopy(base)), _square_loss)}
    ours = copy.deepcopy(base)
    convert_to_fp8(ours, skip=())
    runs["FP8 labs_lib FP8Linear (eager, torch._scaled_mm)"] = (ours, _square_loss)
    fast = copy.deepcopy(base)
    convert_to_tensorwise_fp8(fast, skip=())
    runs["FP8 labs_lib TensorwiseFP8Linear (torch.compile, torch._scaled_mm)"] = (torch.compile(fast), _square_loss)
    if importlib.util.find_spec("torchao"):
        from torchao.float8 import convert_to_float8_training

        ao = copy.deepcopy(base)
        convert_to_float8_training(ao)
        runs["FP8 torchao float8 tensorwise (torch.compile)"] = (torch.compile(ao), _square_loss)
    if importlib.util.find_spec("transformer_engine"):
        runs["FP8 Transformer Engine te.Linear (DelayedScaling HYBRID)"] = _transformer_engine_stack(hidden, blocks)
    rows = []
    for path, (model, loss_fn) in runs.items():
        ms = 1e3 * step_seconds(model, x, loss_fn, steps=steps, autocast_dtype=None)
        rows.append({"path": path, "ms/step": round(ms, 2)})
    reference = rows[1]["ms/step"]
    for row in rows:
        row["speed-up vs compiled BF16"] = round(reference / row["ms/step"], 2)
    return rows


def _transformer_engine_stack(hidden: int, blocks: int):
    import transformer_engine.pytorch as te
    from transformer_engine.common.recipe import DelayedScaling, Format

    layers: list[torch.nn.Module] = []
    for _ in range(blocks):
        layers += [te.Linear(hidden, 4 * hidden, bias=False, params_dtype=torch.bfloat16), torch.nn.GELU(),
                   te.Linear(4 * hidden, hidden, bias=False, params_dtype=torch.bfloat16)]
    model = torch.nn.Sequential(*layers).cuda()
    recipe = DelayedScaling(fp8_format=Format.HYBRID, amax_history_len=16, amax_compute_algo="max")

    def loss_fn(m, x):
        with te.fp8_autocast(enabled=True, fp8_recipe=recipe):
            y = m(x)
        return y.float().square().mean()

    return model, loss_fn


def recorded_gpu_steps() -> dict | None:
    """The last `python -m labs_lib.training` record: from the results folder, else the one committed in results/."""
    from .results import recorded

    return recorded(GPU_STEP_FILE)


def main() -> dict:
    """Measure `fp8_step_comparison` on this GPU and write results/06_fp8_gpu.json for lab 06 and the report."""
    import datetime as dt
    import json

    from .files import write_atomic
    from .results import library_versions, results_dir

    config = {"hidden": 4096, "blocks": 4, "tokens": 8192, "steps": 20}
    rows = fp8_step_comparison(**config)
    record = {"date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"), "device": device_info(),
              "versions": library_versions(), "config": config, "rows": rows,
              "fp8 GEMM relative error vs float64, k=4096": gemm_accumulation_error(4096)}
    path = results_dir() / GPU_STEP_FILE
    write_atomic(path, json.dumps(record, indent=1).encode())
    print(json.dumps(record, indent=1))
    return record


if __name__ == "__main__":
    main()
