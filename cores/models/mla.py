"""Multi-head latent attention (MLA, DeepSeek-V2/V3) and the V3.2 sparse-attention indexer.

MLA compresses keys and values into one latent per token (``kv_lora_rank`` wide,
after ``kv_a_layernorm``) plus one rotary key shared by all heads
(``qk_rope_head_dim`` wide). That pair is what serving engines cache, so it is
what :attr:`MLAAttention.kv_cache_quant` sees; per-head keys and values are
expanded from it by ``kv_b_proj`` afterwards.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .layers import RMSNorm, apply_rotary, rope_parameters

LATENT_NORM_EPS = 1e-6
"""``q_a_layernorm`` / ``kv_a_layernorm`` use this eps whatever ``rms_norm_eps`` says (as DeepSeek does)."""


def apply_rotary_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on interleaved pairs ``(x0, x1), (x2, x3) ...``.

    Args:
        x: ``[..., seq, dim]``.
        cos: ``[seq, dim]`` table holding ``cat(freqs, freqs)``, as :func:`rotary_cos_sin` makes.
        sin: same for the sine.

    Returns:
        The rotated pairs, laid out ``[even | odd]`` (de-interleaved), as ``transformers`` does;
        queries and keys get the same layout, so their dot products are those of the pairs.
    """
    half = cos.shape[-1] // 2
    cos, sin = cos[..., :half], sin[..., :half]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature ``0.1 * mscale * ln(factor) + 1`` (1 when not extending)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def mla_softmax_scale(config) -> float:
    """``qk_head_dim ** -0.5``, times ``mscale_all_dim``'s YaRN temperature squared when the rope scales.

    DeepSeek puts the temperature that YaRN would apply to ``cos``/``sin`` into the
    softmax scale instead (the rope tables then carry ``mscale / mscale_all_dim``).
    """
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    params = rope_parameters(config)
    mscale_all_dim = params.get("mscale_all_dim") or 0
    if params.get("rope_type", "default") != "default" and mscale_all_dim:
        scale *= yarn_mscale(params["factor"], mscale_all_dim) ** 2
    return scale


class SparseIndexer(nn.Module):
    """DeepSeek-V3.2 lightning indexer: which ``topk`` earlier keys each query attends to.

    ``score[s, t] = sum_h w[s, h] * relu(q[s, h] . k[t]) / sqrt(head_dim * n_heads)``, with
    the rotary part first in each head (half-split rope, unlike MLA) and ``k`` after a
    LayerNorm. Sequences not longer than ``topk`` attend densely.

    Args:
        hidden_size: model width (``wk`` and ``weights_proj`` read the normed hidden state).
        q_lora_rank: width of the query latent that ``wq_b`` reads.
        n_heads: indexer heads.
        head_dim: indexer head width.
        rope_dim: rotary part of each indexer head.
        topk: keys kept per query.
    """

    QUERY_CHUNK = 512
    """Queries scored at once: bounds the ``[chunk, heads, seq]`` score tensor."""

    def __init__(self, hidden_size: int, q_lora_rank: int, n_heads: int, head_dim: int, rope_dim: int, topk: int):
        super().__init__()
        self.n_heads, self.head_dim, self.rope_dim, self.topk = n_heads, head_dim, rope_dim, topk
        self.wq_b = nn.Linear(q_lora_rank, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(hidden_size, head_dim, bias=False)
        self.k_norm = nn.LayerNorm(head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(hidden_size, n_heads, bias=False)

    def _rope_first(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot, rest = x.split([self.rope_dim, self.head_dim - self.rope_dim], dim=-1)
        return torch.cat((apply_rotary(rot, cos, sin), rest), dim=-1)

    def forward(self, x: torch.Tensor, q_latent: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Boolean mask ``[batch, 1, seq, seq]`` (True = attend): causal and among the query's top-k keys.

        Args:
            x: normed hidden state ``[batch, seq, hidden]``.
            q_latent: ``q_a_layernorm(q_a_proj(x))``, ``[batch, seq, q_lora_rank]``.
            cos: rotary table ``[seq, rope_dim]``.
            sin: same for the sine.
        """
        bsz, seq, _ = x.shape
        q = self.wq_b(q_latent).view(bsz, seq, self.n_heads, self.head_dim)
        q = self._rope_first(q, cos[:, None], sin[:, None]).float()
        k = self._rope_first(self.k_norm(self.wk(x)), cos, sin).float().transpose(-1, -2).unsqueeze(1)
        weights = self.weights_proj(x.to(self.weights_proj.weight.dtype)).float() * self.n_heads**-0.5
        pos = torch.arange(seq, device=x.device)
        causal = pos[:, None] >= pos[None, :]
        keep = torch.zeros(bsz, seq, seq, dtype=torch.bool, device=x.device)
        for lo in range(0, seq, self.QUERY_CHUNK):
            hi = min(lo + self.QUERY_CHUNK, seq)
            scores = F.relu(torch.matmul(q[:, lo:hi], k) * self.head_dim**-0.5)  # [b, chunk, heads, seq]
            index = torch.matmul(weights[:, lo:hi].unsqueeze(-2), scores).squeeze(-2)
            index = index.masked_fill(~causal[lo:hi], float("-inf"))
            keep[:, lo:hi].scatter_(-1, index.topk(self.topk, dim=-1).indices, True)
        return (keep & causal)[:, None]


class MLAAttention(nn.Module):
    """Multi-head latent attention, with or without a query latent (``q_lora_rank``).

    Each head's query and key are ``[nope | rope]``: the nope part of the key and the
    value come from the latent through ``kv_b_proj``, the rope part is one rotary key
    shared by all heads. ``kv_cache_quant`` is an identity until a KV quantizer takes
    its place; it sees ``cat(latent, rotary key)``, width ``kv_lora_rank + qk_rope_head_dim``.

    Args:
        hidden_size: model width.
        num_heads: attention heads.
        q_lora_rank: query latent width; None projects queries directly (``q_proj``).
        kv_lora_rank: key/value latent width.
        qk_nope_head_dim: per-head query/key width without rotary.
        qk_rope_head_dim: per-head rotary width.
        v_head_dim: per-head value width.
        softmax_scale: attention logit scale (see :func:`mla_softmax_scale`).
        rope_interleave: rotary on interleaved pairs (DeepSeek's layout) instead of half-split.
        bias: bias on ``q_a_proj``, ``kv_a_proj_with_mqa`` and ``o_proj`` (the config's ``attention_bias``).
        indexer: V3.2's sparse-attention indexer (needs ``q_lora_rank``); None attends densely.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        q_lora_rank: int | None,
        kv_lora_rank: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        softmax_scale: float,
        rope_interleave: bool = True,
        bias: bool = False,
        indexer: SparseIndexer | None = None,
    ):
        super().__init__()
        if indexer is not None and q_lora_rank is None:
            raise ValueError("the sparse-attention indexer reads the query latent: q_lora_rank must be set")
        self.num_heads, self.q_lora_rank, self.kv_lora_rank = num_heads, q_lora_rank, kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.softmax_scale, self.rope_interleave = softmax_scale, rope_interleave
        qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        if q_lora_rank is None:
            self.q_proj = nn.Linear(hidden_size, num_heads * qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden_size, q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(q_lora_rank, num_heads * qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden_size, kv_lora_rank + qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(kv_lora_rank, num_heads * (qk_nope_head_dim + v_head_dim), bias=False)
        self.o_proj = nn.Linear(num_heads * v_head_dim, hidden_size, bias=bias)
        if indexer is not None:
            self.indexer = indexer
        self.kv_cache_quant: nn.Module = nn.Identity()
        # linears that read the same input: engines fuse them and share one input scale
        first = "q_proj" if q_lora_rank is None else "q_a_proj"
        self.shared_input_groups = ((first, "kv_a_proj_with_mqa"),)
        if indexer is None:  # V3.2's indexer reads the input and the query latent too: no smoothing into them
            self.smoothable_input = (first, "kv_a_proj_with_mqa")
            self.smooth_norms = (("q_a_layernorm", ("q_b_proj",)),) if q_lora_rank is not None else ()

    def _rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return apply_rotary_interleaved(x, cos, sin) if self.rope_interleave else apply_rotary(x, cos, sin)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        bsz, seq, _ = x.shape
        if self.q_lora_rank is None:
            q_latent, q = None, self.q_proj(x)
        else:
            q_latent = self.q_a_layernorm(self.q_a_proj(x))
            q = self.q_b_proj(q_latent)
        q = q.view(bsz, seq, self.num_heads, -1).transpose(1, 2)
        q_nope, q_rot = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        latent, k_rot = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        cached = self.kv_cache_quant(torch.cat((self.kv_a_layernorm(latent), self._rotary(k_rot, cos, sin)), dim=-1))
        latent, k_rot = cached.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        kv = self.kv_b_proj(latent).view(bsz, seq, self.num_heads, -1).transpose(1, 2)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        q = torch.cat((q_nope, self._rotary(q_rot, cos, sin)), dim=-1)
        k = torch.cat((k_nope, k_rot[:, None].expand(-1, self.num_heads, -1, -1)), dim=-1)
        mask = None
        if hasattr(self, "indexer") and seq > self.indexer.topk:
            mask = self.indexer(x, q_latent, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.softmax_scale)
        return self.o_proj(out.transpose(1, 2).reshape(bsz, seq, -1))
