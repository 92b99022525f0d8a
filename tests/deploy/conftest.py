"""Fixtures of the deploy tests: a tiny sharded llama, its param dirs and deployed folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from deploy_helpers import GROUP, SEQ, TEXT, make_params

from blockptq_assets.tiny import make_tiny_checkpoint, save_tiny_tokenizer
from cores.calibrator.params import ParamDir
from cores.deploy import DeployConfig, deploy
from cores.quantization import get_scheme


@pytest.fixture(scope="module", autouse=True)
def deploy_tests_on_one_thread(one_thread):
    """Every deploy test runs on one torch thread (:func:`conftest.one_thread`)."""


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-block llama in 4 shards, with a tokenizer and a generation config."""
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("src") / "llama", "llama", max_shard_size="100KB")
    save_tiny_tokenizer(path, TEXT, 512)
    return path


@pytest.fixture(scope="session")
def params_factory(tmp_path_factory):
    """``(model_dir, scheme_name, act, kv_format, act_format, parts) -> ParamDir``, cached; W4 uses groups of
    ``GROUP``; ``parts`` names the learned parts besides the clips (``rounding``, ``smooth``), and ``zp``
    asymmetric static activations."""
    cache: dict[tuple, ParamDir] = {}

    def make(model_dir: Path, name: str, act: str = "static", kv_format: str = "fp8",
             act_format: str = "int8", parts: str = "") -> ParamDir:
        key = (str(model_dir), name, act, kv_format, act_format, parts)
        if key not in cache:
            out = tmp_path_factory.mktemp("params") / f"{name}-{act}-{kv_format}-{act_format}-{parts}"
            scheme = get_scheme(name, act_mode=act, kv_format=kv_format,
                                group_size=GROUP if name.startswith("w4") else None, act_format=act_format,
                                act_symmetric="zp" not in parts)
            cache[key] = make_params(model_dir, out, scheme, rounding="rounding" in parts, smooth="smooth" in parts)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def ids() -> torch.Tensor:
    return torch.randint(0, 512, (2, SEQ), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def deployed(tiny_llama, params_factory, tmp_path_factory):
    """``(scheme_name, act, kv_format, act_format, parts) -> (param dir, deployed folder)`` of ``tiny_llama``,
    cached."""
    cache: dict[tuple, tuple[ParamDir, Path]] = {}

    def make(name: str, act: str = "static", kv_format: str = "fp8", act_format: str = "int8", parts: str = ""
             ) -> tuple[ParamDir, Path]:
        key = (name, act, kv_format, act_format, parts)
        if key not in cache:
            params = params_factory(tiny_llama, name, act, kv_format, act_format, parts)
            out = tmp_path_factory.mktemp("deployed") / f"{name}-{act}-{kv_format}-{act_format}-{parts}"
            deploy(DeployConfig(str(tiny_llama), str(out), name, param_dir=str(params.path), max_shard_size="60KB"))
            cache[key] = params, out
        return cache[key]

    return make
