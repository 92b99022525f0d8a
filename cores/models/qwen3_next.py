"""Qwen3-Next: gated DeltaNet linear attention interleaved with gated full attention, MoE with a gated shared expert.

``config.layer_types[i]`` picks block ``i``'s token mixer: ``linear_attention`` is a
:class:`GatedDeltaNet` (``linear_attn.*``), ``full_attention`` a :class:`GatedAttention`
(``self_attn.*``). The MLP is an MoE (softmax top-k router, per-expert SwiGLU linears as on
disk, one shared expert scaled by ``sigmoid(shared_expert_gate(x))``) unless the block is in
``mlp_only_layers`` or off the ``decoder_sparse_step``. Every RMSNorm outside the DeltaNet
stores ``weight - 1`` (:class:`OffsetRMSNorm`).

Qwen3.5 (``qwen3_5``: dense SwiGLU MLP in every block; ``qwen3_5_moe``: the MoE in every
block, top-k always renormalised) is the same decoder with one linear per DeltaNet projection
(:class:`SplitGatedDeltaNet`) inside a vision-language checkpoint (:func:`~.qwen3_vl.vl_family`).

The linear-attention recurrence and its causal depthwise convolution are the torch reference
functions that ship with ``transformers`` (``torch_chunk_gated_delta_rule``,
``causal_conv1d_fn``): they are what the reference model runs, they are differentiable, and
a block sees whole sequences, so no cache or single-step kernel is needed.

Quantized by default: ``in_proj_qkvz``, ``in_proj_ba`` (Qwen3.5: ``in_proj_qkv/z/b/a``),
``out_proj``, q/k/v/o and the expert linears (vLLM quantizes all of them; ``in_proj_ba`` is
small: ``ignore`` it by name to keep it in BF16). Kept in high precision: the router
``mlp.gate`` and ``mlp.shared_expert_gate`` (both modules of their own with a 2-D weight, so
the quantizer never swaps them and deploy lists them in ``ignore``, as vLLM loads them
unquantized), the ``conv1d`` (not a linear), ``A_log``, ``dt_bias`` and every norm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.qwen3_next.modeling_qwen3_next import causal_conv1d_fn, torch_chunk_gated_delta_rule

from ..quantization.smoothing import round_to_dtype_ste
from .dense import gqa_head_dim
from .layers import GQAAttention, RMSNorm, SwiGLUMLP, apply_rotary
from .moe import MoE, SoftmaxTopKRouter
from .qwen3_vl import vl_family
from .registry import ModelFamily, register_family


class OffsetRMSNorm(RMSNorm):
    """RMSNorm whose stored ``weight`` is the scale minus one: ``(norm(x) * (1 + weight)).to(x.dtype)``, all in fp32.

    A smoother divides the scale ``1 + weight``; :meth:`smoothed_weight` returns the stored form of the result,
    ``(1 + weight) / s - 1``, rounded to the dtype deploy stores it in, so the forward is the deployed one.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__(dim, eps)
        nn.init.zeros_(self.weight)

    def smoothed_weight(self, export: bool = False) -> torch.Tensor:
        if self.smooth is None or not (export or self.smooth.active):
            return self.weight
        stored = (1.0 + self.weight.float()) / self.smooth.scale() - 1.0
        return round_to_dtype_ste(stored, self.smooth.dtype).to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.smoothed_weight().float())).type_as(x)


class GatedRMSNorm(nn.Module):
    """Per-head RMSNorm of the DeltaNet output, times ``silu(gate)`` (computed in fp32)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        h = self.weight * h.to(dtype)
        return (h * F.silu(gate.float())).to(dtype)


def apply_partial_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` channels of ``x`` ``[batch, heads, seq, dim]``; pass the rest."""
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return apply_rotary(x, cos, sin)
    return torch.cat((apply_rotary(x[..., :rot], cos, sin), x[..., rot:]), dim=-1)


class GatedAttention(GQAAttention):
    """GQA attention whose ``q_proj`` also yields a per-channel output gate: ``o_proj(attn * sigmoid(gate))``.

    ``q_proj`` rows are ``[query | gate]`` per head; q/k get an :class:`OffsetRMSNorm` per head
    and rotary on their first ``cos.shape[-1]`` channels (partial rotary). The gate is an
    elementwise scale of each value channel, so smoothing ``v_proj`` into ``o_proj`` stays exact.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, bias: bool,
                 norm_eps: float):
        super().__init__(hidden_size, num_heads, num_kv_heads, head_dim, qkv_bias=bias, o_bias=bias)
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim * 2, bias=bias)
        self.q_norm = OffsetRMSNorm(head_dim, norm_eps)
        self.k_norm = OffsetRMSNorm(head_dim, norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        bsz, seq, _ = x.shape
        q, gate = self.q_proj(x).view(bsz, seq, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)
        gate = gate.reshape(bsz, seq, -1)
        q = self.q_norm(q).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(bsz, seq, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(bsz, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_partial_rotary(q, cos, sin), apply_partial_rotary(k, cos, sin)
        k, v = self.k_cache_quant(k), self.v_cache_quant(v)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.num_kv_heads != self.num_heads)
        out = out.transpose(1, 2).reshape(bsz, seq, -1)
        return self.o_proj(out * torch.sigmoid(gate))


class GatedDeltaNet(nn.Module):
    """Gated DeltaNet token mixer (Qwen3-Next ``linear_attn``), named as on disk.

    ``in_proj_qkvz`` gives, per key head group, ``[q | k | v | z]``; ``in_proj_ba`` gives
    ``[b | a]``. q/k/v go through a causal depthwise ``conv1d`` + SiLU, then the chunked gated
    delta rule with ``beta = sigmoid(b)`` and decay ``g = -exp(A_log) * softplus(a + dt_bias)``;
    its output is normalised per head and gated by ``silu(z)`` before ``out_proj``.
    """

    shared_input_groups = (("in_proj_qkvz", "in_proj_ba"),)
    smoothable_input = ("in_proj_qkvz", "in_proj_ba")

    def __init__(self, hidden_size: int, num_k_heads: int, num_v_heads: int, head_k_dim: int, head_v_dim: int,
                 conv_kernel: int, norm_eps: float):
        super().__init__()
        if num_v_heads % num_k_heads:
            raise ValueError(f"linear_num_value_heads {num_v_heads} is not a multiple of linear_num_key_heads "
                             f"{num_k_heads}")
        self.num_k_heads, self.num_v_heads, self.head_k_dim, self.head_v_dim = (
            num_k_heads, num_v_heads, head_k_dim, head_v_dim)
        self.key_dim, self.value_dim = num_k_heads * head_k_dim, num_v_heads * head_v_dim
        conv_dim = 2 * self.key_dim + self.value_dim
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, conv_kernel, groups=conv_dim, padding=conv_kernel - 1, bias=False)
        self.in_proj_qkvz = nn.Linear(hidden_size, 2 * self.key_dim + 2 * self.value_dim, bias=False)
        self.in_proj_ba = nn.Linear(hidden_size, 2 * num_v_heads, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(num_v_heads))
        self.A_log = nn.Parameter(torch.zeros(num_v_heads))
        self.norm = GatedRMSNorm(head_v_dim, norm_eps)
        self.out_proj = nn.Linear(self.value_dim, hidden_size, bias=False)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(qkv, z, b, a)`` of ``x`` ``[B, S, hidden]``: qkv ``[B, S, 2 key_dim + value_dim]`` as ``[q | k | v]``,
        z ``[B, S, v_heads, head_v_dim]``, b/a ``[B, S, v_heads]``."""
        bsz, seq, _ = x.shape
        per_group = self.num_v_heads // self.num_k_heads
        qkvz = self.in_proj_qkvz(x).view(bsz, seq, self.num_k_heads, -1)
        q, k, v, z = qkvz.split([self.head_k_dim, self.head_k_dim, per_group * self.head_v_dim,
                                 per_group * self.head_v_dim], dim=-1)
        b, a = self.in_proj_ba(x).view(bsz, seq, self.num_k_heads, -1).split([per_group, per_group], dim=-1)
        qkv = torch.cat([t.reshape(bsz, seq, -1) for t in (q, k, v)], dim=-1)
        heads = (bsz, seq, self.num_v_heads)
        return qkv, z.reshape(*heads, self.head_v_dim), b.reshape(heads), a.reshape(heads)

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None
                ) -> torch.Tensor:
        bsz, seq, _ = x.shape
        qkv, z, b, a = self.project(x)
        qkv = causal_conv1d_fn(qkv.transpose(1, 2), self.conv1d.weight.squeeze(1), self.conv1d.bias,
                               activation="silu")
        q, k, v = qkv.transpose(1, 2).split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q = q.reshape(bsz, seq, self.num_k_heads, self.head_k_dim)
        k = k.reshape(bsz, seq, self.num_k_heads, self.head_k_dim)
        v = v.reshape(bsz, seq, self.num_v_heads, self.head_v_dim)
        beta = b.sigmoid()
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)
        out, _ = torch_chunk_gated_delta_rule(q, k, v, g=g, beta=beta, use_qk_l2norm_in_kernel=True)
        out = self.norm(out.reshape(-1, self.head_v_dim), z.reshape(-1, self.head_v_dim))
        return self.out_proj(out.reshape(bsz, seq, -1))


class SplitGatedDeltaNet(GatedDeltaNet):
    """Qwen3.5's :class:`GatedDeltaNet`: one linear per projection, ``in_proj_qkv`` ``[q | k | v]`` (not grouped
    per key head), ``in_proj_z``, ``in_proj_b``, ``in_proj_a``."""

    shared_input_groups = (("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"),)
    smoothable_input = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")

    def __init__(self, hidden_size: int, num_k_heads: int, num_v_heads: int, head_k_dim: int, head_v_dim: int,
                 conv_kernel: int, norm_eps: float):
        super().__init__(hidden_size, num_k_heads, num_v_heads, head_k_dim, head_v_dim, conv_kernel, norm_eps)
        del self.in_proj_qkvz, self.in_proj_ba
        self.in_proj_qkv = nn.Linear(hidden_size, 2 * self.key_dim + self.value_dim, bias=False)
        self.in_proj_z = nn.Linear(hidden_size, self.value_dim, bias=False)
        self.in_proj_b = nn.Linear(hidden_size, num_v_heads, bias=False)
        self.in_proj_a = nn.Linear(hidden_size, num_v_heads, bias=False)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        bsz, seq, _ = x.shape
        return (self.in_proj_qkv(x), self.in_proj_z(x).view(bsz, seq, self.num_v_heads, self.head_v_dim),
                self.in_proj_b(x), self.in_proj_a(x))


class SharedExpertGate(nn.Module):
    """``sigmoid(x @ weight.T)``, ``weight`` ``[1, hidden]``: the scale of the shared expert (kept unquantized)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1, hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(F.linear(x, self.weight))


class GatedSharedExpertMoE(MoE):
    """Routed experts (:class:`MoE`) plus ``sigmoid(shared_expert_gate(x)) * shared_expert(x)``."""

    def __init__(self, gate: nn.Module, hidden_size: int, intermediate_size: int, num_experts: int,
                 shared_intermediate_size: int):
        super().__init__(gate, hidden_size, intermediate_size, num_experts)
        self.shared_expert = SwiGLUMLP(hidden_size, shared_intermediate_size)
        self.shared_expert_gate = SharedExpertGate(hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.shared_expert_gate(x) * self.shared_expert(x)


class HybridBlock(nn.Module):
    """Pre-norm residual block whose token mixer is named by its kind (``self_attn`` or ``linear_attn``)."""

    def __init__(self, hidden_size: int, mixer_name: str, mixer: nn.Module, mlp: nn.Module, norm_eps: float,
                 norm: type[nn.Module] = OffsetRMSNorm):
        super().__init__()
        self.mixer_name = mixer_name
        self.input_layernorm = norm(hidden_size, norm_eps)
        setattr(self, mixer_name, mixer)
        self.post_attention_layernorm = norm(hidden_size, norm_eps)
        self.mlp = mlp
        self.smooth_norms = tuple(
            (norm_name, tuple(f"{child}.{name}" for name in getattr(getattr(self, child), "smoothable_input", ())))
            for norm_name, child in (("input_layernorm", mixer_name), ("post_attention_layernorm", "mlp"))
            if getattr(getattr(self, child), "smoothable_input", ())
        )

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + getattr(self, self.mixer_name)(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


def rotary_dim(config) -> int:
    """The rotated channels per head: ``head_dim * partial_rotary_factor``."""
    params = getattr(config, "rope_parameters", None) or {}
    factor = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    return int(gqa_head_dim(config) * factor)


def _is_moe_layer(config, idx: int) -> bool:
    return (idx not in (config.mlp_only_layers or ()) and config.num_experts > 0
            and (idx + 1) % config.decoder_sparse_step == 0)


def shared_expert_moe(config, norm_topk_prob: bool) -> GatedSharedExpertMoE:
    """The MoE of a Qwen3-Next / Qwen3.5-MoE config."""
    router = SoftmaxTopKRouter(config.hidden_size, config.num_experts, config.num_experts_per_tok, norm_topk_prob)
    return GatedSharedExpertMoE(router, config.hidden_size, config.moe_intermediate_size, config.num_experts,
                                config.shared_expert_intermediate_size)


def _mlp(config, idx: int) -> nn.Module:
    if not _is_moe_layer(config, idx):
        return SwiGLUMLP(config.hidden_size, config.intermediate_size)
    return shared_expert_moe(config, config.norm_topk_prob)


def token_mixer(config, idx: int, deltanet: type[GatedDeltaNet] = GatedDeltaNet) -> tuple[str, nn.Module]:
    """``(name, module)`` of block ``idx``'s token mixer, from ``config.layer_types``."""
    kind = config.layer_types[idx]
    if kind == "linear_attention":
        return "linear_attn", deltanet(
            config.hidden_size, config.linear_num_key_heads, config.linear_num_value_heads,
            config.linear_key_head_dim, config.linear_value_head_dim, config.linear_conv_kernel_dim,
            config.rms_norm_eps)
    if kind == "full_attention":
        return "self_attn", GatedAttention(
            config.hidden_size, config.num_attention_heads, config.num_key_value_heads, gqa_head_dim(config),
            bool(getattr(config, "attention_bias", False)), config.rms_norm_eps)
    raise ValueError(f"layer {idx}: unknown layer type {kind!r}; expected linear_attention or full_attention")


def _qwen3_next_block(config, idx: int) -> HybridBlock:
    name, mixer = token_mixer(config, idx)
    return HybridBlock(config.hidden_size, name, mixer, _mlp(config, idx), config.rms_norm_eps)


def _qwen3_5_block(config, idx: int) -> HybridBlock:
    name, mixer = token_mixer(config, idx, SplitGatedDeltaNet)
    return HybridBlock(config.hidden_size, name, mixer, SwiGLUMLP(config.hidden_size, config.intermediate_size),
                       config.rms_norm_eps)


def _qwen3_5_moe_block(config, idx: int) -> HybridBlock:
    name, mixer = token_mixer(config, idx, SplitGatedDeltaNet)
    return HybridBlock(config.hidden_size, name, mixer, shared_expert_moe(config, norm_topk_prob=True),
                       config.rms_norm_eps)


QWEN3_NEXT = register_family(ModelFamily("qwen3_next", _qwen3_next_block, rotary_dim, norm=OffsetRMSNorm))
# Qwen3.5 checkpoints are vision-language ones: the decoder under model.language_model.*, model.visual.* beside it
QWEN3_5 = register_family(vl_family("qwen3_5", _qwen3_5_block, rotary_dim, norm=OffsetRMSNorm))
QWEN3_5_MOE = register_family(vl_family("qwen3_5_moe", _qwen3_5_moe_block, rotary_dim, norm=OffsetRMSNorm))
