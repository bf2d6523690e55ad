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
