"""The serving benchmark client against a real OpenAI-compatible server: llama-cpp-python's, on the loopback
address, serving the Lab 05 Q4_K_M GGUF of the embedded model (started here, stopped at the end)."""

import httpx
import pytest

from labs_lib.models import EMBEDDED

pytest.importorskip("llama_cpp")
pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def gguf():
    from labs_lib.llamacpp import gguf_for

    return gguf_for(EMBEDDED, "Q4_K_M")


def test_benchmark_against_llama_cpp_server(gguf):
    from labs_lib.llamacpp import gguf_generate
    from labs_lib.serving import benchmark_endpoint, llama_cpp_server, summarize

    prompt = "The import statement"
    with llama_cpp_server(gguf) as url:
        serial = benchmark_endpoint(url, "gguf", [prompt], concurrency=1, n_requests=2, max_tokens=8, timeout_s=60)
        queued = benchmark_endpoint(url, "gguf", [prompt], concurrency=4, n_requests=4, max_tokens=8, timeout_s=60)
    with pytest.raises(httpx.ConnectError):  # the server was stopped
        httpx.get(f"{url}/v1/models", timeout=2)

    for result in serial["results"] + queued["results"]:
        assert result.output_tokens == len(result.token_times_s) == 8
        assert 0 < result.ttft_s <= result.token_times_s[-1] <= result.total_s
        assert all(gap >= 0 for gap in result.inter_token_s)
    # greedy decoding through the server gives what llama.cpp gives in-process
    assert serial["results"][0].text == gguf_generate(gguf, prompt, max_tokens=8)
    one, four = summarize(serial), summarize(queued)
    assert one["requests"] == 2 and four["output tokens"] == 32
    # this server runs one request at a time: with 4 in flight the last one waits for three others
    assert max(r.ttft_s for r in queued["results"]) > 2 * max(r.ttft_s for r in serial["results"])


def test_a_bad_model_file_stops_with_a_clear_error(tmp_path):
    from labs_lib.errors import LabsError
    from labs_lib.serving import llama_cpp_server

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(LabsError, match="bad.gguf"):
        with llama_cpp_server(bad, startup_timeout_s=60):
            pass
