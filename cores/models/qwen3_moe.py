"""Qwen3-MoE: Qwen3's GQA attention (per-head q/k norm) + MoE with a softmax top-k router.

Block ``i`` routes over ``num_experts`` experts (no shared experts) unless it is in
``mlp_only_layers`` or ``(i + 1) % decoder_sparse_step != 0``, where it has a dense
SwiGLU MLP of ``intermediate_size``.
"""

from __future__ import annotations

from torch import nn

from .dense import gqa_attention, gqa_head_dim
from .layers import DecoderBlock, SwiGLUMLP
from .moe import MoE, SoftmaxTopKRouter
from .registry import ModelFamily, register_family


def _is_moe_layer(config, idx: int) -> bool:
    return (
        idx not in (config.mlp_only_layers or ())
        and config.num_experts > 0
        and (idx + 1) % config.decoder_sparse_step == 0
    )


def _mlp(config, idx: int) -> nn.Module:
    if not _is_moe_layer(config, idx):
        return SwiGLUMLP(config.hidden_size, config.intermediate_size)
    router = SoftmaxTopKRouter(
        config.hidden_size, config.num_experts, config.num_experts_per_tok, config.norm_topk_prob
    )
    return MoE(router, config.hidden_size, config.moe_intermediate_size, config.num_experts)


def _qwen3_moe_block(config, idx: int) -> DecoderBlock:
    bias = bool(getattr(config, "attention_bias", False))
    attn = gqa_attention(config, qkv_bias=bias, o_bias=bias, qk_norm=True,
                         sliding_window=getattr(config, "sliding_window", None))  # None unless use_sliding_window
    return DecoderBlock(config.hidden_size, attn, _mlp(config, idx), config.rms_norm_eps)


QWEN3_MOE = register_family(ModelFamily("qwen3_moe", _qwen3_moe_block, gqa_head_dim))
