"""check_checkpoint on Model Optimizer's real NVFP4 and FP8 exports of the embedded model, and on broken copies."""

import json

import pytest

from labs_lib.checkpoint_check import DEFECTS, check_checkpoint, checkpoint_inventory, make_broken_copy


def test_real_exports_pass(nvfp4_export, fp8_export, facts):
    linears = facts.linears
    nvfp4, fp8 = check_checkpoint(nvfp4_export[0]), check_checkpoint(fp8_export[0])
    assert nvfp4.ok and fp8.ok, nvfp4.problems + fp8.problems
    assert (nvfp4.quant_algo, nvfp4.group_size, nvfp4.quantized_layers, nvfp4.tensors_checked) == (
        "NVFP4", 16, linears, 4 * linears)
    assert (fp8.quant_algo, fp8.quantized_layers, fp8.tensors_checked) == ("FP8", linears, 3 * linears)
    assert nvfp4.warnings == ["no tokenizer in the folder: pass --tokenizer to trtllm-serve or save the tokenizer "
                              "here."]


EXPECTED_FINDING = {
    "weight_scale missing": "model.layers.0.mlp.down_proj.weight_scale is missing.",
    "block scales left in float32": "model.layers.0.mlp.down_proj.weight_scale is F32, expected F8_E4M3.",
    "weight_scale_2 is zero": "model.layers.0.mlp.down_proj.weight_scale_2 holds 1 scale(s) <= 0.",
    "group_size 32 in hf_quant_config.json": "group_size is 32; NVFP4 uses one E4M3 scale per 16 values.",
    "file cut in half": "model.safetensors cannot be read as safetensors",
}


@pytest.mark.parametrize("defect", DEFECTS)
def test_each_defect_is_found_and_named(defect, nvfp4_export, tmp_path, facts):
    report = check_checkpoint(make_broken_copy(nvfp4_export[0], tmp_path / "broken", defect))
    assert not report.ok
    assert report.problems[0].startswith(EXPECTED_FINDING[defect])
    # every layer's scales now have the wrong width, folded into one line
    if defect == "group_size 32 in hf_quant_config.json":
        assert report.problems[1].endswith(f"(and {facts.linears - 1} more layers like it)")


def test_mismatched_config_and_missing_files(nvfp4_export, tmp_path):
    broken = make_broken_copy(nvfp4_export[0], tmp_path / "broken", "weight_scale missing")
    config = json.loads((broken / "config.json").read_text())
    config["quantization_config"]["quant_algo"] = "FP8"
    (broken / "config.json").write_text(json.dumps(config))
    assert any("does not match hf_quant_config.json (NVFP4)" in p for p in check_checkpoint(broken).problems)
    assert check_checkpoint(tmp_path / "absent").problems == [f"{tmp_path / 'absent'} is not a folder."]
    (tmp_path / "empty").mkdir()
    assert check_checkpoint(tmp_path / "empty").problems == ["config.json is missing.",
                                                             "hf_quant_config.json is missing."]


def test_inventory_counts_what_the_engine_reads(nvfp4_export, facts):
    linears = facts.linears
    rows = {(r["tensor"], r["dtype"]): r for r in checkpoint_inventory(nvfp4_export[0])}
    assert rows[("weight", "U8")]["count"] == linears and rows[("weight_scale", "F8_E4M3")]["count"] == linears
    assert rows[("weight_scale_2", "F32")]["count"] == rows[("input_scale", "F32")]["count"] == linears
    # two 4-bit codes per byte, one 1-byte scale per 16 values: scales are 1/8 of the code bytes
    assert rows[("weight_scale", "F8_E4M3")]["MB"] == pytest.approx(rows[("weight", "U8")]["MB"] / 8, rel=1e-3)
