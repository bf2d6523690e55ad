"""Shared fixtures: the embedded model (converted once into the cache) and the embedded corpus."""

import pytest
import torch

from labs_lib.data import EMBEDDED_CORPUS, load_corpus
from labs_lib.models import EMBEDDED, load_model, load_tokenizer


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
