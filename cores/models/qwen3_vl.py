"""Qwen3-VL: the Qwen3 text decoder under ``model.language_model.*``, a vision tower under ``model.visual.*``.

Only the text decoder runs block by block and is quantized; the vision tower is copied by
deploy as stored (BF16) and listed in ``ignore``. The decoder's blocks are Qwen3's (GQA with
per-head q/k norm, SwiGLU MLP). Its rotary is the interleaved multimodal rope: each channel
pair takes its position from the t, h or w axis. For text, the three axes carry the same
position, so the tables equal the plain rope of ``text_config`` and the block forward takes
the usual ``(hidden, cos, sin)``. Deepstack (visual features added to the first blocks' outputs)
only acts on image tokens and so is absent from a text-only run.
"""

from __future__ import annotations

import copy

from .dense import gqa_attention, gqa_head_dim
from .layers import DecoderBlock, SwiGLUMLP
from .registry import ModelFamily, register_family


def text_config(config):
    """The ``text_config`` of a Qwen3-VL config, with the checkpoint's (top-level) ``tie_word_embeddings``."""
    text = copy.copy(config.text_config)
    text.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
    return text


def _qwen3_vl_text_block(config, idx: int) -> DecoderBlock:
    bias = bool(getattr(config, "attention_bias", False))
    attn = gqa_attention(config, qkv_bias=bias, o_bias=bias, qk_norm=True, sliding_window=None)
    return DecoderBlock(config.hidden_size, attn, SwiGLUMLP(config.hidden_size, config.intermediate_size),
                        config.rms_norm_eps)


def vl_family(model_type: str, build_block, head_dim, **fields) -> ModelFamily:
    """A family whose checkpoint is a Qwen vision-language one: ``text_config`` decoder under
    ``model.language_model.*``, vision tower ``model.visual.*`` passed through."""
    return ModelFamily(
        model_type, build_block, head_dim, embed_key="model.language_model.embed_tokens.weight",
        norm_key="model.language_model.norm.weight", layer_prefix="model.language_model.layers.",
        decoder_config=text_config, passthrough=("model.visual.",), **fields)


QWEN3_VL = register_family(vl_family("qwen3_vl", _qwen3_vl_text_block, gqa_head_dim))
