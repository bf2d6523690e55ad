"""Quantization-aware training: fake-quantized weights in the forward pass, a straight-through gradient.

`prepare_qat` makes every Linear compute with its NVFP4 round trip while the optimizer updates the float master
weights (the straight-through estimator passes the gradient through the rounding); `distill` trains such a student
to match the unquantized teacher's next-token distribution (QAD, KL on logits); `remove_qat` turns the Linears back,
after which post-training quantization of the trained weights gives the deployed model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .blockquant import Scheme
from .errors import LabsError
from .layerwise import SKIP, linear_layers

__all__ = ["ste_fake_quantize", "QATLinear", "prepare_qat", "remove_qat", "distillation_loss", "distill", "held_out_kl"]


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scheme, global_amax):
        limit = x.detach().abs().amax() if global_amax is None else torch.as_tensor(global_amax, device=x.device)
        ctx.save_for_backward(x.detach().abs() <= limit)
        if global_amax is None:
            return scheme.fake_quantize(x.detach()).to(x.dtype)
        return scheme.fake_quantize(x.detach(), global_amax=global_amax).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None


def ste_fake_quantize(x: torch.Tensor, scheme: Scheme, global_amax: torch.Tensor | None = None) -> torch.Tensor:
    """`scheme.fake_quantize(x)` forward; backward the identity inside the range (|x| <= amax), zero where it clips.

    With `global_amax=None` the range is x's own maximum, so nothing clips and the gradient is exactly the identity.
    """
    return _StraightThrough.apply(x, scheme, global_amax)


class QATLinear(torch.nn.Linear):
    """A Linear that computes with its weight's fake-quantized round trip (straight-through gradient)."""

    qat_scheme: Scheme

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, ste_fake_quantize(self.weight, self.qat_scheme), self.bias)


def prepare_qat(model: torch.nn.Module, scheme: Scheme, skip: tuple[str, ...] = SKIP) -> list[str]:
    """Turn every Linear (except `skip`) into a QATLinear with `scheme`, in place; return their names.

    Only those weights stay trainable: the embedding, norms and skipped layers are frozen."""
    layers = linear_layers(model, skip)
    if not layers:
        raise LabsError(f"{type(model).__name__} has no Linear layers outside {skip}: nothing to train.")
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in layers.values():
        layer.__class__ = QATLinear
        layer.qat_scheme = scheme
        layer.weight.requires_grad_(True)
    return list(layers)


def remove_qat(model: torch.nn.Module) -> None:
    """Turn QATLinears back into plain Linears holding the trained float weights (quantize them afterwards)."""
    for module in model.modules():
        if isinstance(module, QATLinear):
            module.__class__ = torch.nn.Linear
            del module.qat_scheme
    for p in model.parameters():
        p.requires_grad_(False)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0):
    """KL(teacher || student) of the next-token distributions, averaged over tokens (times T², as usual)."""
    s = F.log_softmax(student_logits.float().flatten(0, -2) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float().flatten(0, -2) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def distill(student, teacher, batches: torch.Tensor, steps: int, lr: float = 1e-5, batch_size: int = 1,
            temperature: float = 1.0, desc: str = "distilling") -> list[float]:
    """`steps` AdamW steps of `student` towards `teacher`'s logits on rows of `batches` (cycled, in order).
    Returns the loss of every step."""
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise LabsError("The student has no trainable parameters: call prepare_qat (or mtq.quantize) on it first.")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    device = next(student.parameters()).device
    student.train()
    losses = []
    for step in tqdm(range(steps), desc=desc):
        rows = torch.arange(step * batch_size, (step + 1) * batch_size) % len(batches)
        batch = batches[rows].to(device)
        with torch.no_grad():
            target = teacher(batch).logits
        loss = distillation_loss(student(batch).logits, target, temperature)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    student.eval()
    return losses


def held_out_kl(student, teacher, tokens: torch.Tensor, window: int = 1024, batch_size: int = 4) -> float:
    """Mean per-token KL(teacher || student) on `tokens` in windows of `window`: the distillation loss, on text
    neither model trained on."""
    device = next(student.parameters()).device
    windows = tokens[: len(tokens) // window * window].reshape(-1, window)
    if len(windows) == 0:
        raise LabsError(f"need at least {window} tokens for one window, got {len(tokens)}")
    total = 0.0
    with torch.no_grad():
        for batch in tqdm(windows.split(batch_size), desc="held-out KL", leave=False):
            batch = batch.to(device)
            total += distillation_loss(student(batch).logits, teacher(batch).logits).item() * batch.numel()
    return total / windows.numel()
