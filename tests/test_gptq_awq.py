"""GPTQ, AWQ and RTN on the embedded model's real layers, and GPTQ against GPTQModel."""

import copy

import pytest
import torch

from labs_lib.awq import AWQ
from labs_lib.blockquant import IntGroup
from labs_lib.data import calibration_batches, evaluation_tokens
from labs_lib.errors import LabsError
from labs_lib.evaluate import perplexity
from labs_lib.gptq import GPTQ, collect_hessians
from labs_lib.layerwise import (capture_first_layer_inputs, collect_linear_inputs, decoder_layers, layer_inputs,
                                linear_layers, run_layer)
from labs_lib.rtn import RTN
from labs_lib.scale_groups import fold_scale, scale_groups

G64 = IntGroup(4, 64, symmetric=False)


@pytest.fixture(scope="module")
def calib(tokenizer, corpus):
    return calibration_batches(tokenizer, corpus, 8, 128)


def truncated(model, n_layers: int):
    """A copy of the model with only its first n decoder layers (fast, still a real network)."""
    small = copy.deepcopy(model)
    small.model.layers = small.model.layers[:n_layers]
    small.config.num_hidden_layers = n_layers
    return small


def output_error(weight, approx, x):
    return ((x @ (weight - approx).T) ** 2).mean().item()


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_gptq_output_error_below_rtn_on_real_layers(model, calib, where):
    n_layers = model.config.num_hidden_layers
    layer_index = {"first": 0, "middle": n_layers // 2, "last": n_layers - 1}[where]
    inputs = layer_inputs(model, calib, layer_index)
    layer = decoder_layers(model)[layer_index]
    linears = linear_layers(layer)
    hessians = collect_hessians(layer, inputs, linears)
    features = collect_linear_inputs(layer, inputs, list(linears))
    for scheme in (G64, IntGroup(4, None, symmetric=False)):
        gptq = GPTQ(scheme)
        for name, linear in linears.items():
            w = linear.weight.detach()
            x = torch.cat(features[name]).reshape(-1, w.shape[1])
            ours = scheme.dequantize(gptq.quantize_weight(w, hessians[name])).reshape(w.shape)
            rtn = scheme.fake_quantize(w)
            assert output_error(w, ours, x) < 0.9 * output_error(w, rtn, x), (layer_index, name, scheme.name)


def test_gptq_codes_are_on_the_grid_and_act_order_helps_too(model, calib, facts):
    layer = decoder_layers(model)[0]
    inputs = capture_first_layer_inputs(model, calib)
    down = layer.mlp.down_proj
    H = collect_hessians(layer, inputs, {"down": down})["down"]
    x = torch.cat(collect_linear_inputs(layer, inputs, ["mlp.down_proj"])["mlp.down_proj"])
    x = x.reshape(-1, facts.intermediate)
    for act_order in (False, True):
        q = GPTQ(G64, act_order=act_order).quantize_weight(down.weight, H)
        assert q["codes"].dtype == torch.uint8 and int(q["codes"].max()) <= 15
        assert q["scale"].dtype == torch.float16 and q["scale"].shape == (facts.hidden, facts.intermediate // 64)
        approx = G64.dequantize(q).reshape(down.weight.shape)
        assert output_error(down.weight, approx, x) < output_error(down.weight, G64.fake_quantize(down.weight), x)


def test_gptq_refuses_a_group_that_does_not_divide_the_width():
    with pytest.raises(LabsError, match="576 is not a multiple of group size 128"):
        GPTQ(IntGroup(4, 128)).quantize_weight(torch.randn(8, 576), torch.eye(576))


def test_layer_by_layer_driver_reproduces_the_float_model(model, calib):
    small = truncated(model, 3)
    inputs = capture_first_layer_inputs(small, calib[:2])
    for layer in decoder_layers(small):
        inputs.hidden = run_layer(layer, inputs)
    expected = small(calib[:2], output_hidden_states=True).hidden_states[-1]
    got = small.model.norm(torch.cat(inputs.hidden))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_folding_awq_scales_leaves_the_float_model_unchanged(model, calib):
    small = truncated(model, 2)
    reference = small(calib[:2]).logits
    g = torch.Generator().manual_seed(0)
    modules = dict(small.model.layers[0].named_modules())
    for group in scale_groups(small.model.layers[0], small.config.model_type):
        s = torch.rand(group.prev.weight.shape[0], generator=g) * 4 + 0.25
        fold_scale(group.prev, [modules[n] for n in group.linears], s)
    folded = small(calib[:2]).logits
    assert ((folded - reference).norm() / reference.norm()).item() < 1e-5


def test_fold_scale_matches_gptqmodel_apply_scale(model, facts):
    pytest.importorskip("gptqmodel")
    from gptqmodel.quantization.awq.quantize.scale import apply_scale

    ours, theirs = copy.deepcopy(model.model.layers[0]), copy.deepcopy(model.model.layers[0])
    s = torch.linspace(0.5, 2.0, facts.hidden)
    fold_scale(ours.post_attention_layernorm, [ours.mlp.gate_proj, ours.mlp.up_proj], s)
    apply_scale(theirs, [("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"], s, None)])
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def test_awq_with_alpha_zero_and_no_clipping_is_exactly_rtn(model, calib):
    awq_model, rtn_model = truncated(model, 3), truncated(model, 3)
    AWQ(G64, alphas=(0.0,), clip=False).quantize_model(awq_model, calib)
    RTN(G64).quantize_model(rtn_model)
    for (name, a), b in zip(awq_model.state_dict().items(), rtn_model.state_dict().values()):
        assert torch.equal(a, b), name


def test_awq_and_gptq_beat_rtn_on_the_network_output(model, calib):
    reference = truncated(model, 4)
    target = reference(calib, output_hidden_states=True).hidden_states[-1]
    errors = {}
    for method in (RTN(G64), AWQ(G64), GPTQ(G64)):
        quantized = truncated(model, 4)
        method.quantize_model(quantized, calib)
        output = quantized(calib, output_hidden_states=True).hidden_states[-1]
        errors[type(method).__name__] = (output - target).pow(2).mean().item()
    assert errors["AWQ"] < errors["RTN"] and errors["GPTQ"] < errors["RTN"], errors


def test_gptq_perplexity_agrees_with_gptqmodel_at_group_64(model, tokenizer, corpus):
    """Same model, calibration data and settings: labs_lib's GPTQ within 2% of GPTQModel's."""
    pytest.importorskip("gptqmodel")
    from labs_lib.gptqmodel_quant import gptqmodel_quantize, load_quantized_checkpoint
    from labs_lib.lab import PROFILES

    quick = PROFILES["quick"]
    batches = calibration_batches(tokenizer, corpus, quick["calib_samples"], quick["seq_len"])
    tokens = evaluation_tokens(tokenizer, corpus, quick["eval_tokens"])
    ours = copy.deepcopy(model)
    GPTQ(G64).quantize_model(ours, batches)
    run = gptqmodel_quantize(model.name_or_label, "gptq", G64, batches)
    library = load_quantized_checkpoint(run.folder)
    ppl_ours, ppl_library = perplexity(ours, tokens), perplexity(library, tokens)
    rtn = copy.deepcopy(model)
    RTN(G64).quantize_model(rtn)
    ppl_rtn = perplexity(rtn, tokens)
    assert abs(ppl_ours / ppl_library - 1) < 0.02, (ppl_ours, ppl_library)
    assert ppl_ours < ppl_rtn and ppl_library < ppl_rtn
