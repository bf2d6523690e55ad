"""labs_lib.ptq_at_scale on the CPU: the 8B config, checkpoint comparison and the records file (the GPU steps
themselves run on a lent GPU; their records are results/09_scale_gpu.json)."""

import json

import pytest
import torch
from safetensors.torch import save_file

from labs_lib.ptq_at_scale import add_record, compare_checkpoints, llama_config
from labs_lib.sizing import SHAPES, ModelShape


def test_llama_config_has_the_8b_shape_and_architectures():
    config = llama_config(SHAPES["Llama-3.1-8B"])
    assert config.architectures == ["LlamaForCausalLM"]  # Model Optimizer's export fails on None
    assert ModelShape.from_config(config) == SHAPES["Llama-3.1-8B"]
    assert ModelShape.from_config(config).params == pytest.approx(8.03e9, rel=1e-3)


def _checkpoint(folder, tensors, algo="NVFP4"):
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors")
    (folder / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": algo}}))
    return folder


def test_compare_checkpoints_finds_identical_and_differing_tensors(tmp_path):
    w = torch.arange(12, dtype=torch.uint8).reshape(3, 4)
    s = torch.tensor([0.5, 1.0, 2.0]).to(torch.float8_e4m3fn)
    a = _checkpoint(tmp_path / "a", {"w": w, "s": s, "extra": torch.ones(2)})
    b = _checkpoint(tmp_path / "b", {"w": w.clone(), "s": torch.tensor([0.5, 1.0, 4.0]).to(torch.float8_e4m3fn)},
                    algo="FP8")
    result = compare_checkpoints(a, b)
    assert result["identical"] == 1 and list(result["differing"]) == ["s"]
    assert result["differing"]["s"]["elements"] == 1 and result["differing"]["s"]["max_abs_diff"] == 2.0
    assert result["only_in_a"] == ["extra"] and result["only_in_b"] == []
    assert result["hf_quant_config_equal"] is False
    assert compare_checkpoints(a, a)["differing"] == {}


def test_add_record_keeps_earlier_records(tmp_path):
    path = tmp_path / "records.json"
    add_record("one", {"x": 1}, path)
    add_record("two", {"y": 2}, path)
    records = json.loads(path.read_text())
    assert records["one"]["x"] == 1 and records["two"]["y"] == 2
    assert records["two"]["device"] == ["cpu"] and not list(tmp_path.glob(".*"))  # no temporary file left


def test_the_committed_gpu_records():
    """results/09_scale_gpu.json (from the lent H200s): every checkpoint valid and of one size; the one-GPU, offloaded
    and two-GPU checkpoints tensor-identical; batch sizes 16 and 64 differ in K/V-cache scales only."""
    from labs_lib.ptq_at_scale import RECORDS, scale_rows

    records = json.loads(RECORDS.read_text())
    runs, comparisons = scale_rows(records)
    assert {r["run"] for r in runs} >= {"reference_direct_b16", "one_gpu_b16", "one_gpu_offload_cpu", "two_gpus"}
    assert all(r["valid"] in (True, "") for r in runs) and len({r["checkpoint GB"] for r in runs}) == 1
    placements = [c for c in comparisons if c["comparison"] != "batch16_vs_batch64"]
    assert placements and all(c["identical"] == c["tensors"] and c["hf_quant_config equal"] for c in placements)
    assert all(name.endswith(("k_scale", "v_scale")) for name in records["batch16_vs_batch64"]["differing"])
    assert all(set(r) == set(runs[0]) for r in runs)  # one column set, for one table
