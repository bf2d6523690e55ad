"""Static activation ranges (amax) for W8A8 and W4A4: the maximum, a percentile, or the MSE-optimal clip.

A deployed W8A8 or NVFP4 W4A4 checkpoint stores one input amax per Linear (`input_scale`). The maximum seen in
calibration never clips, but one outlier stretches the grid for every other value; a percentile clips the rarest
values; the MSE-optimal amax picks, among multiples of the maximum, the one whose quantize-dequantize round trip
is closest to the calibration inputs. Model Optimizer 0.47's counterparts: `calibrator: max` (MaxCalibrator, the
default); `calibrator: histogram` (HistogramCalibrator, a 2048-bin histogram over all tokens whose amax is a bin edge),
whose amax must be loaded by hand (`load_calib_amax("percentile", percentile=99.99)`, or "mse", "entropy"): with the
presets' `algorithm: max` its `compute_amax` gets no method and fails; its MSE method does not take NVFP4, whose
nearest option is `nvfp4_act_headroom` (a percentile of per-block amaxes); `algorithm: mse` searches weight amaxes
only. Here the percentile is the exact quantile of a strided sample, not a histogram bin edge.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .blockquant import Scheme
from .errors import LabsError
from .layerwise import SKIP, forward_pre_hooks, linear_layers

__all__ = ["METHODS", "MULTIPLIERS", "InputSamples", "collect_input_samples", "input_amax"]

METHODS = ("max", "percentile", "mse")
MULTIPLIERS = tuple(round(0.05 * i, 2) for i in range(4, 21))  # MSE candidates: 0.2 .. 1.0 x the calibration max


class InputSamples:
    """Per Linear: the exact running max |x| over all calibration tokens, and every `stride`-th token's input row
    in float32 on the model's device (Linears that read the same tensor, q/k/v or gate/up, share one sample)."""

    def __init__(self):
        self.amax: dict[str, torch.Tensor] = {}
        self.rows: dict[str, list[torch.Tensor]] = {}

    def sample(self, name: str) -> torch.Tensor:
        return torch.cat(self.rows[name])


@torch.inference_mode()
def collect_input_samples(model, batches: torch.Tensor, stride: int = 8, skip: tuple[str, ...] = SKIP) -> InputSamples:
    """Run the calibration batches once and keep each Linear's running max and a strided sample of its inputs."""
    samples, last = InputSamples(), {}

    def record(name):
        def hook(module, args):
            x = args[0]
            if last.get("input") is not x:  # q, k and v (gate and up) see the same tensor: sample it once
                flat = x.detach().reshape(-1, x.shape[-1])
                last.update(input=x, rows=flat[::stride].float(), amax=flat.abs().amax().float())
            samples.amax[name] = torch.maximum(samples.amax[name], last["amax"]) if name in samples.amax \
                else last["amax"]
            samples.rows.setdefault(name, []).append(last["rows"])

        return hook

    with forward_pre_hooks((m, record(n)) for n, m in linear_layers(model, skip).items()):
        for batch in tqdm(batches, desc="sampling inputs", leave=False):
            model(batch.unsqueeze(0).to(next(model.parameters()).device))
    return samples


def _mse_amax(x: torch.Tensor, amax: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    errors = [(scheme.fake_quantize(x, global_amax=amax * m) - x).pow(2).sum() for m in MULTIPLIERS]
    return amax * MULTIPLIERS[int(torch.stack(errors).argmin())]


def input_amax(samples: InputSamples, method: str, scheme: Scheme | None = None,
               percentile: float = 99.99) -> dict[str, torch.Tensor]:
    """Per Linear, the static input amax by `method`: "max" (exact, all tokens), "percentile" (of |x| over the
    sample) or "mse" (the multiple of the max in MULTIPLIERS with the least squared round-trip error of `scheme`,
    a scheme taking `global_amax`: PerTensor or NVFP4)."""
    if method not in METHODS:
        raise LabsError(f"Unknown amax method '{method}': use one of {', '.join(METHODS)}.")
    if method == "mse" and scheme is None:
        raise LabsError("The MSE amax needs the activation scheme it is computed for (e.g. NVFP4() or "
                        "PerTensor('int8')).")
    if method == "max":
        return dict(samples.amax)
    out, done = {}, {}
    for name in tqdm(samples.rows, desc=f"{method} amax", leave=False):
        key = id(samples.rows[name][0])  # shared samples are computed once
        if key not in done:
            x = samples.sample(name)
            if method == "percentile":
                done[key] = torch.quantile(x.abs().flatten(), percentile / 100)
            else:
                done[key] = _mse_amax(x, samples.amax[name], scheme)
        out[name] = done[key]
    return out
