#!/usr/bin/env bash
# Serve a checkpoint with TensorRT-LLM (Lab 08) in NVIDIA's release container, with the DGX Spark playbook's flags
# (https://build.nvidia.com/spark/trt-llm). Usage:
#   docker/run_trtllm.sh <model folder or Hugging Face id>
# A local folder (for example the NVFP4 export Lab 02/08 writes under ~/.cache/spark-quant-labs/exports) is mounted
# at /model, so the server answers on port 8000 to the model name "/model" (labs_lib.trtllm.SERVE_PORT and
# SERVED_MODEL; a Hugging Face id is served under that id). HF_TOKEN (gated models) comes from your environment.
# Check it from another terminal with the request notebook 08 prints:
#   curl -s http://localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \
#     -d '{"model": "/model", "messages": [{"role": "user", "content": "Paris is great because"}], "max_tokens": 64}'
set -euo pipefail
model=${1:?usage: docker/run_trtllm.sh <model folder or HF id>}
port=8000
image=${TRTLLM_IMAGE:-nvcr.io/nvidia/tensorrt-llm/release:spark-single-gpu-dev}
mounts=(-v "${HF_HOME:-$HOME/.cache/huggingface}:/root/.cache/huggingface")
if [ -d "$model" ]; then
  mounts+=(-v "$(cd "$model" && pwd):/model:ro")
  model=/model
fi
exec docker run --rm -it --name trtllm_server \
  --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 \
  -p "$port:$port" "${mounts[@]}" -e HF_TOKEN \
  "$image" \
  trtllm-serve "$model" --backend pytorch --max_batch_size 4 --host 0.0.0.0 --port "$port"
