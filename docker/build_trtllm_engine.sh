#!/usr/bin/env bash
# Build a TensorRT engine (Lab 08's engine path) from a TensorRT-LLM checkpoint that Model Optimizer exported
# (modelopt.torch.export.export_tensorrt_llm_checkpoint: config.json + rank0.safetensors), inside NVIDIA's
# TensorRT-LLM release container. Usage:
#   docker/build_trtllm_engine.sh <TensorRT-LLM checkpoint folder> <engine output folder>
# GEMM_PLUGIN overrides the GEMM plugin (default auto: the checkpoint's dtype; nvfp4 or fp8 pick the low-precision
# plugin). The size limits are the engine's maximums (labs_lib.trtllm.ENGINE_LIMITS); flags as documented at
# https://nvidia.github.io/TensorRT-LLM/commands/trtllm-build.html
set -euo pipefail
checkpoint=${1:?usage: docker/build_trtllm_engine.sh <TensorRT-LLM checkpoint folder> <engine output folder>}
engine=${2:?usage: docker/build_trtllm_engine.sh <TensorRT-LLM checkpoint folder> <engine output folder>}
image=${TRTLLM_IMAGE:-nvcr.io/nvidia/tensorrt-llm/release:spark-single-gpu-dev}
[ -f "$checkpoint/config.json" ] || { echo "no config.json in $checkpoint: export it with export_tensorrt_llm_checkpoint first" >&2; exit 1; }
mkdir -p "$engine"
exec docker run --rm --name trtllm_build \
  --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 \
  -v "$(cd "$checkpoint" && pwd):/checkpoint:ro" -v "$(cd "$engine" && pwd):/engine" \
  "$image" \
  trtllm-build --checkpoint_dir /checkpoint --output_dir /engine \
    --gemm_plugin "${GEMM_PLUGIN:-auto}" --gpt_attention_plugin auto \
    --max_batch_size 4 --max_input_len 1024 --max_seq_len 2048
