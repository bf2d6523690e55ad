"""FP8 training: the emulated FP8 linear against casts from the formats module and torch._scaled_mm,
gradients against float32, both scaling recipes, and a training step that learns."""

import pytest
import torch

from labs_lib.blockquant import PerChannel
from labs_lib.errors import LabsError
from labs_lib.formats import cast
from labs_lib.fp8 import FP8Linear, ScalingRecipe, TensorScaler, convert_to_fp8, fp8_layers, underflow_fraction
from labs_lib.training import tiny_llama, train, training_batches


def layer_and_input(rows=16, inp=64, out=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(inp, out)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out, inp, generator=g) * 0.05)
        linear.bias.copy_(torch.randn(out, generator=g))
    x = torch.randn(rows, inp, generator=g) * torch.linspace(0.01, 30, inp)  # a few large channels
    return linear, x


def e4m3(t, scale):
    return cast((t * scale).clamp(-448, 448), "fp8_e4m3")


def test_forward_equals_the_reference_built_from_format_casts_and_torch_scaled_mm():
    linear, x = layer_and_input()
    y = FP8Linear.from_linear(linear, ScalingRecipe("current"))(x)
    sx, sw = 448 / x.abs().max(), 448 / linear.weight.detach().abs().max()
    xq, wq = e4m3(x, sx), e4m3(linear.weight.detach(), sw)
    reference = (xq @ wq.t()) / (sx * sw) + linear.bias.detach()
    assert torch.equal(y.detach(), reference)
    # PyTorch's own FP8 GEMM (its CPU kernel) on the same FP8 operands and scales
    library = torch._scaled_mm(xq.to(torch.float8_e4m3fn), wq.to(torch.float8_e4m3fn).t(), scale_a=1 / sx,
                               scale_b=1 / sw, out_dtype=torch.float32) + linear.bias.detach()
    torch.testing.assert_close(y.detach(), library, rtol=1e-5, atol=1e-5)


def test_backward_uses_the_e5m2_gradient_and_the_saved_e4m3_operands_exactly():
    linear, x = layer_and_input()
    x.requires_grad_(True)
    layer = FP8Linear.from_linear(linear, ScalingRecipe("current"))
    grad_out = torch.randn(16, 32, generator=torch.Generator().manual_seed(1)) * 1e-3
    layer(x).backward(grad_out)
    sx, sw, sg = 448 / x.detach().abs().max(), 448 / linear.weight.detach().abs().max(), 57344 / grad_out.abs().max()
    xq, wq = e4m3(x.detach(), sx), e4m3(linear.weight.detach(), sw)
    gq = cast(grad_out * sg, "fp8_e5m2")
    assert torch.equal(x.grad, (gq @ wq) / (sg * sw))
    assert torch.equal(linear.weight.grad, (gq.t() @ xq) / (sg * sx))
    assert torch.equal(linear.bias.grad, grad_out.sum(0))


def test_fp8_gradients_match_float32_within_e4m3_precision():
    """E4M3 keeps 3 mantissa bits (relative step 2^-3, so rounding error up to 2^-4 = 6.25% per value);
    over 256-long dot products the relative error of whole gradients stays below 10%."""
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(256, 128)
    x = torch.randn(64, 256, generator=g, requires_grad=True)
    target = torch.randn(64, 128, generator=g)
    grads = {}
    for name, module in [("fp32", linear), ("fp8", FP8Linear.from_linear(linear, ScalingRecipe()))]:
        x.grad, linear.weight.grad = None, None
        (module(x) - target).square().mean().backward()
        grads[name] = (x.grad.clone(), linear.weight.grad.clone())
    for fp8, fp32 in zip(grads["fp8"], grads["fp32"]):
        assert 0.01 < ((fp8 - fp32).norm() / fp32.norm()).item() < 0.10
        assert torch.nn.functional.cosine_similarity(fp8.flatten(), fp32.flatten(), dim=0) > 0.995


def test_delayed_scaling_uses_the_history_maximum_and_starts_at_one():
    scaler = TensorScaler("fp8_e4m3", ScalingRecipe("delayed", history_len=2))
    scales = [scaler.scale(torch.tensor([amax, -0.5])).item() for amax in (2.0, 8.0, 4.0, 1.0, 1.0)]
    # step 1 has no history; then max over the last two recorded amaxes: [2], [2, 8], [8, 4], [4, 1]
    assert scales == [1.0, 448 / 2, 448 / 8, 448 / 8, 448 / 4]


def test_current_scaling_uses_this_tensor_and_margin_halves_the_scale():
    scale = TensorScaler("fp8_e5m2", ScalingRecipe("current")).scale(torch.tensor([-3.0, 1.0]))
    assert scale == torch.tensor(57344.0) / 3
    assert TensorScaler("fp8_e4m3", ScalingRecipe("current", margin=1)).scale(torch.tensor([7.0])).item() == 448 / 7 / 2
    assert TensorScaler("fp8_e4m3", ScalingRecipe()).scale(torch.zeros(4)).item() == 1.0


def test_delayed_scaling_saturates_instead_of_overflowing():
    layer = FP8Linear.from_linear(torch.nn.Linear(16, 16, bias=False), ScalingRecipe("delayed"))
    layer(torch.ones(2, 16))            # history: amax 1
    y = layer(torch.full((2, 16), 1e3))  # 1000x larger than the scale expects: clipped at 448 / scale
    assert torch.isfinite(y).all()
    assert layer.input_scaler.scales[-1].item() == 448.0


def test_recipe_rejects_unknown_mode():
    with pytest.raises(LabsError, match="current"):
        ScalingRecipe("just-in-time")


def test_convert_keeps_lm_head_and_shares_parameters():
    model = tiny_llama(vocab_size=128, hidden=64, layers=2, heads=2)
    before = model.model.layers[0].self_attn.q_proj.weight
    names = convert_to_fp8(model)
    assert len(names) == 2 * 7 and "lm_head" not in names
    assert set(fp8_layers(model)) == set(names)
    assert model.model.layers[0].self_attn.q_proj.weight is before
    assert type(model.lm_head) is torch.nn.Linear


@pytest.mark.parametrize("mode", ["current", "delayed"])
def test_fp8_training_steps_reduce_the_loss(tokenizer, corpus, mode):
    batches, vocabulary = training_batches(tokenizer, corpus, steps=1, batch_size=4, seq_len=64)
    model = tiny_llama(len(vocabulary), hidden=64, layers=2, heads=2)
    convert_to_fp8(model, ScalingRecipe(mode))
    losses = train(model, batches.repeat(12, 1, 1), lr=3e-3, warmup=1)
    assert losses[-1] < losses[0] - 1.0
    assert all(torch.isfinite(torch.tensor(losses)))


def test_training_batches_are_deterministic_and_map_back_to_tokenizer_ids(tokenizer, corpus):
    a, vocab = training_batches(tokenizer, corpus, steps=3, batch_size=2, seq_len=32, seed=5)
    b, _ = training_batches(tokenizer, corpus, steps=3, batch_size=2, seq_len=32, seed=5)
    assert a.shape == (3, 2, 32) and torch.equal(a, b)
    assert int(a.max()) < len(vocab) < len(tokenizer)
    assert tokenizer.decode(vocab[a[0, 0]]) in corpus.calibration


def test_underflow_fraction_counts_values_lost_to_zero():
    tiny = torch.full((100,), 2.0**-20)
    assert underflow_fraction(tiny, "fp8_e5m2") == 1.0           # below E5M2's smallest subnormal, 2^-16
    assert underflow_fraction(tiny, "fp8_e5m2", scale=2.0**20) == 0.0


def test_per_channel_fp8_scales_each_row_by_its_own_maximum():
    w = torch.tensor([[1.0, -2.0, 0.3], [100.0, 0.01, 5.0]])
    scheme = PerChannel("fp8_e4m3")
    want = torch.stack([cast(row / (row.abs().max() / 448), "fp8_e4m3") * (row.abs().max() / 448) for row in w])
    assert torch.equal(scheme.fake_quantize(w), want)
    assert scheme.bits_per_weight((2, 3)) == 8 + 32 / 3
