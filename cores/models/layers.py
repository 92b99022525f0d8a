"""Shared transformer parts, each written once; families compose them.

Parameter names equal the Hugging Face checkpoint names, so loading a block is
reading its keys. Attention takes precomputed ``(cos, sin)`` so rotary tables are
built once per run, not once per block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS



class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32, as the reference implementations do.

    ``smooth`` (a :class:`~cores.quantization.smoothing.Smoother`, set by the quantizing
    transform) divides the weight per channel, rounded to the dtype deploy stores it in.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.smooth: nn.Module | None = None

    def smoothed_weight(self, export: bool = False) -> torch.Tensor:
        """The weight of the forward: ``weight / s`` (rounded as stored) with an active smoother (or for
        ``export``), else ``weight``."""
        if self.smooth is None or not (export or self.smooth.active):
            return self.weight
        return self.smooth.divide(self.weight).to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.smoothed_weight() * x.to(dtype)


def rope_parameters(config) -> dict:
    """The rope parameter dict of a config (transformers v5 ``rope_parameters``)."""
    params = getattr(config, "rope_parameters", None)
    if params is None:
        params = {"rope_type": "default", "rope_theta": getattr(config, "rope_theta", 10000.0)}
    return params


def rotary_inv_freq(config, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling of the config's rope variant.

    Uses the rope initialisers that ship with ``transformers`` (default, linear,
    dynamic, yarn, longrope, llama3) so every scaling type matches the reference.
    """
    params = rope_parameters(config)
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = params["rope_theta"]
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        return inv_freq, 1.0
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unsupported rope_type {rope_type!r}; known: default, {', '.join(ROPE_INIT_FUNCTIONS)}")
    if rope_type == "dynamic":
        raise ValueError("rope_type 'dynamic' rescales with the sequence length and is not supported")
    return ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")


def rotary_cos_sin(
    inv_freq: torch.Tensor, scaling: float, seq_len: int, dtype: torch.dtype, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``/``sin`` tables ``[seq_len, head_dim]`` for positions ``0..seq_len-1``."""
    pos = torch.arange(seq_len, dtype=torch.float)
    freqs = pos[:, None] * inv_freq.float()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(device, dtype), (emb.sin() * scaling).to(device, dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` of shape ``[batch, heads, seq, dim]`` by tables ``[seq, dim]``."""
    return x * cos + rotate_half(x) * sin


def causal_mask(seq_len: int, window: int | None, device) -> torch.Tensor | None:
    """Boolean attention mask (True = attend) for sliding windows; None for plain causal."""
    if window is None or window >= seq_len:
        return None
    i = torch.arange(seq_len, device=device)
    dist = i[:, None] - i[None, :]
    return (dist >= 0) & (dist < window)


class GQAAttention(nn.Module):
    """Grouped-query attention with optional qkv/o bias and per-head q/k RMSNorm.

    ``k_cache_quant`` / ``v_cache_quant`` act on exactly what a serving engine
    caches (keys after rotary, values); they are identities until a KV quantizer
    is put in their place.
    """

    # linears that read the same input: engines fuse them and share one input scale
    shared_input_groups = (("q_proj", "k_proj", "v_proj"),)
    smoothable_input = ("q_proj", "k_proj", "v_proj")  # the only readers of the input: a norm before may smooth

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        qkv_bias: bool = False,
        o_bias: bool = False,
        qk_norm: bool = False,
        norm_eps: float = 1e-6,
        sliding_window: int | None = None,
    ):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.sliding_window = sliding_window
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=o_bias)
        if qk_norm:
            self.q_norm = RMSNorm(head_dim, norm_eps)
            self.k_norm = RMSNorm(head_dim, norm_eps)
        self.k_cache_quant: nn.Module = nn.Identity()
        self.v_cache_quant: nn.Module = nn.Identity()
        # (producer, consumer, repeat, head_dim): v channels smoothed into o_proj, once per query head
        self.smooth_pairs = (("v_proj", "o_proj", num_heads // num_kv_heads, head_dim),)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        bsz, seq, _ = x.shape
        q = self.q_proj(x).view(bsz, seq, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(bsz, seq, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(bsz, seq, self.num_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        k, v = self.k_cache_quant(k), self.v_cache_quant(v)
        mask = causal_mask(seq, self.sliding_window, x.device)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=self.num_kv_heads != self.num_heads
        )
        return self.o_proj(out.transpose(1, 2).reshape(bsz, seq, -1))


class SwiGLUMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))``."""

    shared_input_groups = (("gate_proj", "up_proj"),)
    smoothable_input = ("gate_proj", "up_proj")
    smooth_pairs = (("up_proj", "down_proj", 1, None),)

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderBlock(nn.Module):
    """Pre-norm residual block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, hidden_size: int, self_attn: nn.Module, mlp: nn.Module, norm_eps: float):
        super().__init__()
        self.input_layernorm = RMSNorm(hidden_size, norm_eps)
        self.self_attn = self_attn
        self.post_attention_layernorm = RMSNorm(hidden_size, norm_eps)
        self.mlp = mlp
        # (norm, the linears that are the only readers of its output): smoothing pairs of the quantizing transform
        self.smooth_norms = tuple(
            (norm, tuple(f"{child}.{name}" for name in getattr(getattr(self, child), "smoothable_input", ())))
            for norm, child in (("input_layernorm", "self_attn"), ("post_attention_layernorm", "mlp"))
            if getattr(getattr(self, child), "smoothable_input", ())
        )

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))
