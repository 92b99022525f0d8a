"""Model families by ``config.model_type``: a composition of shared parts plus a name map."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .layers import RMSNorm


class UnsupportedModelError(ValueError):
    """The checkpoint's ``model_type`` has no registered family."""


@dataclass(frozen=True)
class ModelFamily:
    """How to build and name the parts of one architecture.

    Attributes:
        model_type: the ``config.json`` ``model_type`` this family serves.
        build_block: ``(config, layer_idx) -> nn.Module`` whose parameter names equal
            the checkpoint names under ``block_prefix``; its forward takes
            ``(hidden, cos, sin)`` and returns the block output.
        head_dim: ``config -> int``, the rotary dimension.
        fp32_suffixes: parameter-name suffixes kept in fp32 whatever the compute
            dtype (router correction biases and scores whose near-ties decide a
            selection, as the reference implementations keep them).
        norm: ``(dim, eps) -> nn.Module``, the family's RMSNorm (the final norm and the norm that reads a
            block's output are built with it).
        decoder_config: ``config -> config`` of the decoder that runs block by block (the ``text_config``
            of a vision-language checkpoint); every other field reads that config.
        passthrough: name prefixes of the modules outside the decoder (a vision tower) that deploy copies
            as stored and lists in the ``ignore`` of ``quantization_config``.
    """

    model_type: str
    build_block: Callable[[object, int], nn.Module]
    head_dim: Callable[[object], int]
    embed_key: str = "model.embed_tokens.weight"
    norm_key: str = "model.norm.weight"
    lm_head_key: str = "lm_head.weight"
    layer_prefix: str = "model.layers."
    fp32_suffixes: tuple[str, ...] = ()
    norm: Callable[[int, float], nn.Module] = RMSNorm
    decoder_config: Callable[[object], object] = lambda config: config
    passthrough: tuple[str, ...] = ()

    def block_prefix(self, idx: int) -> str:
        return f"{self.layer_prefix}{idx}."


_FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    if family.model_type in _FAMILIES:
        raise ValueError(f"model family {family.model_type!r} is registered twice")
    _FAMILIES[family.model_type] = family
    return family


def supported_model_types() -> list[str]:
    return sorted(_FAMILIES)


def get_family(model_type: str) -> ModelFamily:
    """The family registered for ``model_type``.

    Raises:
        UnsupportedModelError: naming the supported types.
    """
    try:
        return _FAMILIES[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(supported_model_types())}"
        ) from None
