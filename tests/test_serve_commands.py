"""Every serve command and request this course prints or scripts names one port and one model: the notebooks'
sources and committed outputs, the docs and the docker scripts agree with labs_lib.trtllm."""

import json
import re
from pathlib import Path

from labs_lib.trtllm import SERVE_PORT, SERVED_MODEL, playbook_request, serve_command

ROOT = Path(__file__).resolve().parents[1]
SERVE_MARKERS = ("trtllm-serve", "vllm serve", "curl ", "ENDPOINT", "/v1/")
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


def test_every_request_names_a_model_its_text_serves():
    """A curl request names /model (docker/run_trtllm.sh's mount) or a model a command in the same text serves, and a
    server started on anything else is asked for by name in that text."""
    served, requested = {}, {}
    for name, line in serve_lines():
        requested.setdefault(name, set()).update(CURL_MODEL.findall(line))
        words = line.replace("`", " ").split() if "serve " in line else []
        for i, word in enumerate(words[:-1]):
            command = word == "trtllm-serve" or (word == "serve" and i and words[i - 1] == "vllm")
            if command and (word != "trtllm-serve" or i + 2 < len(words) and words[i + 2].startswith("--")):
                served.setdefault(name, set()).add(words[i + 1].strip('"'))  # a command, not prose about it
    assert any(SERVED_MODEL in models for models in requested.values())
    wrong_requests = [(name, m) for name, models in requested.items() for m in models
                      if m != SERVED_MODEL and m not in served.get(name, ())]
    unasked = [(name, m) for name, models in served.items() for m in models
               if m not in (SERVED_MODEL, "$model") and m not in requested.get(name, ())
               and not m.startswith(("<", "$"))]
    assert not wrong_requests and not unasked, (wrong_requests, unasked)
    script = (ROOT / "docker" / "run_trtllm.sh").read_text()
    # the run script serves "$model", which is /model for a folder (the mount below)
    assert f':{SERVED_MODEL}:ro"' in script and f"model={SERVED_MODEL}" in script


def test_next_steps_ask_each_route_for_the_model_it_serves(tmp_path):
    import json as json_

    from labs_lib.ptq_pipeline import next_steps

    for kv, flag in (("FP8", True), (None, False)):
        (tmp_path / "hf_quant_config.json").write_text(json_.dumps({"quantization": {"kv_cache_quant_algo": kv}}))
        lines = next_steps(tmp_path)
        path = str(tmp_path.resolve())
        assert CURL_MODEL.findall(lines[1]) == [SERVED_MODEL] and "run_trtllm.sh " + path in lines[0]
        assert CURL_MODEL.findall(lines[-1]) == [path] and f"trtllm-serve {path} " in lines[2]
        assert lines[3].startswith(f"vLLM: vllm serve {path} --port {SERVE_PORT}")
        assert ("--kv-cache-dtype fp8" in lines[3]) is flag
