"""Dense decoder families: Llama, Qwen2 and Qwen3 (GQA attention + SwiGLU MLP)."""

from __future__ import annotations

from .layers import DecoderBlock, GQAAttention, SwiGLUMLP
from .registry import ModelFamily, register_family


def gqa_head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _sliding_window(config, idx: int) -> int | None:
    layer_types = getattr(config, "layer_types", None)
    if layer_types and layer_types[idx] == "sliding_attention":
        return config.sliding_window
    return None


def gqa_attention(config, *, qkv_bias: bool, o_bias: bool, qk_norm: bool, sliding_window: int | None) -> GQAAttention:
    """The GQA attention of a Llama / Qwen style config."""
    return GQAAttention(
        hidden_size=config.hidden_size,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=gqa_head_dim(config),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        qk_norm=qk_norm,
        norm_eps=config.rms_norm_eps,
        sliding_window=sliding_window,
    )


def _dense_block(config, idx: int, *, qkv_bias: bool, o_bias: bool, qk_norm: bool, mlp_bias: bool) -> DecoderBlock:
    attn = gqa_attention(config, qkv_bias=qkv_bias, o_bias=o_bias, qk_norm=qk_norm,
                         sliding_window=_sliding_window(config, idx))
    mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size, bias=mlp_bias)
    return DecoderBlock(config.hidden_size, attn, mlp, config.rms_norm_eps)


def _llama_block(config, idx: int) -> DecoderBlock:
    bias = bool(getattr(config, "attention_bias", False))
    return _dense_block(
        config, idx, qkv_bias=bias, o_bias=bias, qk_norm=False, mlp_bias=bool(getattr(config, "mlp_bias", False))
    )


def _qwen2_block(config, idx: int) -> DecoderBlock:
    return _dense_block(config, idx, qkv_bias=True, o_bias=False, qk_norm=False, mlp_bias=False)


def _qwen3_block(config, idx: int) -> DecoderBlock:
    bias = bool(getattr(config, "attention_bias", False))
    return _dense_block(config, idx, qkv_bias=bias, o_bias=bias, qk_norm=True, mlp_bias=False)


LLAMA = register_family(ModelFamily("llama", _llama_block, gqa_head_dim))
QWEN2 = register_family(ModelFamily("qwen2", _qwen2_block, gqa_head_dim))
QWEN3 = register_family(ModelFamily("qwen3", _qwen3_block, gqa_head_dim))
