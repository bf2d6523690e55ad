"""The quantization CLI at 8B scale: a Llama-3.1-8B-shaped model with random weights (built on the GPU from its
config, saved as a local safetensors folder with the embedded tokenizer), quantized by `labs-quantize`, next to
Model Optimizer called directly on the same model and samples, and the checkpoints of two runs compared tensor by
tensor. Each step adds its record to results/09_scale_gpu.json.

    python -m labs_lib.ptq_at_scale build --folder /tmp/llama8b
    python -m labs_lib.ptq_at_scale reference --folder /tmp/llama8b --record reference
    labs-quantize --model /tmp/llama8b --output /tmp/ck1 ...
    python -m labs_lib.ptq_at_scale record /tmp/ck1 --record one_gpu
    python -m labs_lib.ptq_at_scale compare /tmp/ck1 /tmp/ck2 --record one_vs_two_gpus
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from .errors import LabsError
from .files import atomic_folder, atomic_path
from .hardware import reset_peak_memory
from .sizing import SHAPES, ModelShape

__all__ = ["llama_config", "build_random_model", "reference_run", "compare_checkpoints", "add_record", "scale_rows",
           "RECORDS"]

RECORDS = Path(__file__).resolve().parent.parent / "results" / "09_scale_gpu.json"


def llama_config(shape: ModelShape):
    """A transformers LlamaConfig of `shape`, with `architectures` set (Model Optimizer's export needs it)."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=shape.hidden, num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                       num_key_value_heads=shape.kv_heads, intermediate_size=shape.intermediate,
                       vocab_size=shape.vocab, tie_word_embeddings=shape.tied, max_position_embeddings=8192,
                       rope_theta=500000.0, architectures=["LlamaForCausalLM"], torch_dtype="bfloat16")


def build_random_model(folder: Path, shape_name: str = "Llama-3.1-8B", seed: int = 0) -> dict:
    """Random BF16 weights of `shape_name` made on the GPU (seeded: the same on every GPU of one kind), saved with
    the embedded tokenizer into `folder`, atomically."""
    from transformers import LlamaForCausalLM

    from .models import EMBEDDED, load_tokenizer

    if not torch.cuda.is_available():
        raise LabsError("building the 8B-shaped model needs a GPU (16 GB of BF16 weights made on the device).")
    start = time.perf_counter()
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = LlamaForCausalLM(llama_config(SHAPES[shape_name])).to(torch.bfloat16)
    with atomic_folder(Path(folder)) as tmp:
        model.save_pretrained(tmp)
        load_tokenizer(EMBEDDED).save_pretrained(tmp)
    parameters = sum(p.numel() for p in model.parameters())
    del model
    torch.cuda.empty_cache()
    return {"shape": shape_name, "seed": seed, "parameters": parameters,
            "seconds": round(time.perf_counter() - start, 1),
            "bytes": sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))}


def reference_run(folder: Path, samples: list[torch.Tensor], config: dict, batch_size: int, pad_id: int) -> dict:
    """Model Optimizer called directly on the model of `folder` (BF16, already on the GPU): `mtq.quantize` with the
    same samples and batches as the CLI, then `export_hf_checkpoint` into a scratch folder; seconds and peak bytes.
    The same batches through the unquantized model first give the floor of the calibration step (`forward_s`)."""
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM

    from .modelopt_ptq import require_modelopt
    from .ptq_pipeline import Calibrator

    mtq = require_modelopt()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map="cuda").eval()
    weights = torch.cuda.memory_allocated()
    calibrator = Calibrator(samples, batch_size, pad_id)
    with torch.inference_mode():
        calibrator(model)  # a warm-up that is also the floor: the forward passes alone
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        calibrator(model)
    torch.cuda.synchronize()
    forward_s = time.perf_counter() - start
    reset_peak_memory()
    start = time.perf_counter()
    mtq.quantize(model, config, calibrator)
    torch.cuda.synchronize()
    quantize_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        export_hf_checkpoint(model, export_dir=scratch)
        export_s = time.perf_counter() - start
        checkpoint = sum(p.stat().st_size for p in Path(scratch).glob("*.safetensors"))
    peak = torch.cuda.max_memory_allocated()
    del model
    torch.cuda.empty_cache()
    return {"forward_s": round(forward_s, 2), "quantize_s": round(quantize_s, 2), "export_s": round(export_s, 2),
            "weights_bytes": weights, "peak_memory_bytes": peak, "checkpoint_bytes": checkpoint,
            "samples": len(samples), "tokens": sum(len(s) for s in samples), "batch_size": batch_size}


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def compare_checkpoints(a: Path, b: Path) -> dict:
    """Tensor-by-tensor comparison of two exported checkpoints: names, dtypes and bytes; for tensors that differ, how
    many elements and the largest difference of their float values; and whether hf_quant_config.json is the same."""
    ta, tb = _tensors(a), _tensors(b)
    differing = {}
    for name in sorted(ta.keys() & tb.keys()):
        x, y = ta[name], tb[name]
        if x.dtype != y.dtype or x.shape != y.shape:
            differing[name] = {"a": f"{x.dtype} {tuple(x.shape)}", "b": f"{y.dtype} {tuple(y.shape)}"}
        elif not torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)):
            fx, fy = x.float(), y.float()
            differing[name] = {"dtype": str(x.dtype), "elements": int((fx != fy).sum()), "of": x.numel(),
                               "max_abs_diff": float((fx - fy).abs().max())}
    configs = [json.loads((Path(f) / "hf_quant_config.json").read_text()) for f in (a, b)]
    return {"tensors": len(ta), "only_in_a": sorted(ta.keys() - tb.keys()), "only_in_b": sorted(tb.keys() - ta.keys()),
            "identical": len(ta.keys() & tb.keys()) - len(differing), "differing": differing,
            "hf_quant_config_equal": configs[0] == configs[1]}


def add_record(name: str, record: dict, path: Path = RECORDS) -> Path:
    """Store `record` under `name` in the records file (with the GPU that made it), atomically."""
    records = json.loads(path.read_text()) if path.is_file() else {}
    device = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] or ["cpu"]
    records[name] = {"device": device, "date": time.strftime("%Y-%m-%d")} | record
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(records, indent=1) + "\n")
    return path


def scale_rows(records: dict) -> tuple[list[dict], list[dict]]:
    """The records as two tables: each quantization run (steps, wall time, peak GPU memory, size) and each checkpoint
    comparison (tensors identical of all)."""
    runs, comparisons = [], []
    for name, r in records.items():
        if "identical" in r:
            comparisons.append({"comparison": name, "conditions": r["conditions"], "tensors": r["tensors"],
                                "identical": r["identical"], "hf_quant_config equal": r["hf_quant_config_equal"]})
        elif "seconds" in r and isinstance(r["seconds"], dict):  # a labs-quantize run
            gb = [round(b / 1e9, 2) for b in r["peak_memory_bytes"]]
            runs.append({"run": name, "device": f"{len(r['device'])} x {r['device'][0]}", "conditions": r["conditions"],
                         "placement": ", ".join(f"{d}: {n}" for d, n in (r["placement"] or {}).items()) or "one GPU",
                         **{f"{k} s": v for k, v in r["seconds"].items()}, "whole command s": r["wall_s"],
                         "peak GPU GB": " + ".join(map(str, gb)), "checkpoint GB": round(r["bytes_after"] / 1e9, 2),
                         "valid": r["validation"]["ok"]})
        elif "quantize_s" in r:  # Model Optimizer called directly
            runs.append({"run": name, "device": f"{len(r['device'])} x {r['device'][0]}", "conditions": r["conditions"],
                         "placement": "one GPU",
                         "calibration forwards alone s": r.get("forward_s", ""),
                         "quantize s": r["quantize_s"], "export s": r["export_s"],
                         "peak GPU GB": round(r["peak_memory_bytes"] / 1e9, 2),
                         "checkpoint GB": round(r["checkpoint_bytes"] / 1e9, 2)})
    columns = ["run", "device", "conditions", "placement", "load s", "calibration data s",
               "calibration forwards alone s", "quantize s", "export s",
               "validate s", "whole command s", "peak GPU GB", "checkpoint GB", "valid"]
    return [{k: row.get(k, "") for k in columns} for row in runs], comparisons


def _calibration(folder: Path, dataset_yaml: Path, calib_size: int, max_seq_len: int):
    from .calibration import build_calibration_set, load_calibration_spec
    from .models import load_tokenizer
    from .ptq_pipeline import pad_token_id

    tokenizer = load_tokenizer(str(folder))
    calib = build_calibration_set(load_calibration_spec(dataset_yaml, online=False), tokenizer, calib_size,
                                  max_seq_len)
    return calib.samples, pad_token_id(tokenizer)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m labs_lib.ptq_at_scale", description=__doc__.split("\n\n")[0])
    steps = p.add_subparsers(dest="step", required=True)
    build = steps.add_parser("build", help="make the random 8B-shaped model folder")
    build.add_argument("--folder", type=Path, required=True)
    build.add_argument("--shape", default="Llama-3.1-8B", choices=sorted(SHAPES))
    ref = steps.add_parser("reference", help="Model Optimizer called directly: NVFP4 + FP8 KV on the same samples")
    ref.add_argument("--folder", type=Path, required=True)
    ref.add_argument("--dataset_yaml", type=Path, required=True)
    ref.add_argument("--calib_size", type=int, default=512)
    ref.add_argument("--max_seq_len", type=int, default=512)
    ref.add_argument("--batch_size", type=int, default=16)
    rec = steps.add_parser("record", help="store a labs-quantize run's quantization_report.json")
    rec.add_argument("checkpoint", type=Path)
    rec.add_argument("--wall_s", type=float, help="the whole command's wall time, measured outside it")
    rec.add_argument("--command", help="the command that made it")
    cmp = steps.add_parser("compare", help="compare two checkpoints tensor by tensor")
    cmp.add_argument("a", type=Path)
    cmp.add_argument("b", type=Path)
    for sub in (build, ref, rec, cmp):
        sub.add_argument("--record", help="name of the record in results/09_scale_gpu.json")
        sub.add_argument("--conditions", default="alone", help="what else ran on the GPU meanwhile (default: alone)")
    args = p.parse_args(argv)
    try:
        if args.step == "build":
            record = build_random_model(args.folder, args.shape)
        elif args.step == "reference":
            from .ptq_formats import PTQ_FORMATS
            from .ptq_pipeline import quant_config

            samples, pad_id = _calibration(args.folder, args.dataset_yaml, args.calib_size, args.max_seq_len)
            record = reference_run(args.folder, samples, quant_config(PTQ_FORMATS["nvfp4"], "fp8", []),
                                   args.batch_size, pad_id)
        elif args.step == "record":
            report = json.loads((args.checkpoint / "quantization_report.json").read_text())
            record = {k: report[k] for k in ("format", "kv_cache", "kv_cache_quant_algo", "device_map", "placement",
                                             "calibration", "parameters", "bytes_before", "bytes_after", "seconds",
                                             "peak_memory_bytes", "validation")} | \
                {"wall_s": args.wall_s, "command": args.command}
            record["calibration"] = {k: v for k, v in record["calibration"].items() if k != "sources"}
        else:
            record = compare_checkpoints(args.a, args.b)
    except LabsError as exc:
        print(f"error: {exc}")
        return 2
    print(json.dumps(record, indent=1, default=str)[:4000])
    if args.record:
        add_record(args.record, record | {"conditions": args.conditions})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
