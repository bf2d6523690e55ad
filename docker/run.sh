#!/usr/bin/env bash
# Build the labs image and start JupyterLab on http://localhost:8888 with every GPU.
# HF_TOKEN (for gated models) is passed from your environment at run time, never baked into the image.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
image=${LABS_IMAGE:-spark-quant-labs}

docker build -f "$repo/docker/Dockerfile" -t "$image" "$repo"
mkdir -p "${HF_HOME:-$HOME/.cache/huggingface}" "$HOME/.cache/spark-quant-labs"
exec docker run --rm -it \
  --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 \
  -p 8888:8888 --add-host=host.docker.internal:host-gateway \
  -v "${HF_HOME:-$HOME/.cache/huggingface}:/root/.cache/huggingface" \
  -v "$HOME/.cache/spark-quant-labs:/root/.cache/spark-quant-labs" \
  -v "$repo/notebooks:/workspace/spark-quant-labs/notebooks" \
  -v "$repo/results:/workspace/spark-quant-labs/results" \
  -e HF_TOKEN -e LABS_MODEL -e LABS_PROFILE -e LABS_CORPUS \
  "$image" "$@"
