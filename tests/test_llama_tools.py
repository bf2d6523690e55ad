"""llama.cpp's C++ tools, built by `make llama` next to the binding's libllama: each runs and reports its version, an
importance matrix changes the quantized file, a K-quant block of a real file decodes by hand to gguf's dequantize,
llama-server serves parallel requests, and the benchmark client agrees with the server's own timings. Skipped where
the tools are not built (`make test` builds them); the closed-port error needs no server."""

import pytest

from labs_lib.errors import LabsError
from labs_lib.llamacpp import TOOLS, llama_tool
from labs_lib.models import EMBEDDED


def tools_built() -> bool:
    try:
        return all(llama_tool(name) for name in TOOLS)
    except LabsError:
        return False


needs_tools = pytest.mark.skipif(not tools_built(), reason="llama.cpp's tools are not built (make llama)")


@pytest.fixture(scope="module")
def f16():
    from labs_lib.llamacpp import gguf_for

    return gguf_for(EMBEDDED, "F16")


@pytest.fixture(scope="module")
def imatrix_files(f16, corpus, tmp_path_factory):
    """An imatrix from two 128-token windows of calibration text, and Q4_K_M files made with and without it."""
    from labs_lib.llamacpp import make_imatrix, quantize_with_tool

    folder = tmp_path_factory.mktemp("imatrix")
    text = folder / "calibration.txt"
    text.write_text(corpus.calibration[:20_000])
    imatrix = make_imatrix(f16, text, folder / "imatrix.gguf", ctx=128, chunks=2)
    plain = quantize_with_tool(f16, folder / "plain.gguf", "Q4_K_M")
    weighted = quantize_with_tool(f16, folder / "weighted.gguf", "Q4_K_M", imatrix=imatrix)
    return imatrix, plain, weighted


@needs_tools
@pytest.mark.parametrize("name", TOOLS)
def test_each_tool_runs_and_reports_its_version(name, f16):
    import subprocess

    # llama-quantize has no --version: a dry run prints the build before it sizes each tensor
    args = ["--dry-run", f16, "Q4_K_M"] if name == "llama-quantize" else ["--version"]
    done = subprocess.run([str(llama_tool(name)), *map(str, args)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "version: " in done.stdout + done.stderr


def test_a_missing_tool_names_the_make_target(monkeypatch, tmp_path):
    monkeypatch.setenv("LLAMA_CPP_BIN", str(tmp_path))
    with pytest.raises(LabsError, match="make llama"):
        llama_tool("llama-no-such-tool")


@needs_tools
def test_an_importance_matrix_changes_the_quantized_file(imatrix_files):
    from labs_lib.gguf_io import compare_gguf, read_gguf

    imatrix, plain, weighted = imatrix_files
    assert read_gguf(imatrix)["tensors"]  # a GGUF of per-matrix statistics
    same = compare_gguf(weighted, plain)
    # the same types, tensor by tensor, but other codes and scales: the rounding weighed each column by its importance
    assert [t["type"] for t in read_gguf(weighted)["tensors"]] == [t["type"] for t in read_gguf(plain)["tensors"]]
    assert len(same["tensors differing"]) > 100


@needs_tools
@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
def test_a_real_k_quant_block_decodes_by_hand_to_gguf_dequantize(imatrix_files, qtype):
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    from labs_lib.gguf_io import read_gguf
    from labs_lib.kquants import decode_q4_k, decode_q6_k, tensor_block

    plain = imatrix_files[1]
    name = next(t["name"] for t in read_gguf(plain)["tensors"] if t["type"] == qtype)
    for index in (0, 5):
        found, raw = tensor_block(plain, name, index)
        decoded = (decode_q4_k if qtype == "Q4_K" else decode_q6_k)(raw)["values"]
        want = dequantize(np.frombuffer(raw, dtype=np.uint8), GGMLQuantizationType[qtype]).reshape(-1)
        assert found == qtype and np.array_equal(decoded.view(np.uint32), want.view(np.uint32))


@needs_tools
def test_tool_windows_prints_nothing_and_names_a_file_it_cannot_read(f16, corpus, tmp_path, capfd):
    from labs_lib.llamacpp import tool_windows

    text = tmp_path / "evaluation.txt"
    text.write_text(corpus.calibration[:5000])
    windows = tool_windows(f16, text, 128)
    assert windows.shape[1] == 128 and len(windows) > 1
    assert capfd.readouterr().err == ""  # llama.cpp's load log is captured, not printed
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(LabsError, match="broken.gguf"):
        tool_windows(broken, text, 128)


@needs_tools
def test_llama_server_serves_four_requests_at_once_and_agrees_with_its_timings(imatrix_files, corpus):
    import httpx

    from labs_lib.serving import benchmark_endpoint, llama_server, server_timing_check

    # distinct prompts of about 250 tokens: a repeated prompt would come from the server's prompt cache, and the
    # few milliseconds of HTTP would then dominate the TTFT compared below
    prompts = [corpus.calibration[i * 5000 : i * 5000 + 1000] for i in range(7)]
    with llama_server(imatrix_files[1], parallel=4) as url:
        four = benchmark_endpoint(url, "gguf", prompts[:4], concurrency=4, n_requests=4, max_tokens=8, timeout_s=60)
        one = benchmark_endpoint(url, "gguf", prompts[4:], concurrency=1, n_requests=3, max_tokens=24, timeout_s=60)
    with pytest.raises(httpx.ConnectError):  # stopped on leaving the context
        httpx.get(f"{url}/health", timeout=2)
    for result in four["results"]:
        assert result.output_tokens == len(result.token_times_s) == 8 and result.server_timings["predicted_n"] == 8
    check = server_timing_check(one)
    assert abs(check["TTFT diff %"]) < 10 and abs(check["decode diff %"]) < 10, check


def test_the_client_names_a_server_command_when_nothing_listens():
    from labs_lib.serving import benchmark_endpoint, free_port

    port = free_port()
    with pytest.raises(LabsError, match=f"nothing listens at http://127.0.0.1:{port}.*llama-server -m") as error:
        benchmark_endpoint(f"http://127.0.0.1:{port}", "gguf", ["x"], concurrency=2, n_requests=2)
    assert "\n" not in str(error.value)


def test_tools_use_the_gpu_only_with_a_cuda_build_and_the_binding_refuses_one_beside_torch(monkeypatch, tmp_path):
    import types

    from labs_lib import llamacpp

    (tmp_path / "llama-server").touch()
    monkeypatch.setenv("LLAMA_CPP_BIN", str(tmp_path))
    monkeypatch.setattr(llamacpp, "default_device", lambda: "cuda")
    assert (llamacpp.llama_backend(), llamacpp.gpu_layers()) == ("CPU", 0)  # a CPU build: nothing to offload to
    (tmp_path / "libggml-cuda.so").touch()
    assert (llamacpp.llama_backend(), llamacpp.gpu_layers()) == ("CUDA", 999)
    assert llamacpp.scoring_library() is None  # Lab 07's scoring process needs the build's libllama too
    (tmp_path / "libllama.so").touch()
    assert llamacpp.scoring_library() == tmp_path
    monkeypatch.setattr(llamacpp, "default_device", lambda: "cpu")
    assert (llamacpp.llama_backend(), llamacpp.gpu_layers()) == ("CPU", 0)
    # the binding's own libllama folder (llama_cpp/lib): a CUDA build there is refused in a process with torch
    import importlib.util

    (tmp_path / "llama_cpp" / "lib").mkdir(parents=True)
    spec = types.SimpleNamespace(submodule_search_locations=[str(tmp_path / "llama_cpp")])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: spec)
    llamacpp._check_binding_beside_torch()  # a CPU build: no error
    monkeypatch.setattr(llamacpp, "default_device", lambda: "cuda")
    assert llamacpp.binding_gpu_layers() == 0  # llama-cpp-python's server: its own libllama is a CPU build
    (tmp_path / "llama_cpp" / "lib" / "libggml-cuda.so.0").touch()
    assert llamacpp.binding_gpu_layers() == 999
    with pytest.raises(LabsError, match="CUDA build of llama.cpp, which crashes when loaded beside torch"):
        llamacpp._check_binding_beside_torch()


@needs_tools
def test_the_scoring_process_agrees_with_the_binding_here_and_reports_errors(f16, corpus, tmp_path):
    import numpy as np
    import torch

    from labs_lib.llamacpp import ScoringProcess, load_gguf

    with pytest.raises(LabsError, match="missing.gguf"):
        ScoringProcess(tmp_path / "missing.gguf")
    scorer = ScoringProcess(f16, n_ctx=256)
    try:
        assert scorer.backend == "CPU"
        tokens = scorer.call("tokenize", texts=[corpus.evaluation[:4000]])[0][:200]
        # the continuation is the targets of the last 50 positions: tokens[150:] after tokens[:150]
        [[logprob, greedy]] = scorer.call("score", requests=[[tokens[:-1], tokens[150:]]])
        with pytest.raises(LabsError, match="scoring process failed: TypeError"):
            scorer.call("score", requests=[[None, [1]]])
        assert scorer.call("tokenize", texts=["still serving"])[0]  # an error does not end the process
    finally:
        scorer.close()
    llm = load_gguf(f16, n_ctx=256)
    try:
        llm.eval(tokens[:-1])
        rows = torch.log_softmax(torch.from_numpy(np.asarray(llm.scores[149:199], dtype=np.float64)), dim=-1)
    finally:
        llm.close()
    target = torch.tensor(tokens[150:])
    assert logprob == pytest.approx(rows.gather(1, target[:, None]).sum().item(), rel=1e-6)
    assert greedy == bool((rows.argmax(-1) == target).all())
