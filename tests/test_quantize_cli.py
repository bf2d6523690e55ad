"""`python -m labs_lib.quantize` run in-process on a tiny random Llama (widths multiples of 128, the embedded
tokenizer) and on the embedded model: real Model Optimizer exports checked by checkpoint_check, every bad input, the
dry-run plan against the loaded model, and the calibration loop's out-of-memory halving."""

import fnmatch
import json
from dataclasses import dataclass

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from labs_lib import ptq_pipeline
from labs_lib.checkpoint_check import check_checkpoint
from labs_lib.errors import LabsError
from labs_lib.models import EMBEDDED, load_tokenizer, model_config
from labs_lib.ptq_formats import KV_CACHE, PTQ_FORMATS, format_table
from labs_lib.ptq_pipeline import Calibrator, PtqRequest, dry_run
from labs_lib.quantize import main
from labs_lib.sizing import ModelShape

pytest.importorskip("modelopt.torch.quantization")
CALIBRATION_SET = ptq_pipeline.calibration_set  # the real one, before `few_samples` replaces it


@dataclass
class FixedCalibration:
    """Stands in for labs_lib.calibration's CalibrationSet: a few short samples keep CPU calibration fast."""

    samples: list

    @property
    def sources(self) -> list[dict]:
        return [{"source": "test", "formatter": "raw_text", "weight": 1.0, "samples": len(self.samples),
                 "tokens": self.tokens}]

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.samples)


@pytest.fixture(autouse=True)
def few_samples(monkeypatch):
    g = torch.Generator().manual_seed(0)
    samples = [torch.randint(0, 49152, (n,), generator=g) for n in (24, 16, 9)]
    monkeypatch.setattr(ptq_pipeline, "calibration_set", lambda request, tokenizer: FixedCalibration(samples))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-layer Llama (hidden 128, MLP 256, head 64) in BF16 with the embedded tokenizer, saved as a folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer(EMBEDDED)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=len(tokenizer), tie_word_embeddings=True,
                         architectures=["LlamaForCausalLM"])  # export needs architectures (None from scratch)
    folder = tmp_path_factory.mktemp("tiny") / "llama"
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def tensors(folder) -> dict[str, tuple[str, list[int]]]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return {k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in f.keys()}


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    flags = ["--model", "--dtype", "--trust_remote_code", "--device", "--device_map", "--max_gpu_memory",
             "--max_cpu_memory", "--offload_folder", "--clean_offload", "--quant", "--kv_cache", "--skip_layers",
             "--list_configs", "--dataset_yaml", "--calib_size", "--max_seq_len", "--batch_size", "--output",
             "--overwrite", "--validate", "--dry_run", "--auto_quantize_bits"]
    assert [f for f in flags if f not in text] == []


def test_list_configs_counts_bits_from_the_layout(capsys):
    import modelopt.torch.quantization as mtq

    code, out, _ = run(capsys, "--list_configs")
    assert code == 0 and all(name in out for name in PTQ_FORMATS)
    bits = {row["--quant"]: row["bits/weight"] for row in format_table()}
    # 4-bit codes + an 8-bit scale per 16 (NVFP4) or 32 (MXFP4) values; INT4 + an FP32 scale per 128; FP8 alone
    assert bits == {"nvfp4": 4.5, "nvfp4_awq": 4.5, "w4a16_nvfp4": 4.5, "mxfp4": 4.25, "fp8": 8.0, "w4a8_awq": 4.25,
                    "int4_awq": 4.25, "int8_sq": 8.008}
    assert all(hasattr(mtq, f.config) for f in PTQ_FORMATS.values())
    assert all(name is None or hasattr(mtq, name) for name in KV_CACHE.values())


@pytest.mark.parametrize("quant, kv", [("nvfp4", "fp8"), ("fp8", "fp8"), ("int4_awq", "none"), ("w4a8_awq", "none")])
def test_export_is_valid(quant, kv, tiny, tmp_path, capsys):
    out_dir = tmp_path / quant
    code, out, err = run(capsys, "--model", tiny, "--quant", quant, "--kv_cache", kv, "--output", out_dir,
                         "--device", "cpu", "--batch_size", 2, "--validate")
    assert code == 0, err
    report = check_checkpoint(out_dir)
    assert report.ok and report.warnings == [], report.problems
    assert report.quant_algo == PTQ_FORMATS[quant].quant_algo and report.quantized_layers == 14
    quant_config = json.loads((out_dir / "hf_quant_config.json").read_text())["quantization"]
    assert quant_config["kv_cache_quant_algo"] == {"fp8": "FP8", "none": None}[kv]
    names = tensors(out_dir)
    kv_scales = [n for n in names if n.endswith(("k_proj.k_scale", "v_proj.v_scale"))]
    assert len(kv_scales) == (4 if kv == "fp8" else 0)  # two layers, a k and a v scale each
    saved = json.loads((out_dir / "quantization_report.json").read_text())
    assert saved["calibration"]["samples"] == 3 and saved["calibration"]["tokens"] == 49
    assert saved["bytes_after"] == (out_dir / "model.safetensors").stat().st_size
    assert saved["validation"]["ok"] and (out_dir / "tokenizer.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == [quant]  # the temporary folder was renamed, nothing else left
    assert "trtllm-serve " + str(out_dir.resolve()) in out and "--port 8000" in out and "vllm serve" in out
    assert "curl -s http://localhost:8000/v1/chat/completions" in out
    assert ("--kv-cache-dtype fp8" in out) == (kv == "fp8")  # vLLM serves the KV cache the checkpoint was made for
    assert '"model": "/model"' in out and f'"model": "{out_dir.resolve()}"' in out  # container route, native routes


def test_missing_kv_scale_is_found(tiny, tmp_path, capsys):
    out_dir = tmp_path / "fp8"
    assert run(capsys, "--model", tiny, "--quant", "fp8", "--output", out_dir, "--device", "cpu")[0] == 0
    path = out_dir / "model.safetensors"
    state = load_file(str(path))
    del state["model.layers.1.self_attn.k_proj.k_scale"]
    save_file(state, str(path), metadata={"format": "pt"})
    assert check_checkpoint(out_dir).problems == ["model.layers.1.self_attn.k_proj.k_scale is missing "
                                                  "(kv_cache_quant_algo FP8)."]


def test_skipped_layers_stay_bf16_and_are_excluded(tiny, tmp_path, capsys):
    out_dir = tmp_path / "skip"
    code, _, err = run(capsys, "--model", tiny, "--quant", "nvfp4", "--output", out_dir, "--device", "cpu",
                       "--skip_layers", "model.layers.0.*", "*.mlp.down_proj", "--validate")
    assert code == 0, err
    excluded = json.loads((out_dir / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"]
    skipped = json.loads((out_dir / "quantization_report.json").read_text())["skipped_layers"]
    assert len(skipped) == 8  # 7 Linears of layer 0 and layer 1's down_proj
    assert all(any(fnmatch.fnmatch(name, p) for p in excluded) for name in skipped)
    names = tensors(out_dir)
    for name in skipped:
        assert names[f"{name}.weight"][0] == "BF16" and f"{name}.weight_scale" not in names
    assert names["model.layers.1.mlp.up_proj.weight"] == ("U8", [256, 64])  # the others are NVFP4
    assert check_checkpoint(out_dir).quantized_layers == 6


def test_disk_offload_gives_the_same_checkpoint(tiny, tmp_path, capsys):
    plain, offloaded, spill = tmp_path / "plain", tmp_path / "offloaded", tmp_path / "spill"
    assert run(capsys, "--model", tiny, "--quant", "fp8", "--output", plain, "--device", "cpu")[0] == 0
    # the CPU holds the 12.6 MB embedding, the decoder layers are read from disk as they run
    code, _, err = run(capsys, "--model", tiny, "--quant", "fp8", "--output", offloaded, "--device", "cpu",
                       "--device_map", "auto", "--max_cpu_memory", "13MB", "--offload_folder", spill,
                       "--clean_offload", "--validate")
    assert code == 0, err
    assert set(json.loads((offloaded / "quantization_report.json").read_text())["placement"]) == {"cpu", "disk"}
    a, b = load_file(str(plain / "model.safetensors")), load_file(str(offloaded / "model.safetensors"))
    same = [torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)) for k in a]
    assert a.keys() == b.keys() and all(same)
    assert not spill.exists()


def test_predicted_quantized_layers_are_the_ones_model_optimizer_quantizes(tiny):
    import modelopt.torch.quantization as mtq
    from transformers import AutoModelForCausalLM

    from labs_lib.ptq_formats import get_format
    from labs_lib.ptq_pipeline import quant_config, quantized_linears, resolve_skip_layers

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.bfloat16)
    skipped = resolve_skip_layers(["*.1.self_attn.*"], model)
    config = quant_config(get_format("nvfp4"), "fp8", skipped)
    predicted = set(quantized_linears(model, config))
    mtq.quantize(model, config, Calibrator([torch.arange(8)], 1, pad_id=0, log=print))
    enabled = {n for n, m in model.named_modules() if hasattr(m, "weight_quantizer") and m.weight_quantizer.is_enabled}
    assert predicted == enabled and len(enabled) == 10  # 14 Linears, 4 skipped; lm_head off by default


def test_auto_quantize_mixes_formats_per_layer(tiny, tmp_path, capsys):
    out_dir = tmp_path / "auto"
    # 15.46 bits would put every searched layer in W4A8: the 16-bit embedding/lm_head dominates this tiny model
    code, out, err = run(capsys, "--model", tiny, "--quant", "fp8,w4a8_awq", "--auto_quantize_bits", 15.52,
                         "--output", out_dir, "--device", "cpu", "--validate")
    assert code == 0, err
    quant = json.loads((out_dir / "hf_quant_config.json").read_text())["quantization"]
    chosen = [layer["quant_algo"] for layer in quant["quantized_layers"].values()]
    assert quant["quant_algo"] == "MIXED_PRECISION" and set(chosen) == {"FP8", "W4A8_AWQ"}
    assert quant["kv_cache_quant_algo"] == "FP8" and "AutoQuantize chose:" in out
    report = check_checkpoint(out_dir)
    assert report.ok and report.quantized_layers == len(chosen), report.problems
    for bits, says in ((3, "cannot be lower than the num_bits"), (6, "is infeasible")):
        code, _, err = run(capsys, "--model", tiny, "--quant", "fp8,w4a8_awq", "--auto_quantize_bits", bits,
                           "--output", tmp_path / "x", "--device", "cpu")
        assert code == 2 and f"error: --auto_quantize_bits {bits:.1f}: The effective_bits" in err and says in err
    code, _, err = run(capsys, "--model", tiny, "--quant", "fp8,w4a8_awq", "--output", tmp_path / "x")
    assert code == 2 and "names several formats: add --auto_quantize_bits" in err


def test_dry_run_numbers_equal_the_loaded_model(tiny, capsys, facts):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.bfloat16)
    params = list(model.parameters())
    plan = dry_run(PtqRequest(model=str(tiny), output=tiny, device="cpu"))
    assert plan["parameters"] == sum(p.numel() for p in params)
    assert plan["weights_bytes"] == sum(p.numel() * p.element_size() for p in params)
    code, out, _ = run(capsys, "--model", tiny, "--dry_run", "--device", "cpu")
    assert code == 0 and f"parameters: {plan['parameters']:,}" in out and "DGX Spark" in out
    assert ModelShape.from_config(model_config(EMBEDDED)).params == facts.parameters


def test_unknown_quant(tiny, tmp_path, capsys):
    code, _, err = run(capsys, "--model", tiny, "--quant", "nvfp5", "--output", tmp_path / "x")
    assert code == 2 and err.startswith("labs-quantize: error: Unknown --quant 'nvfp5': choose one of nvfp4,")
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def test_block_that_does_not_divide_the_width_names_layers(tmp_path, capsys):
    code, _, err = run(capsys, "--model", EMBEDDED, "--quant", "int4_awq", "--output", tmp_path / "x",
                       "--device", "cpu")
    first, second = err[err.index("labs-quantize: error:"):].strip().splitlines()
    assert code == 2 and "blocks of 128 inputs" in first and "model.layers.0.self_attn.q_proj (576)" in first
    assert "of 180 layer(s)" in first  # q, k, v, o, gate, up take 576 inputs; down_proj's 1536 = 12 x 128
    assert "--skip_layers 'model.layers.*.mlp.gate_proj'" in second and "nvfp4" in second
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tiny, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    code, _, err = run(capsys, "--model", tiny, "--quant", "fp8", "--output", tmp_path / "out")
    assert code == 2 and "already exists: pass --overwrite" in err


def test_failure_leaves_the_old_folder_and_nothing_half_written(tiny, tmp_path, capsys, monkeypatch):
    old = tmp_path / "out"
    old.mkdir()
    (old / "marker").write_text("old")

    def broken(folder):
        raise RuntimeError("disk full")

    monkeypatch.setattr("labs_lib.checkpoint_check.check_checkpoint", broken)  # fails after the export wrote files
    with pytest.raises(RuntimeError, match="disk full"):
        main(["--model", str(tiny), "--quant", "fp8", "--output", str(old), "--overwrite", "--validate",
              "--device", "cpu"])
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in old.iterdir()] == ["marker"]


def test_not_enough_memory_shows_the_plan(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("labs_lib.models.available_memory_bytes", lambda device="cpu": 10**6)
    code, _, err = run(capsys, "--model", tiny, "--output", tmp_path / "x", "--device", "cpu")
    assert code == 2 and err.startswith("labs-quantize: error: Not enough memory: calibration needs about 0.03 GB")
    assert "peak while calibrating" in err and "fits a 128 GB DGX Spark: yes" in err
    assert not (tmp_path / "x").exists()


def test_bad_memory_size(tiny, tmp_path, capsys):
    code, _, err = run(capsys, "--model", tiny, "--output", tmp_path / "x", "--device", "cpu", "--device_map", "auto",
                       "--max_cpu_memory", "lots")
    assert code == 2 and "--max_cpu_memory lots: give a size such as 20GiB or 64GB." in err


def test_skip_pattern_that_matches_nothing(tiny, tmp_path, capsys):
    code, _, err = run(capsys, "--model", tiny, "--output", tmp_path / "x", "--device", "cpu",
                       "--skip_layers", "lm_head", "model.layers.9.*")
    assert code == 2 and "--skip_layers 'model.layers.9.*' matches no Linear layer" in err
    assert not (tmp_path / "x").exists()


def test_calibration_comes_from_labs_lib_calibration(tokenizer, tmp_path):
    pytest.importorskip("labs_lib.calibration")
    request = PtqRequest(model=EMBEDDED, output=tmp_path, calib_size=4, max_seq_len=32)  # no YAML, offline: embedded
    calib = CALIBRATION_SET(request, tokenizer)
    assert len(calib.samples) == 4 and all(0 < len(s) <= 32 for s in calib.samples)
    assert calib.tokens == sum(len(s) for s in calib.samples) == sum(s["tokens"] for s in calib.sources)


def test_out_of_memory_halves_the_batch():
    seen, log = [], []

    def forward(model, ids, mask):
        if len(ids) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        seen.append(mask.sum(1).tolist())

    samples = [torch.arange(n) for n in (5, 9, 3, 7, 1, 4, 8)]
    calibrator = Calibrator(samples, batch_size=8, pad_id=0, log=log.append, forward=forward)
    calibrator(model=None)
    assert log == ["CUDA out of memory: batch size halved to 4, batch run again.",
                   "CUDA out of memory: batch size halved to 2, batch run again."]
    assert calibrator.batch_size == 2 and seen == [[9, 8], [7, 5], [4, 3], [1]]  # longest first, each once

    def always(model, ids, mask):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(LabsError, match="out of memory with batch size 1"):
        Calibrator(samples, batch_size=2, pad_id=0, log=log.append, forward=always)(model=None)


def test_batches_are_padded_with_a_mask():
    ids, mask = Calibrator([torch.tensor([5, 6, 7]), torch.tensor([8])], 2, pad_id=0).batch(
        [torch.tensor([5, 6, 7]), torch.tensor([8])])
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_max_memory_map_gives_the_cpu_its_memory_unless_capped():
    from labs_lib.ptq_pipeline import max_memory_map

    assert max_memory_map(None, None) is None
    assert max_memory_map(None, "8GiB")["cpu"] == "8GiB"
    # accelerate gives a device missing from the map nothing: --max_gpu_memory alone must not send the rest to disk
    assert max_memory_map("10GiB", None)["cpu"] > 1 << 30
