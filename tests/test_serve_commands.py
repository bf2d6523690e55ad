"""Every serve command and request this course prints or scripts names one port and one model: the notebooks'
sources and committed outputs, the docs and the docker scripts agree with labs_lib.trtllm."""

import json
import re
import shlex
from pathlib import Path

from labs_lib.trtllm import SERVE_PORT, SERVED_MODEL, playbook_request, serve_command

ROOT = Path(__file__).resolve().parents[1]
SERVE_MARKERS = ("trtllm-serve", "curl ", "ENDPOINT", "/v1/")
PORT = re.compile(r"--port[ =]+\"?(\$?\w+)|(?:localhost|host\.docker\.internal|0\.0\.0\.0):(\d+)")
CURL_MODEL = re.compile(r"\"model\": *\"([^\"]+)\"")


def texts() -> dict[str, str]:
    """Name -> text of every place a command can appear: notebook sources and outputs, docs, scripts."""
    found = {}
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        for i, cell in enumerate(json.loads(path.read_text())["cells"]):
            found[f"{path.name} cell {i} source"] = "".join(cell["source"])
            printed = ["".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", ""))
                       for o in cell.get("outputs", [])]
            found[f"{path.name} cell {i} output"] = "\n".join(printed)
    for path in [*ROOT.glob("*.md"), *(ROOT / "docker").glob("*.sh")]:
        found[path.relative_to(ROOT).as_posix()] = path.read_text()
    return found


def serve_lines() -> list[tuple[str, str]]:
    return [(name, line) for name, text in texts().items() for line in text.splitlines()
            if any(marker in line for marker in SERVE_MARKERS)]


def test_the_library_prints_one_port_and_model():
    assert serve_command().split()[1] == SERVED_MODEL and serve_command().endswith(f"--port {SERVE_PORT}")
    url, body = playbook_request()
    assert url == f"http://localhost:{SERVE_PORT}/v1/chat/completions" and body["model"] == SERVED_MODEL


def test_every_port_in_a_serve_command_or_request_is_the_served_port():
    lines = serve_lines()
    ports = [(name, line, a or b) for name, line in lines for a, b in PORT.findall(line)]
    assert len({name.split(" cell")[0] for name, _, _ in ports}) >= 4  # notebook 08, QUICKSTART, README, scripts
    script_port = re.search(r"^port=(\d+)$", (ROOT / "docker" / "run_trtllm.sh").read_text(), re.M).group(1)
    wrong = [(name, line) for name, line, port in ports
             if (script_port if port == "$port" else port) != str(SERVE_PORT)]
    assert not wrong, wrong


def test_every_model_in_a_serve_command_or_request_is_the_served_model():
    models = []
    for name, line in serve_lines():
        models += [(name, line, m) for m in CURL_MODEL.findall(line)]
        words = shlex.split(line.replace("`", " "), posix=False) if "trtllm-serve " in line else []
        for i, word in enumerate(words[:-2]):
            if word == "trtllm-serve" and words[i + 2].startswith("--"):  # a command, not prose about it
                models.append((name, line, words[i + 1].strip('"')))
    assert any(m == SERVED_MODEL for _, _, m in models)
    # the run script serves "$model", which is /model for a folder (the mount below)
    wrong = [(name, line, m) for name, line, m in models if m not in (SERVED_MODEL, "$model")]
    assert not wrong, wrong
    script = (ROOT / "docker" / "run_trtllm.sh").read_text()
    assert f':{SERVED_MODEL}:ro"' in script and f"model={SERVED_MODEL}" in script
