"""llama.cpp scoring in a process of its own, without torch: tokens and log-likelihoods for lm-eval (LlamaCppLM).

llama-cpp-python linked to a CUDA build of llama.cpp crashed when loaded beside torch (llamacpp.py), so a GPU's
llama.cpp scores here. `llamacpp.ScoringProcess` starts `python gguf_worker.py MODEL N_CTX GPU_LAYERS THREADS`, with
LLAMA_CPP_LIB_PATH naming a CUDA build where there is one, then sends one JSON line per call and reads one back.
The CPU runs the same code, with the binding's own build.
"""

from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy is imported after llama_cpp (main)
    import numpy as np


def log_softmax(scores: np.ndarray) -> np.ndarray:
    """log-softmax over the last axis of a numpy array, in float64."""
    import numpy as np

    scores = np.asarray(scores, dtype=np.float64)
    shifted = scores - scores.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def score(llm, requests: list[list[list[int]]]) -> list[list]:
    """For each [inputs, continuation]: the continuation's log-likelihood (it is the targets of the last positions of
    inputs + its final token) and whether greedy decoding gives it. A shared prefix of consecutive requests (the
    choices of one item) is evaluated once: the KV cache keeps it."""
    import numpy as np

    out = []
    for inputs, continuation in requests:
        cached = llm.input_ids[: llm.n_tokens].tolist()
        keep = 0
        while keep < min(len(cached), len(inputs) - 1) and cached[keep] == inputs[keep]:  # evaluate at least one
            keep += 1
        llm.n_tokens = keep
        llm.eval(inputs[keep:])
        logprobs = log_softmax(llm.scores[len(inputs) - len(continuation) : len(inputs)])
        target = np.asarray(continuation, dtype=np.int64)
        out.append([float(logprobs[np.arange(len(target)), target].sum()), bool((logprobs.argmax(-1) == target).all())])
    return out


def main() -> None:
    """Serve calls on stdin until it closes: {"op": "tokenize", "texts": [...]} or {"op": "score", "requests": [...]};
    each reply is {"result": ...} or {"error": "..."}. Replies go to the original stdout; llama.cpp's own prints go to
    stderr, so they cannot corrupt a reply."""
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    # llama_cpp before numpy: with numpy imported first, loading a GGUF with a CUDA build segfaulted (H200, CUDA 13.0)
    from llama_cpp import Llama, llama_supports_gpu_offload

    path, n_ctx, gpu_layers, threads = sys.argv[1], *map(int, sys.argv[2:5])
    llm = Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, n_threads=threads,
                n_threads_batch=threads, n_gpu_layers=gpu_layers, verbose=False)
    offload = bool(gpu_layers) and llama_supports_gpu_offload()  # the loaded library's word, not the folder's
    replies.write(json.dumps({"result": {"eos": llm.token_eos(), "bos": llm.token_bos(), "gpu": offload}}) + "\n")
    replies.flush()
    for line in sys.stdin:
        call = json.loads(line)
        try:
            if call["op"] == "tokenize":
                result = [llm.tokenize(t.encode(), add_bos=False, special=False) for t in call["texts"]]
            else:
                result = score(llm, call["requests"])
            reply = {"result": result}
        except Exception as exc:  # the parent raises it as a LabsError
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()
    llm.close()


if __name__ == "__main__":
    main()
