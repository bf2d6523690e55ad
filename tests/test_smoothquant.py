"""SmoothQuant: the scales' formula, the float model unchanged by smoothing, the scales Model Optimizer computes;
static activation amax by max, percentile and MSE."""

import copy

import pytest
import torch

from labs_lib.amax_calibration import MULTIPLIERS, InputSamples, collect_input_samples, input_amax
from labs_lib.blockquant import NVFP4, PerTensor
from labs_lib.errors import LabsError
from labs_lib.smoothquant import channel_amax, smooth_model, smoothed_input_amax, smoothing_scales


def _tiny_llama(kv_heads: int = 4):
    """A random Llama whose norms give a few input channels outliers, as trained models have."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[:3] = 20.0
            layer.post_attention_layernorm.weight[5] = 30.0
    return model


def _batches():
    return torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))


def test_smoothing_scales_follow_the_formula():
    act = torch.tensor([4.0, 1.0, 0.0])
    w = torch.tensor([[1.0, -4.0, 2.0], [0.5, 1.0, -1.0]])  # column maxima 1, 4, 2
    assert torch.allclose(smoothing_scales(act, [w], 0.5), torch.tensor([2.0, 0.5, 1.0]))  # unused channel: 1
    assert torch.allclose(smoothing_scales(act, [w, 8 * w], 1.0), torch.tensor([4.0, 1.0, 1.0]))
    assert torch.allclose(smoothing_scales(act, [w], 0.0), torch.tensor([1.0, 0.25, 1.0]))  # max over both weights


@pytest.mark.parametrize("kv_heads", [4, 2])  # v -> o is a scale group only without grouped-query attention
@torch.no_grad()
def test_smoothing_leaves_the_float_model_unchanged(kv_heads):
    model, batches = _tiny_llama(kv_heads), _batches()
    before = model(batches).logits
    act = channel_amax(model, batches)
    scales = smooth_model(model, act, alpha=0.5)
    after = model(batches).logits
    assert ((after - before).norm() / before.norm()).item() < 1e-5
    assert len(scales) == (7 if kv_heads == 4 else 6) * 2
    assert max(float((s.log().abs()).max()) for s in scales.values()) > 1.0  # the weights did change
    # the outlier channels were tamed: the q_proj input's max over channels fell by more than the median
    smoothed = channel_amax(model, batches)["model.layers.0.self_attn.q_proj"]
    ratio = act["model.layers.0.self_attn.q_proj"].max() / act["model.layers.0.self_attn.q_proj"].median()
    assert smoothed.max() / smoothed.median() < ratio / 2
    derived = smoothed_input_amax(act, scales)["model.layers.0.self_attn.q_proj"]
    assert torch.allclose(derived, smoothed.max(), rtol=1e-5)  # per-tensor amax without recalibration


@torch.no_grad()
def test_scales_equal_model_optimizers_smoothquant():
    pytest.importorskip("modelopt.torch.quantization")
    import copy

    from labs_lib.layerwise import linear_layers
    from labs_lib.modelopt_ptq import modelopt_config, modelopt_quantize

    model, batches = _tiny_llama(2), _batches()
    act = channel_amax(model, batches)
    weights = {n: m.weight.detach().clone() for n, m in linear_layers(model).items()}
    config = copy.deepcopy(modelopt_config("INT8_SMOOTHQUANT_CFG"))
    config["algorithm"] = {"method": "smoothquant", "alpha": 0.5}
    modelopt_quantize(model, config, batches)
    for name, module in linear_layers(model).items():
        ours = smoothing_scales(act[name], [weights[name]], 0.5)  # Model Optimizer smooths each Linear on its own
        assert torch.allclose(1 / module.input_quantizer.pre_quant_scale.float(), ours, rtol=1e-5), name


def test_amax_methods():
    model, batches = _tiny_llama(), _batches()
    samples = collect_input_samples(model, batches, stride=1)
    name = "model.layers.0.self_attn.q_proj"
    x = samples.sample(name)
    assert samples.rows[name][0] is samples.rows["model.layers.0.self_attn.k_proj"][0]  # q/k/v share one sample
    top = input_amax(samples, "max")[name]
    assert torch.equal(top, x.abs().max())
    assert input_amax(samples, "percentile", percentile=99.0)[name] < top
    int8 = PerTensor("int8")
    mse = input_amax(samples, "mse", int8)[name]
    errors = {m: (int8.fake_quantize(x, global_amax=top * m) - x).pow(2).sum().item() for m in MULTIPLIERS}
    assert mse == top * min(errors, key=errors.get)
    assert input_amax(samples, "mse", NVFP4())[name] <= top
    with pytest.raises(LabsError, match="scheme"):
        input_amax(samples, "mse")
    with pytest.raises(LabsError, match="Unknown amax method"):
        input_amax(samples, "entropy")


def _samples(x):
    samples = InputSamples()
    samples.amax["a"], samples.rows["a"] = x.abs().max(), [x]
    return samples


def test_percentile_clips_a_lone_outlier_and_mse_clips_a_heavy_tail():
    x = torch.randn(512, 64, generator=torch.Generator().manual_seed(2))
    x[7, 3] = 1000.0  # clipping it would cost (1000 - amax)^2, more than the rounding noise of every other value
    assert input_amax(_samples(x), "mse", PerTensor("int8"))["a"] == 1000.0
    assert input_amax(_samples(x), "percentile")["a"] < 10
    heavy = torch.randn(512, 64, generator=torch.Generator().manual_seed(2)) ** 3
    assert input_amax(_samples(heavy), "mse", PerTensor("int8"))["a"] < heavy.abs().max()


@torch.no_grad()
def test_lab07_smoothquant_variant_is_w8a8_of_the_smoothed_model():
    from labs_lib.smoothquant import W8A8
    from labs_lib.variants import BuildContext, SmoothQuantW8A8

    model = _tiny_llama()
    built = SmoothQuantW8A8("sq", alpha=1.0).build(BuildContext("tiny", model, None, _batches()))
    smoothed = copy.deepcopy(model)
    smooth_model(smoothed, channel_amax(model, _batches()), 1.0)
    q = built.model.model.layers[0].self_attn.q_proj
    expected = W8A8[0].fake_quantize(smoothed.model.layers[0].self_attn.q_proj.weight).to(q.weight.dtype)
    assert torch.equal(q.weight, expected)  # the smoothed weight on the INT8 grid (then in BF16, as Lab 07 runs)
    assert len(q._forward_pre_hooks) == 1  # static INT8 input rounding
    # alpha 1: s = the channel max, so the folded norm's outlier channels (20 and 30, section 4) come down to ~1
    norm = built.model.model.layers[0].input_layernorm.weight.float()
    assert norm[:3].abs().max() < 2 < model.model.layers[0].input_layernorm.weight[:3].abs().min()
    ids = _batches()[:1]
    base, out = model(ids).logits, built.model(ids).logits.float()
    assert ((out - base).norm() / base.norm()) < 0.05
