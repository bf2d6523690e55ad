"""`python -m labs_lib.quantize` (console script `labs-quantize`): a model from the Hub, a folder or the embedded
SmolLM2 to a validated Model Optimizer checkpoint that trtllm-serve and vLLM load. Only argument parsing lives here;
the steps are in labs_lib.ptq_pipeline and labs_lib.ptq_formats.

    labs-quantize --model meta-llama/Llama-3.1-8B-Instruct --quant nvfp4 --output llama8b-nvfp4 --validate
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import LabsError
from .ptq_formats import KV_CACHE, PTQ_FORMATS, format_table
from .ptq_pipeline import DTYPES, PtqRequest, dry_run, plan_text, quantize_model

__all__ = ["parser", "main"]


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default only when it has one (not None, False or empty) that its help does not already say."""

    def _get_help_string(self, action):
        if action.default in (None, False, []) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="labs-quantize", description=__doc__.split("\n\n")[0],
                                formatter_class=_DefaultsHelp)
    model = p.add_argument_group("model")
    model.add_argument("--model", default="embedded:SmolLM2-135M-Instruct",
                       help="Hugging Face id, local folder, or embedded:SmolLM2-135M-Instruct")
    model.add_argument("--dtype", choices=list(DTYPES), default="bf16",
                       help="load dtype; the layers left unquantized are exported in it")
    model.add_argument("--trust_remote_code", action="store_true", help="run the model repository's own code")
    model.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                       help="where the model runs without --device_map (auto: the GPU when there is one)")
    model.add_argument("--device_map", choices=["auto"], default=None,
                       help="spread the model over every visible GPU (then CPU, then disk) with accelerate")
    model.add_argument("--max_gpu_memory", help="per-GPU limit for the device map, e.g. 20GiB (the rest offloads)")
    model.add_argument("--max_cpu_memory", help="CPU limit for the device map, e.g. 64GiB (the rest goes to disk)")
    model.add_argument("--offload_folder", type=Path, help="where weights that fit neither GPU nor CPU go")
    model.add_argument("--clean_offload", action="store_true", help="delete --offload_folder when done")
    fmt = p.add_argument_group("format")
    fmt.add_argument("--quant", default="nvfp4", help=f"one of {', '.join(PTQ_FORMATS)} (see --list_configs); with "
                                                      "--auto_quantize_bits, a comma-separated list of candidates")
    fmt.add_argument("--kv_cache", choices=list(KV_CACHE), default="fp8", help="KV-cache format")
    fmt.add_argument("--skip_layers", nargs="+", default=[], metavar="PATTERN",
                     help="glob patterns of Linear layers to keep unquantized, e.g. lm_head '*.mlp.gate' "
                          "'model.layers.0.*'")
    fmt.add_argument("--auto_quantize_bits", type=float, metavar="BITS",
                     help="AutoQuantize: pick per layer one of the --quant formats or none, so that weights average "
                          "BITS (unquantized ones, lm_head included, count 16), e.g. --quant nvfp4,fp8 "
                          "--auto_quantize_bits 6")
    fmt.add_argument("--list_configs", action="store_true", help="print the formats and exit")
    calib = p.add_argument_group("calibration")
    calib.add_argument("--dataset_yaml", type=Path, help="calibration sources (default: the embedded corpus offline, "
                                                         "a Hub dataset online)")
    calib.add_argument("--calib_size", type=int, help="number of calibration samples (default: the YAML's)")
    calib.add_argument("--max_seq_len", type=int, help="tokens per sample at most (default: the YAML's)")
    calib.add_argument("--batch_size", type=int, default=8, help="samples per forward pass (halves on CUDA OOM)")
    out = p.add_argument_group("output")
    out.add_argument("--output", type=Path, help="checkpoint folder to write (atomically)")
    out.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    out.add_argument("--validate", action="store_true", help="check the checkpoint with labs_lib.checkpoint_check")
    out.add_argument("--dry_run", action="store_true", help="print the memory plan from the config and exit")
    return p


def _print_table(rows: list[dict]) -> None:
    widths = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in rows[0]}
    print("  ".join(k.ljust(w) for k, w in widths.items()))
    for row in rows:
        print("  ".join(str(row[k]).ljust(w) for k, w in widths.items()))


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (2 for a LabsError, printed as one short message)."""
    args = parser().parse_args(argv)
    if args.list_configs:
        _print_table(format_table())
        print(f"--kv_cache: {', '.join(KV_CACHE)}")
        return 0
    if args.output is None and not args.dry_run:
        print("labs-quantize: error: --output is required (or --dry_run / --list_configs).", file=sys.stderr)
        return 2
    options = {k: v for k, v in vars(args).items() if k not in ("list_configs", "dry_run")}
    request = PtqRequest(**options | {"output": args.output or Path(".")})
    try:
        if args.dry_run:
            print(plan_text(dry_run(request)))
            return 0
        report = quantize_model(request)
    except LabsError as exc:
        print(f"labs-quantize: error: {exc}", file=sys.stderr)
        return 2
    seconds = ", ".join(f"{k} {v} s" for k, v in report["seconds"].items())
    print(f"{report['quant_algo']} checkpoint ({report['bytes_after'] / 1e6:,.1f} MB, was "
          f"{report['bytes_before'] / 1e6:,.1f} MB) in {args.output}; {seconds}")
    if report["layers_per_quant_algo"]:
        print("AutoQuantize chose: " + ", ".join(f"{n} layers {algo}" for algo, n in
                                                 report["layers_per_quant_algo"].items()))
    validation = report.get("validation")
    if validation is not None:
        print("validation: " + ("ok" if validation["ok"] else "PROBLEMS") + " " + json.dumps(
            {k: validation[k] for k in ("quantized layers", "tensors checked")}))
        for problem in validation["problems"]:
            print(f"  {problem}")
    print("Next step, serve it:")
    for line in report["next_steps"]:
        print(f"  {line}")
    return 1 if validation is not None and not validation["ok"] else 0


if __name__ == "__main__":
    sys.exit(main())
