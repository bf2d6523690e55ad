"""Lab 07's quality benchmark through lm-eval: local offline tasks, one call per variant, metrics with stderr.

Two tasks ship in `labs_lib/lm_eval_tasks` and read their documents from a folder this module writes:
`labs_ppl` (rolling log-likelihood over held-out text, as lm-eval's wikitext task) and `labs_mc` (pick the
word that really comes next among four). GGUF files are scored by llama.cpp through `LlamaCppLM`, an
lm-eval model class, so every variant goes through the same tasks and metrics.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import time
from pathlib import Path
from unittest import mock

import torch
from lm_eval.api.model import TemplateLM
from tqdm.auto import tqdm

from .data import Corpus, tokenize
from .errors import LabsError
from .files import write_atomic

__all__ = ["TASK_DIR", "PPL_TASK", "MC_TASK", "next_word_items", "write_task_data", "LlamaCppLM", "run_tasks",
           "paired_accuracy_change", "discordant_items", "evaluate_built", "HUB_TASKS", "run_hub_tasks"]

TASK_DIR = Path(__file__).parent / "lm_eval_tasks"
PPL_TASK, MC_TASK = "labs_ppl", "labs_mc"
HUB_TASKS = ("wikitext", "arc_easy", "hellaswag", "mmlu")
WORD = re.compile(r"[A-Za-z]{4,}")
SCORE_CHUNK = 64  # requests per call to llama.cpp's scoring process: a progress step, and a reply of a few KB


def next_word_items(tokenizer, text: str, n_items: int, context_words: int = 24, seed: int = 0) -> list[dict]:
    """Four-choice items: `context_words` words of `text`, then the word that follows among three others.

    Answers and distractors are words of 4+ letters that are one token after a space, so lm-eval scores each
    choice from one forward pass of the context; distractors are drawn (by frequency) from the 400 words
    around the answer, so they fit the topic. Contexts do not overlap; the same inputs give the same items.
    """
    words = text.split()
    single = {w for w in set(words) if WORD.fullmatch(w) and len(tokenize(tokenizer, " " + w)) == 1}
    rng = random.Random(seed)
    items, i = [], context_words
    while len(items) < n_items and i < len(words):
        if words[i] in single:
            nearby = [w for w in words[max(0, i - 200) : i + 200] if w in single and w != words[i]]
            distractors = []
            while len(distractors) < 3 and nearby:
                w = rng.choice(nearby)
                nearby = [x for x in nearby if x != w]
                distractors.append(w)
            if len(distractors) == 3:
                choices = distractors + [words[i]]
                rng.shuffle(choices)
                items.append({"context": " ".join(words[i - context_words : i]), "choices": choices,
                              "gold": choices.index(words[i])})
                i += context_words + 1
                continue
        i += 1
    if len(items) < n_items:
        raise LabsError(f"The evaluation text yields {len(items)} items, fewer than the {n_items} asked for.")
    return items


def write_task_data(tokenizer, corpus: Corpus, eval_ids: torch.Tensor, window: int, n_items: int, folder: Path) -> Path:
    """Write the documents of both tasks: `eval_ids` as texts of `window` tokens (the perplexity task) and
    `n_items` next-word items from the held-out text. Returns the folder to pass as lm-eval metadata."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = len(eval_ids) // window
    docs = [{"text": tokenizer.decode(eval_ids[i * window : (i + 1) * window])} for i in range(n)]
    items = next_word_items(tokenizer, corpus.evaluation, n_items)
    for name, rows in [(PPL_TASK, docs), (MC_TASK, items)]:
        write_atomic(folder / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    return folder


class LlamaCppLM(TemplateLM):
    """An lm-eval model backed by llama.cpp (a GGUF file), which scores in a process of its own
    (`llamacpp.ScoringProcess`: on the GPU where the tools are a CUDA build, else on the CPU); the choices of an
    item share their context, evaluated once."""

    def __init__(self, path: Path, n_ctx: int = 1024):
        from .llamacpp import ScoringProcess

        super().__init__()
        self.scorer = ScoringProcess(path, n_ctx)
        self.max_length = n_ctx

    @property
    def eot_token_id(self) -> int:
        return self.scorer.tokens["eos"]

    @property
    def prefix_token_id(self) -> int:
        return self.scorer.tokens["bos"]

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.scorer.call("tokenize", texts=[string])[0]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        # requests that share a context (the choices of one item) go one after another, so the cache serves them
        order = sorted(range(len(requests)), key=lambda i: requests[i][1])
        if any(not 0 < len(requests[i][2]) <= self.max_length for i in order):
            raise LabsError(f"LlamaCppLM scores continuations of 1 to {self.max_length} tokens (its n_ctx).")
        # as HFLM: the last token is only a target
        pairs = [((requests[i][1] + requests[i][2])[-(self.max_length + 1) :][:-1], requests[i][2]) for i in order]
        scored = []
        with tqdm(total=len(pairs), desc="llama.cpp log-likelihoods", disable=disable_tqdm, leave=False) as bar:
            for start in range(0, len(pairs), SCORE_CHUNK):
                chunk = pairs[start : start + SCORE_CHUNK]
                scored += self.scorer.call("score", requests=chunk)
                bar.update(len(chunk))
        out = [None] * len(requests)
        for i, (logprob, greedy) in zip(order, scored):
            out[i] = (logprob, greedy)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows = [(n, *make_disjoint_window(w)) for n, (text,) in enumerate(r.args for r in requests)
                   for w in get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id, self.max_length,
                                                      context_len=1)]
        scored = self._loglikelihood_tokens([(None, context, target) for _, context, target in windows], disable_tqdm)
        totals = [0.0] * len(requests)
        for (n, _, _), (logprob, _) in zip(windows, scored):
            totals[n] += logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        raise LabsError("LlamaCppLM scores log-likelihoods only; generation tasks need llama.cpp's server.")


def run_tasks(lm, data_dir: Path, batch_size: int = 32) -> dict:
    """Both local tasks through `lm_eval.simple_evaluate` on `lm` (an lm-eval model: HFLM or LlamaCppLM).

    Returns lm-eval's perplexity metrics, token perplexity (from its per-document log-likelihoods, to compare
    with `evaluate.perplexity`), accuracy with its standard error, the number of items, and the seconds taken.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its notes on custom datasets and in-memory models
    start = time.perf_counter()
    manager = TaskManager(include_path=str(TASK_DIR), include_defaults=False, metadata={"data_dir": str(data_dir)})
    # lm-eval ends every call by collecting the environment (pip list, torch's collect_env: about 3 s on 2 cores);
    # the labs record their own library versions, so that step is skipped
    with mock.patch("lm_eval.evaluator.add_env_info", lambda results: None):
        results = lm_eval.simple_evaluate(model=lm, tasks=[PPL_TASK, MC_TASK], task_manager=manager,
                                          batch_size=batch_size, bootstrap_iters=1000, log_samples=True,
                                          verbosity="ERROR")
    ppl, mc, samples = results["results"][PPL_TASK], results["results"][MC_TASK], results["samples"]
    loglikelihood = sum(s["resps"][0][0] for s in samples[PPL_TASK])
    n_tokens = sum(len(lm.tok_encode(s["doc"]["text"])) for s in samples[PPL_TASK])
    return {"token perplexity": math.exp(-loglikelihood / n_tokens), "word perplexity": ppl["word_perplexity,none"],
            "word perplexity stderr": _number(ppl.get("word_perplexity_stderr,none")),
            "byte perplexity": ppl["byte_perplexity,none"], "bits per byte": ppl["bits_per_byte,none"],
            "accuracy": mc["acc,none"], "accuracy stderr": mc["acc_stderr,none"], "items": len(samples[MC_TASK]),
            "item correct": [s["acc"] for s in sorted(samples[MC_TASK], key=lambda s: s["doc_id"])],
            "eval s": round(time.perf_counter() - start, 1)}


def paired_accuracy_change(correct: list[float], reference: list[float]) -> tuple[float, float]:
    """Accuracy minus the reference's on the same items, and the standard error of that difference from the
    per-item differences (paired: smaller than the two accuracies' errors combined, which ignore that both models
    answered the same questions)."""
    if len(correct) != len(reference) or len(correct) < 2:
        raise LabsError(f"paired accuracy needs the same items, at least 2: got {len(correct)} and {len(reference)}")
    d = torch.tensor(correct, dtype=torch.float64) - torch.tensor(reference, dtype=torch.float64)
    return d.mean().item(), (d.std() / math.sqrt(len(d))).item()


def discordant_items(correct: list[float], reference: list[float]) -> dict:
    """The items only one of two models answers right, and McNemar's exact test on them: under "no difference"
    each such item is a fair coin, so the two-sided p-value is the binomial tail of the smaller count, doubled. Where
    few items differ, this is the test to trust, not a normal approximation of the paired error."""
    if len(correct) != len(reference):
        raise LabsError(f"paired accuracy needs the same items: got {len(correct)} and {len(reference)}")
    gained = sum(c > r for c, r in zip(correct, reference))
    lost = sum(c < r for c, r in zip(correct, reference))
    n = gained + lost
    tail = sum(math.comb(n, k) for k in range(min(gained, lost) + 1)) / 2**n if n else 1.0
    return {"gained": gained, "lost": lost, "p": min(1.0, 2 * tail)}


def _number(value) -> float | None:
    return value if isinstance(value, (int, float)) else None  # lm-eval writes "N/A" where it has no stderr


def evaluate_built(built, tokenizer, data_dir: Path, window: int = 1024) -> dict:
    """`run_tasks` on a variant from labs_lib.variants, through the engine it was built for."""
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    if built.engine == "llama.cpp":
        lm = LlamaCppLM(built.model, n_ctx=window)
        try:
            return run_tasks(lm, data_dir) | {"llama.cpp on": lm.scorer.backend}
        finally:
            lm.scorer.close()
    from lm_eval.models.huggingface import HFLM

    # log-softmax in float32: in a BF16 model's dtype lm-eval also sums a window's log-probabilities in BF16, which
    # rounds a 1,024-token window's log-likelihood (about -2,600) to a multiple of 16, i.e. perplexity to 0.78 % steps
    return run_tasks(HFLM(pretrained=built.model, tokenizer=tokenizer, batch_size=32, max_length=window,
                          softmax_dtype="float32"), data_dir)


def run_hub_tasks(lm, tasks: tuple[str, ...] = HUB_TASKS, limit: int | None = 200) -> dict[str, dict[str, float]]:
    """lm-eval's standard tasks by name (their datasets come from the Hub): {task: {metric: value}}, stderr included."""
    import lm_eval

    from .network import hub_reachable

    if not hub_reachable():
        raise LabsError("lm-eval's standard tasks download their data from the Hugging Face Hub, which cannot be "
                        "reached from here; the local tasks (run_tasks) work offline.")
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, bootstrap_iters=1000, verbosity="ERROR")
    return {task: {k.split(",")[0]: v for k, v in metrics.items() if "," in k and isinstance(v, (int, float))}
            for task, metrics in results["results"].items()}
