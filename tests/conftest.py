"""Shared fixtures."""

import pytest

from cores.utils.assets import Assets, ensure_assets


@pytest.fixture(scope="session")
def assets() -> Assets:
    """The real SmolLM2 model folder and corpus under ``<repo>/assets``, built on first use (~1 min)."""
    return ensure_assets()
