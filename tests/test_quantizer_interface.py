"""The quantizer interface and the code every method shares: the Quantizer protocol and its settings key,
scale groups per architecture on tiny random Llama, Mistral, Qwen2 and Qwen3 models, the hook context manager."""

import pytest
import torch

from labs_lib.awq import AWQ
from labs_lib.blockquant import IntGroup
from labs_lib.errors import LabsError
from labs_lib.gptq import GPTQ
from labs_lib.layerwise import decoder_layers, forward_pre_hooks, linear_layers
from labs_lib.quantizer import Quantizer, settings_key
from labs_lib.rtn import RTN
from labs_lib.scale_groups import MAPPINGS, fold_scale, scale_groups

G16 = IntGroup(4, 16, symmetric=False)


def tiny(family: str, kv_heads: int = 2):
    """A randomly initialised decoder of `family` with 2 layers of width 64 (a few hundred thousand parameters)."""
    import transformers

    config_class = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                    "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
                    "gemma": transformers.GemmaConfig}[family]
    config = config_class(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=kv_heads, head_dim=16, vocab_size=128, max_position_embeddings=64,
                          tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms start at exactly one: give them values a fold must carry
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand_like(p) + 0.5)
    return model


def test_rtn_gptq_and_awq_are_quantizers_with_distinct_settings_keys():
    methods = [RTN(G16), GPTQ(G16), GPTQ(G16, act_order=True), AWQ(G16), AWQ(G16, clip=False), AWQ(IntGroup(4, 32))]
    assert all(isinstance(m, Quantizer) for m in methods)
    assert len({settings_key(m) for m in methods}) == len(methods)
    awq = AWQ(G16)
    before = settings_key(awq)
    awq.chosen["model.layers.0.self_attn.q_proj"] = 0.5  # what a run records is not a setting
    assert settings_key(awq) == before == settings_key(AWQ(IntGroup(4, 16, symmetric=False)))
    assert not isinstance(IntGroup(4, 16), Quantizer)


@pytest.mark.parametrize("family", sorted(MAPPINGS))
@pytest.mark.parametrize("kv_heads", [2, 4])
def test_scale_groups_resolve_and_folding_leaves_outputs_unchanged(family, kv_heads):
    model = tiny(family, kv_heads)
    assert model.config.model_type == family
    x = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(x).logits
    g = torch.Generator().manual_seed(0)
    for layer in decoder_layers(model):
        groups = scale_groups(layer, family)
        consumers = [name for group in groups for name in group.linears]
        # v -> o is a group only without grouped-query attention (v as wide as o's input)
        expected = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj",
                    "mlp.down_proj"} | ({"self_attn.o_proj"} if kv_heads == 4 else set())
        assert sorted(consumers) == sorted(expected)
        modules = dict(layer.named_modules())
        for group in groups:
            width = modules[group.linears[0]].in_features
            fold_scale(group.prev, [modules[n] for n in group.linears], torch.rand(width, generator=g) * 4 + 0.25)
    with torch.no_grad():
        folded = model(x).logits
    assert not torch.equal(model.model.layers[0].input_layernorm.weight, tiny(family, kv_heads).model.layers[0]
                           .input_layernorm.weight)  # the scales really went somewhere
    torch.testing.assert_close(folded, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", sorted(MAPPINGS))
def test_awq_runs_on_every_supported_family(family):
    model = tiny(family)
    batches = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(2))
    awq = AWQ(G16, alphas=(0.0, 0.5), clip=False)
    codes = awq.quantize_model(model, batches, batch_size=2)
    assert sorted(codes) == sorted(linear_layers(model))
    assert len(awq.chosen) == 2 * len(scale_groups(decoder_layers(model)[0], family))


def test_an_unknown_architecture_is_named_with_the_supported_ones():
    model = tiny("gemma")
    with pytest.raises(LabsError, match="'gemma': supported are llama, mistral, qwen2, qwen3"):
        scale_groups(decoder_layers(model)[0], model.config.model_type)
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(LabsError, match="'gemma'"):
        AWQ(G16).quantize_model(model, torch.zeros(2, 8, dtype=torch.long))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # refused before any change


def test_a_layer_without_the_mapped_modules_is_named():
    with pytest.raises(LabsError, match="no module .*input_layernorm"):
        scale_groups(torch.nn.Sequential(torch.nn.Linear(4, 4)), "llama")


def test_forward_pre_hooks_are_removed_even_on_error():
    layer, seen = torch.nn.Linear(3, 3), []
    with pytest.raises(ZeroDivisionError):
        with forward_pre_hooks([(layer, lambda m, args: seen.append(args[0].shape))]):
            layer(torch.ones(2, 3))
            1 / 0
    layer(torch.ones(5, 3))
    assert seen == [torch.Size([2, 3])] and not layer._forward_pre_hooks
