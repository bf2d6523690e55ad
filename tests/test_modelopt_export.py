"""labs_lib's NVFP4 checkpoint tensors against Model Optimizer's real export of the embedded model."""

import json

import pytest
import torch

from labs_lib.fake_quant import calibrate_input_amax
from labs_lib.models import EMBEDDED, load_model
from labs_lib.nvfp4_checkpoint import compare_with_checkpoint, nvfp4_state_dict, shared_weight_amax

pytest.importorskip("modelopt.torch.quantization")


@pytest.fixture(scope="module")
def export(nvfp4_export):
    return nvfp4_export


def test_every_tensor_is_bit_identical(export):
    folder, calib = export
    reference = load_model(EMBEDDED, dtype=torch.bfloat16)
    ours = nvfp4_state_dict(reference, calibrate_input_amax(reference, calib))
    assert compare_with_checkpoint(ours, folder / "model.safetensors") == {"identical": 840, "different": 0}


def test_export_config_and_files(export):
    folder, _ = export
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "generation_config.json",
                                                        "hf_quant_config.json", "model.safetensors"]
    quant = json.loads((folder / "hf_quant_config.json").read_text())["quantization"]
    assert quant["quant_algo"] == "NVFP4" and quant["group_size"] == 16
    assert set(quant["exclude_modules"]) == {"lm_head", "model.embed_tokens"}
    assert not list(folder.parent.glob(".nvfp4-*"))  # the temporary folder was renamed, not left behind


def test_fused_layers_share_the_tensor_scale(model):
    amax = shared_weight_amax(model)
    layer = "model.layers.3.self_attn."
    assert amax[layer + "q_proj"] == amax[layer + "k_proj"] == amax[layer + "v_proj"]
    assert amax[layer + "o_proj"] == model.model.layers[3].self_attn.o_proj.weight.abs().max()


def test_unknown_config_lists_the_choices(model):
    from labs_lib.errors import LabsError
    from labs_lib.modelopt_ptq import modelopt_quantize

    with pytest.raises(LabsError, match="NVFP4_DEFAULT_CFG"):
        modelopt_quantize(model, "NVFP5_CFG", torch.zeros(1, 8, dtype=torch.long))
