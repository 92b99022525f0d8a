"""DeepSeek-V3 (V3, V3.1, R1) and V3.2: MLA attention + MoE with a group-limited sigmoid router.

The first ``first_k_dense_replace`` blocks (V3.2: those ``mlp_layer_types`` marks
``dense``) have a dense SwiGLU MLP; the others route over ``n_routed_experts`` and add
``n_shared_experts`` shared ones. V3.2 adds the sparse-attention indexer to every
block. The multi-token-prediction layer stored after the last block
(``model.layers.{num_hidden_layers}``) is not part of the model that runs.
"""

from __future__ import annotations

from torch import nn

from .layers import DecoderBlock, SwiGLUMLP
from .mla import MLAAttention, SparseIndexer, mla_softmax_scale
from .moe import GroupLimitedSigmoidRouter, MoE
from .registry import ModelFamily, register_family


def mla_rope_dim(config) -> int:
    """The rotary width of an MLA head: the shared ``(cos, sin)`` tables are this wide."""
    return config.qk_rope_head_dim


def _is_moe_layer(config, idx: int) -> bool:
    layer_types = getattr(config, "mlp_layer_types", None)
    if layer_types:
        return layer_types[idx] == "sparse"
    return idx >= config.first_k_dense_replace


def _mlp(config, idx: int) -> nn.Module:
    if not _is_moe_layer(config, idx):
        return SwiGLUMLP(config.hidden_size, config.intermediate_size)
    router = GroupLimitedSigmoidRouter(
        hidden_size=config.hidden_size,
        num_experts=config.n_routed_experts,
        top_k=config.num_experts_per_tok,
        n_group=config.n_group,
        topk_group=config.topk_group,
        norm_topk_prob=config.norm_topk_prob,
        routed_scaling_factor=config.routed_scaling_factor,
    )
    shared = SwiGLUMLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
    return MoE(router, config.hidden_size, config.moe_intermediate_size, config.n_routed_experts, shared)


def _attention(config, *, rope_interleave: bool, indexer: SparseIndexer | None) -> MLAAttention:
    return MLAAttention(
        hidden_size=config.hidden_size,
        num_heads=config.num_attention_heads,
        q_lora_rank=config.q_lora_rank,
        kv_lora_rank=config.kv_lora_rank,
        qk_nope_head_dim=config.qk_nope_head_dim,
        qk_rope_head_dim=config.qk_rope_head_dim,
        v_head_dim=config.v_head_dim,
        softmax_scale=mla_softmax_scale(config),
        rope_interleave=rope_interleave,
        bias=bool(getattr(config, "attention_bias", False)),
        indexer=indexer,
    )


def _v3_block(config, idx: int) -> DecoderBlock:
    attn = _attention(config, rope_interleave=bool(getattr(config, "rope_interleave", True)), indexer=None)
    return DecoderBlock(config.hidden_size, attn, _mlp(config, idx), config.rms_norm_eps)


def _v32_block(config, idx: int) -> DecoderBlock:
    indexer = SparseIndexer(
        hidden_size=config.hidden_size,
        q_lora_rank=config.q_lora_rank,
        n_heads=config.index_n_heads,
        head_dim=config.index_head_dim,
        rope_dim=config.qk_rope_head_dim,
        topk=config.index_topk,
    )
    attn = _attention(config, rope_interleave=True, indexer=indexer)
    return DecoderBlock(config.hidden_size, attn, _mlp(config, idx), config.rms_norm_eps)


_FP32 = ("e_score_correction_bias", "indexer.weights_proj.weight")
DEEPSEEK_V3 = register_family(ModelFamily("deepseek_v3", _v3_block, mla_rope_dim, fp32_suffixes=_FP32))
DEEPSEEK_V32 = register_family(ModelFamily("deepseek_v32", _v32_block, mla_rope_dim, fp32_suffixes=_FP32))
