"""load_nvfp4_into: an exported NVFP4 checkpoint's weights and input scales, emulated in a float model."""

import copy

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from labs_lib.blockquant import NVFP4
from labs_lib.fake_quant import calibrate_input_amax, fake_quantized_copy
from labs_lib.nvfp4_checkpoint import load_nvfp4_into, nvfp4_state_dict


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, architectures=["LlamaForCausalLM"])
    model = LlamaForCausalLM(config).eval()
    batches = torch.randint(0, 128, (4, 16))
    amax = calibrate_input_amax(model, batches)
    tensors = nvfp4_state_dict(model, amax)
    folder = tmp_path_factory.mktemp("nvfp4")
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors")
    return model, folder, tensors, amax, batches


def test_weights_are_the_checkpoints_dequantized_values(exported):
    model, folder, tensors, _, _ = exported
    emulated = copy.deepcopy(model)
    replaced = load_nvfp4_into(emulated, folder, activations=False)
    assert len(replaced) == 14 and "lm_head" not in replaced  # 7 Linears per layer; lm_head is not in the file
    for name in replaced:
        q = {k: tensors[f"{name}.{k}"] for k in ("weight", "weight_scale", "weight_scale_2")}
        weight = emulated.get_submodule(name).weight
        assert torch.equal(weight, NVFP4().dequantize(q).reshape(weight.shape))
        assert not torch.equal(weight, model.get_submodule(name).weight)  # really rounded
    assert torch.equal(emulated.lm_head.weight, model.lm_head.weight)


def test_activations_use_the_stored_input_scale(exported):
    model, folder, _, amax, batches = exported
    weights_only, w4a4 = copy.deepcopy(model), copy.deepcopy(model)
    load_nvfp4_into(weights_only, folder, activations=False)
    load_nvfp4_into(w4a4, folder)
    expected = fake_quantized_copy(weights_only, None, NVFP4(), amax)  # the same rounding, from the amax itself
    with torch.no_grad():
        got, want, w4a16 = (m(batches).logits for m in (w4a4, expected, weights_only))
    assert torch.allclose(got, want, atol=1e-4)
    assert not torch.allclose(got, w4a16, atol=1e-3)
