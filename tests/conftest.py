"""Shared fixtures."""

import pytest
import torch

from blockptq_assets.assets import Assets, ensure_assets
from blockptq_assets.tiny_trained import TinyDeepseek, ensure_tiny_deepseek


@pytest.fixture(scope="session")
def assets() -> Assets:
    """The real SmolLM2 model folder and corpus under ``<repo>/assets``, built on first use (~1 min)."""
    return ensure_assets()


@pytest.fixture(scope="session")
def tiny_deepseek(assets) -> TinyDeepseek:
    """The tiny DeepSeek-V3 trained on the corpus and its FP8 twin, built on first use (~4 min on one thread)."""
    return ensure_tiny_deepseek(assets.model_dir.parent)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls run fastest on one thread (and do not thrash when other jobs share the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
