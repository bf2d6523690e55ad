"""docker/build_trtllm_engine.sh runs the engine build labs_lib.trtllm describes, in the playbook's container,
with flags from the trtllm-build reference."""

import shlex
from pathlib import Path

from labs_lib.trtllm import CONTAINER, ENGINE_LIMITS, build_command

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "docker" / "build_trtllm_engine.sh"
# the options of trtllm-build this course uses, as listed at https://nvidia.github.io/TensorRT-LLM/commands/trtllm-build.html
DOCUMENTED = {"--checkpoint_dir", "--output_dir", "--gemm_plugin", "--gpt_attention_plugin", "--max_batch_size",
              "--max_input_len", "--max_seq_len"}


def script_words() -> list[str]:
    return shlex.split(SCRIPT.read_text().split("exec docker run", 1)[1].replace("\\\n", " "))


def test_engine_script_runs_in_the_trtllm_container_with_gpu_flags():
    text, words = SCRIPT.read_text(), script_words()
    pairs = list(zip(words, words[1:]))
    for flag in ["--gpus all", "--ipc=host", "--ulimit memlock=-1", "--ulimit stack=67108864"]:
        assert tuple(flag.split(" ")) in pairs or flag in words, flag
    assert f"TRTLLM_IMAGE:-{CONTAINER}" in text and "set -euo pipefail" in text
    assert text.startswith("#!/usr/bin/env bash")
    assert any(w.endswith(":/checkpoint:ro") for w in words) and any(w.endswith(":/engine") for w in words)


def test_engine_script_builds_what_the_library_builds():
    words = script_words()
    build = words[words.index("trtllm-build"):]
    options = {w for w in build if w.startswith("--")}
    assert options == DOCUMENTED
    ours = build_command("/checkpoint", "/engine", "${GEMM_PLUGIN:-auto}")
    assert dict(zip(ours[1::2], ours[2::2])) == dict(zip(build[1::2], build[2::2]))
    assert {f"--{k}": str(v) for k, v in ENGINE_LIMITS.items()}.items() <= dict(zip(build[1::2], build[2::2])).items()
