"""FP8 training with per-tensor scaling: E4M3 for weights and activations, E5M2 for gradients (HYBRID).

`FP8Linear` runs the three matmuls of a Linear layer (output, input gradient, weight gradient) on FP8
operands. On a GPU with FP8 tensor cores it calls `torch._scaled_mm`; anywhere else it emulates them:
the same casts (exact, from `formats`) and a float32 matmul. A scale multiplies a tensor before the
cast (Transformer Engine's convention), so the stored value is `cast(x * scale)` and `x ≈ stored / scale`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import LabsError
from .formats import FORMATS, cast
from .layerwise import SKIP

__all__ = ["FORWARD_FORMAT", "BACKWARD_FORMAT", "ScalingRecipe", "TensorScaler", "quantize", "scaled_matmul",
           "FP8Linear", "convert_to_fp8", "TensorwiseFP8Linear", "convert_to_tensorwise_fp8", "fp8_layers",
           "underflow_fraction", "gemm_accumulation_error"]

FORWARD_FORMAT = "fp8_e4m3"   # weights and activations: more precision (3 mantissa bits), max 448
BACKWARD_FORMAT = "fp8_e5m2"  # output gradients: more range (5 exponent bits), max 57344
TORCH_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


@dataclass(frozen=True)
class ScalingRecipe:
    """How each tensor's scale is chosen: from its own amax ("current") or from earlier steps' ("delayed").

    Delayed follows Transformer Engine's DelayedScaling: scale = max / (largest amax in the last
    `history_len` steps) / 2**margin, taken before this step's amax is recorded; the first step has no
    history and uses scale 1, as TE initialises it.
    """

    mode: str = "current"
    history_len: int = 1024
    margin: int = 0

    def __post_init__(self):
        if self.mode not in ("current", "delayed"):
            raise LabsError(f"Unknown FP8 scaling mode '{self.mode}': use 'current' or 'delayed'.")
        if self.history_len < 1:
            raise LabsError("history_len must be at least 1.")


class TensorScaler:
    """The scale of one tensor of one layer (its input, weight or output gradient), with its amax history."""

    def __init__(self, fmt: str, recipe: ScalingRecipe):
        self.fmt, self.recipe = fmt, recipe
        self.amax_history: list[torch.Tensor] = []  # newest last, at most recipe.history_len
        self.scales: list[torch.Tensor] = []        # the scale used at each step, for plots

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """The scale for `x` at this step; records x's amax for later steps."""
        amax = x.detach().abs().amax().float()
        if self.recipe.mode == "current":
            reference = amax
        elif self.amax_history:
            reference = torch.stack(self.amax_history).amax()
        else:
            reference = None
        top = torch.tensor(FORMATS[self.fmt].max, device=x.device)  # a true division, not scalar * reciprocal
        scale = torch.ones_like(top) if reference is None else top / reference / 2 ** self.recipe.margin
        scale = torch.where(torch.isfinite(scale) & (scale > 0), scale, torch.ones_like(scale))
        self.amax_history = (self.amax_history + [amax])[-self.recipe.history_len:]
        self.scales.append(scale)
        return scale


def _native(x: torch.Tensor) -> bool:
    return x.is_cuda and torch.cuda.get_device_capability(x.device) >= (8, 9)


def quantize(x: torch.Tensor, fmt: str, scale: torch.Tensor) -> torch.Tensor:
    """cast(x * scale) to `fmt`, saturating at its largest value (TE clips, it never overflows to inf).

    Returns torch's float8 tensor where FP8 matmuls are native, else the same values in float32.
    """
    top = FORMATS[fmt].max
    scaled = (x.float() * scale).clamp(-top, top)
    return scaled.to(TORCH_DTYPES[fmt]) if _native(x) else cast(scaled, fmt)


def scaled_matmul(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                  out_dtype: torch.dtype) -> torch.Tensor:
    """(a @ b.T) / (a_scale * b_scale) for FP8 operands from `quantize`, accumulated in float32."""
    if a.dtype in TORCH_DTYPES.values():
        return torch._scaled_mm(a, b.t(), scale_a=1 / a_scale, scale_b=1 / b_scale, out_dtype=out_dtype)
    return ((a @ b.t()) / (a_scale * b_scale)).to(out_dtype)


class _FP8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layer: "FP8Linear"):
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1])
            sx, sw = layer.input_scaler.scale(x2), layer.weight_scaler.scale(weight)
            xq, wq = quantize(x2, FORWARD_FORMAT, sx), quantize(weight, FORWARD_FORMAT, sw)
            out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.float32
            y = scaled_matmul(xq, sx, wq, sw, out_dtype)
            if bias is not None:
                y = y + bias.to(out_dtype)
        ctx.save_for_backward(xq, wq, sx, sw)
        ctx.layer, ctx.has_bias, ctx.x_dtype, ctx.w_dtype = layer, bias is not None, x.dtype, weight.dtype
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        xq, wq, sx, sw = ctx.saved_tensors
        with torch.autocast(grad_out.device.type, enabled=False):
            g = grad_out.reshape(-1, grad_out.shape[-1])
            sg = ctx.layer.grad_scaler.scale(g)
            gq = quantize(g, BACKWARD_FORMAT, sg)
            # input gradient g @ W and weight gradient gᵀ @ x, both with the E5M2 gradient
            grad_x = scaled_matmul(gq, sg, wq.t().contiguous(), sw, torch.float32)
            grad_w = scaled_matmul(gq.t().contiguous(), sg, xq.t().contiguous(), sx, torch.float32)
            grad_b = g.float().sum(0) if ctx.has_bias else None
        grad_x = grad_x.reshape(*grad_out.shape[:-1], -1).to(ctx.x_dtype)
        return grad_x, grad_w.to(ctx.w_dtype), grad_b, None


class FP8Linear(torch.nn.Linear):
    """nn.Linear whose forward and backward matmuls take FP8 operands with per-tensor scales."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 recipe: ScalingRecipe = ScalingRecipe(), device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.recipe = recipe
        self.input_scaler = TensorScaler(FORWARD_FORMAT, recipe)
        self.weight_scaler = TensorScaler(FORWARD_FORMAT, recipe)
        self.grad_scaler = TensorScaler(BACKWARD_FORMAT, recipe)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, recipe: ScalingRecipe) -> "FP8Linear":
        """An FP8Linear sharing `linear`'s parameters (no copy)."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, recipe, device="meta")
        layer.weight, layer.bias = linear.weight, linear.bias
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FP8LinearFunction.apply(x, self.weight, self.bias, self)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scaling={self.recipe.mode}"


def convert_to_fp8(model: torch.nn.Module, recipe: ScalingRecipe = ScalingRecipe(),
                   skip: tuple[str, ...] = SKIP) -> list[str]:
    """Replace every nn.Linear of `model` (in place) by an FP8Linear, except names containing `skip`.

    The output head stays in high precision, as in Transformer Engine recipes; embeddings are not
    Linear layers and are never converted. Returns the converted layer names.
    """
    converted = []
    for name, module in list(model.named_modules()):
        if type(module) is torch.nn.Linear and not any(s in name for s in skip):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, FP8Linear.from_linear(module, recipe))
            converted.append(name)
    return converted


def _cast_tensorwise(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x scaled by (format max / amax), saturated and cast to `dtype`, with the inverse scale _scaled_mm takes."""
    top = torch.finfo(dtype).max
    scale = top / x.detach().abs().amax().float().clamp(min=1e-12)
    return (x.float() * scale).clamp(-top, top).to(dtype), scale.reciprocal()


class _TensorwiseFP8Function(torch.autograd.Function):
    """The three matmuls of a Linear on FP8 operands, current per-tensor scaling, no Python state: torch.compile
    traces it whole and fuses each amax and cast into the neighbouring kernels."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        xq, x_inv = _cast_tensorwise(x2, torch.float8_e4m3fn)
        wq, w_inv = _cast_tensorwise(weight, torch.float8_e4m3fn)
        y = torch._scaled_mm(xq, wq.t(), scale_a=x_inv, scale_b=w_inv, out_dtype=x.dtype,
                             use_fast_accum=True)  # as torchao does for the forward GEMM
        ctx.save_for_backward(xq, x_inv, wq, w_inv)
        ctx.w_dtype = weight.dtype
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        xq, x_inv, wq, w_inv = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])
        gq, g_inv = _cast_tensorwise(g, torch.float8_e5m2)
        grad_x = torch._scaled_mm(gq, wq.t().contiguous().t(), scale_a=g_inv, scale_b=w_inv, out_dtype=g.dtype)
        grad_w = torch._scaled_mm(gq.t().contiguous(), xq.t().contiguous().t(), scale_a=g_inv, scale_b=x_inv,
                                  out_dtype=torch.float32)
        return grad_x.reshape(*grad_out.shape[:-1], -1), grad_w.to(ctx.w_dtype)


class TensorwiseFP8Linear(torch.nn.Linear):
    """nn.Linear (no bias) whose matmuls run on FP8 tensor cores with current per-tensor scales (E4M3 forward,
    E5M2 gradients); meant to run under torch.compile, on a GPU with FP8 tensor cores."""

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> "TensorwiseFP8Linear":
        """A TensorwiseFP8Linear sharing `linear`'s weight (no copy)."""
        if linear.bias is not None:
            raise LabsError("TensorwiseFP8Linear takes Linear layers without bias.")
        layer = cls(linear.in_features, linear.out_features, bias=False, device="meta")
        layer.weight = linear.weight
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _TensorwiseFP8Function.apply(x, self.weight)


def convert_to_tensorwise_fp8(model: torch.nn.Module, skip: tuple[str, ...] = SKIP) -> list[str]:
    """Replace every bias-free nn.Linear of `model` (in place) by a TensorwiseFP8Linear, except names containing
    `skip`; returns the converted layer names. Compile the model afterwards."""
    converted = []
    for name, module in list(model.named_modules()):
        if type(module) is torch.nn.Linear and module.bias is None and not any(s in name for s in skip):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, TensorwiseFP8Linear.from_linear(module))
            converted.append(name)
    return converted


def fp8_layers(model: torch.nn.Module) -> dict[str, FP8Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, FP8Linear)}


def underflow_fraction(x: torch.Tensor, fmt: str, scale: float | torch.Tensor = 1.0) -> float:
    """Share of the non-zero values of `x` that become zero when cast to `fmt` after multiplying by `scale`."""
    nonzero = x[x != 0].float()
    if nonzero.numel() == 0:
        return 0.0
    scale = torch.as_tensor(scale, dtype=torch.float32).cpu()  # a GPU tensor's amax-derived scale, with the values
    return (quantize(nonzero.cpu(), fmt, scale) == 0).float().mean().item()


def gemm_accumulation_error(k: int = 4096, device: str = "cuda") -> dict[str, float]:
    """Relative error of an FP8 GEMM against the exact (float64) product of the same FP8 operands.

    Any error here comes from the accumulator, not from the FP8 rounding of the inputs: it shows how
    many bits a device keeps while summing k products (`use_fast_accum` trades some for speed).
    """
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, k, generator=g).to(device).to(torch.float8_e4m3fn)
    b = torch.randn(128, k, generator=g).to(device).to(torch.float8_e4m3fn)
    exact = a.double() @ b.double().t()
    one = torch.ones((), device=device)
    results = {"float32 matmul": a.float() @ b.float().t()}
    for fast in (False, True):
        results[f"torch._scaled_mm (use_fast_accum={fast})"] = torch._scaled_mm(
            a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.float32, use_fast_accum=fast)
    return {name: ((y.double() - exact).norm() / exact.norm()).item() for name, y in results.items()}
