"""QuantLinear states (the PACKED one of deployed codes included) and in-place replacement."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cores.quantization import (
    QuantLinear,
    QuantScheme,
    QuantState,
    WeightQuantizer,
    get_scheme,
    per_group,
    quantize_linears,
    set_quant_state,
)

SCHEMES = [
    get_scheme("w8a8c8", act_mode="static"),
    get_scheme("w8a8c16", act_mode="dynamic"),
    get_scheme("w4a8c16", act_mode="static", group_size=64),
    get_scheme("w4a8c8", act_mode="dynamic"),
]


def _linear(in_features: int = 256, out_features: int = 96, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)


def _trained(scheme: QuantScheme, x: torch.Tensor, bias: bool = True) -> QuantLinear:
    """A QuantLinear calibrated on ``x`` with clipping moved off its initial value."""
    qlinear = QuantLinear.from_scheme(_linear(bias=bias).to(x.dtype), scheme)
    qlinear.set_state(QuantState.CALIBRATE)
    qlinear(x)
    qlinear.set_state(QuantState.FAKE_QUANT)
    with torch.no_grad():
        for param in qlinear.learnable_parameters():
            param.uniform_(1.0, 4.0)
    return qlinear


class _Expert(nn.Module):
    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _Attention(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.kv_b_proj = nn.Linear(hidden, hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o_proj(self.q_proj(x) * torch.sigmoid(self.kv_b_proj(x)))


class _MoE(nn.Module):
    def __init__(self, hidden: int, n_experts: int) -> None:
        super().__init__()
        self.gate = nn.Linear(hidden, n_experts, bias=False)
        self.experts = nn.ModuleList(_Expert(hidden, 2 * hidden) for _ in range(n_experts))
        self.shared_experts = _Expert(hidden, 2 * hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.gate(x), dim=-1)
        routed = sum(weights[..., i : i + 1] * expert(x) for i, expert in enumerate(self.experts))
        return routed + self.shared_experts(x)


class _Block(nn.Module):
    """A toy decoder block with the module names of the real families."""

    def __init__(self, hidden: int = 64, n_experts: int = 2) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(hidden)
        self.self_attn = _Attention(hidden)
        self.post_attention_layernorm = nn.LayerNorm(hidden)
        self.mlp = _MoE(hidden, n_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: f"{s.name}-{s.act_mode}")
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float_state_equals_nn_linear(scheme: QuantScheme, bias: bool, dtype: torch.dtype) -> None:
    linear = _linear(bias=bias).to(dtype)
    x = torch.randn(3, 5, 256).to(dtype)
    expected = linear(x)
    qlinear = QuantLinear.from_scheme(linear, scheme)
    assert qlinear.weight is linear.weight and qlinear.bias is linear.bias
    assert torch.equal(qlinear(x), expected)
    qlinear.set_state(QuantState.CALIBRATE)
    assert torch.equal(qlinear(x), expected)


def test_checkpoint_keys_still_load() -> None:
    linear = _linear()
    qlinear = QuantLinear.from_scheme(_linear(seed=1), get_scheme("w8a8c8", act_mode="static"))
    missing, unexpected = qlinear.load_state_dict(linear.state_dict(), strict=False)
    assert unexpected == [] and all("quantizer" in key for key in missing)
    assert torch.equal(qlinear.weight, linear.weight) and torch.equal(qlinear.bias, linear.bias)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: f"{s.name}-{s.act_mode}")
def test_fake_quant_composes_the_quantizers(scheme: QuantScheme) -> None:
    x = torch.randn(4, 16, 256).bfloat16()
    qlinear = _trained(scheme, x)
    out = qlinear(x)
    assert out.dtype is torch.bfloat16
    weight = qlinear.weight_quantizer(qlinear.weight.float())
    expected = F.linear(qlinear.input_quantizer(x.float()), weight, qlinear.bias.float()).bfloat16()
    assert torch.equal(out, expected)
    assert not torch.equal(out, F.linear(x, qlinear.weight.bfloat16(), qlinear.bias.bfloat16()))


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: f"{s.name}-{s.act_mode}")
@pytest.mark.parametrize("bias", [True, False])
def test_frozen_equals_fake_quant(scheme: QuantScheme, bias: bool) -> None:
    x = torch.randn(4, 16, 256)
    qlinear = _trained(scheme, x, bias=bias)
    expected = qlinear(x)
    qlinear.set_state(QuantState.FROZEN)
    out = qlinear(x.requires_grad_())
    assert torch.equal(out, expected)
    out.sum().backward()
    assert x.grad is not None and all(p.grad is None for p in qlinear.parameters())
    qlinear.set_state(QuantState.FAKE_QUANT)
    assert torch.equal(qlinear(x), expected)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: f"{s.name}-{s.act_mode}")
@pytest.mark.parametrize("bias", [True, False])
def test_packed_equals_frozen_without_the_float_weight(scheme: QuantScheme, bias: bool) -> None:
    """A layer given the deployed codes of a frozen one computes what the frozen one does, bit for bit, holds no
    float weight, and cannot leave PACKED (FROZEN leaves it PACKED)."""
    x = torch.randn(4, 16, 256)
    frozen = _trained(scheme, x, bias=bias)
    packed = copy.deepcopy(frozen)
    frozen.set_state(QuantState.FROZEN)
    expected = frozen(x)
    codes, scale = (t.clone() for t in frozen.weight_quantizer.quantize_weight(frozen.export_weight()))
    packed.load_packed(codes, scale)
    assert packed.state is QuantState.PACKED and packed.weight is None
    assert all(q.state is QuantState.PACKED for q in (packed.weight_quantizer, packed.input_quantizer))
    assert "weight" not in packed.state_dict() and not any("frozen" in k for k in packed.state_dict())
    out = packed(x.requires_grad_())
    assert torch.equal(out, expected)
    out.sum().backward()
    assert x.grad is not None and all(p.grad is None for p in packed.parameters())
    packed.set_state(QuantState.FROZEN)
    assert packed.state is packed.weight_quantizer.state is QuantState.PACKED and torch.equal(packed(x), expected)
    for state in (QuantState.FLOAT, QuantState.CALIBRATE, QuantState.FAKE_QUANT):
        with pytest.raises(RuntimeError, match="is PACKED"):
            packed.set_state(state)
        with pytest.raises(RuntimeError, match="is PACKED"):
            packed.weight_quantizer.set_state(state)
    with pytest.raises(RuntimeError, match="holds no float weight"):
        packed.export_weight()
    with pytest.raises(ValueError, match="through load_packed"):
        frozen.set_state(QuantState.PACKED)
    with pytest.raises(ValueError, match="packed codes must be int8"):
        frozen.load_packed(codes.float(), scale)
    with pytest.raises(ValueError, match="packed scale must hold"):
        frozen.load_packed(codes, scale[:-1])
    assert frozen.state is QuantState.FROZEN and frozen.weight is not None


@pytest.mark.parametrize("scheme", [SCHEMES[1], SCHEMES[3]], ids=lambda s: f"{s.name}-{s.act_mode}")
def test_packed_layer_built_on_the_meta_device(scheme: QuantScheme) -> None:
    """A layer built on the meta device (as a deployed block is) takes real codes: no float weight is ever made."""
    x = torch.randn(4, 16, 256)
    frozen = _trained(scheme, x)
    frozen.set_state(QuantState.FROZEN)
    with torch.device("meta"):
        packed = QuantLinear.from_scheme(nn.Linear(256, 96), scheme, lwc=False, lac=False)
    packed.bias = nn.Parameter(frozen.bias.detach().clone())
    packed.load_packed(frozen._frozen_codes.clone(), frozen._frozen_scale.clone())
    assert packed.weight is None
    assert torch.equal(packed(x), frozen(x))


def test_set_quant_state_leaves_packed_layers_packed() -> None:
    torch.manual_seed(0)
    block = _Block()
    x = torch.randn(2, 8, 64)
    replaced = quantize_linears(block, get_scheme("w8a8c8", act_mode="static"))
    set_quant_state(block, QuantState.CALIBRATE)
    block(x)
    set_quant_state(block, QuantState.FROZEN)
    expected = block(x)
    packed = replaced["self_attn.q_proj"]
    packed.load_packed(packed._frozen_codes.clone(), packed._frozen_scale.clone())
    set_quant_state(block, QuantState.FROZEN)
    assert packed.state is packed.input_quantizer.state is QuantState.PACKED and packed.weight is None
    assert all(q.state is QuantState.FROZEN for name, q in replaced.items() if name != "self_attn.q_proj")
    assert torch.equal(block(x), expected)
    with pytest.raises(RuntimeError, match="is PACKED"):
        set_quant_state(block, QuantState.FLOAT)


def test_learnable_parameters_are_only_the_clips() -> None:
    qlinear = QuantLinear.from_scheme(_linear(), get_scheme("w4a8c8", act_mode="static", group_size=64))
    names = {name for name, p in qlinear.named_parameters() if any(p is q for q in qlinear.learnable_parameters())}
    assert names == {
        "weight_quantizer.upbound_factor",
        "weight_quantizer.lowbound_factor",
        "input_quantizer.clip_factor",
    }
    plain = QuantLinear.from_scheme(_linear(), get_scheme("w8a8c8", act_mode="static"), lwc=False, lac=False)
    assert plain.learnable_parameters() == []
    assert QuantLinear.from_scheme(_linear(), get_scheme("w8a8c8", act_mode="dynamic")).input_quantizer.lac is False


def test_gradients_reach_lwc_and_lac_through_the_layer() -> None:
    x = torch.randn(4, 16, 256)
    qlinear = QuantLinear.from_scheme(_linear(), get_scheme("w4a8c8", act_mode="static", group_size=64))
    qlinear.set_state(QuantState.CALIBRATE)
    reference = qlinear(x)
    qlinear.set_state(QuantState.FAKE_QUANT)
    qlinear.weight.requires_grad_(False)
    qlinear.bias.requires_grad_(False)
    ((qlinear(x) - reference) ** 2).mean().backward()
    for param in qlinear.learnable_parameters():
        assert torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0


def test_quant_linear_rejects_mismatched_quantizer() -> None:
    with pytest.raises(ValueError, match="does not match weight"):
        QuantLinear(_linear(), WeightQuantizer((8, 8), 8, per_group(8)))


def test_quantize_linears_respects_ignore_patterns() -> None:
    torch.manual_seed(0)
    block = _Block()
    x = torch.randn(2, 8, 64)
    expected = block(x)
    replaced = quantize_linears(block, get_scheme("w8a8c8", act_mode="static"))
    assert set(replaced) == {
        "self_attn.q_proj",
        "self_attn.o_proj",
        *(
            f"mlp.{expert}.{proj}"
            for expert in ("experts.0", "experts.1", "shared_experts")
            for proj in ("gate_proj", "up_proj", "down_proj")
        ),
    }
    assert type(block.mlp.gate) is nn.Linear
    assert type(block.self_attn.kv_b_proj) is nn.Linear  # DeepSeek's recipe keeps the MLA up-projection
    assert block.mlp.experts[1].down_proj is replaced["mlp.experts.1.down_proj"]
    assert torch.equal(block(x), expected)
    assert quantize_linears(block, get_scheme("w8a8c8", act_mode="static")) == {}

    other = _Block()
    replaced = quantize_linears(other, get_scheme("w8a8c8", act_mode="static"),
                                ignore=[r"re:.*kv_b_proj$", "mlp.experts.*", "mlp.gate"])
    assert set(replaced) == {
        "self_attn.q_proj",
        "self_attn.o_proj",
        "mlp.shared_experts.gate_proj",
        "mlp.shared_experts.up_proj",
        "mlp.shared_experts.down_proj",
    }


def test_quantize_linears_names_the_layer_when_the_group_does_not_fit() -> None:
    block = _Block(hidden=64)
    with pytest.raises(ValueError, match=r"'self_attn.q_proj'.*group size 128 does not divide the input dim 64"):
        quantize_linears(block, get_scheme("w4a8c8", act_mode="static"))
    w4 = get_scheme("w4a8c8", act_mode="static", group_size=32)
    assert len(quantize_linears(_Block(), w4)) == 11  # all but kv_b_proj


def test_set_quant_state_drives_the_lifecycle() -> None:
    torch.manual_seed(0)
    block = _Block()
    x = torch.randn(2, 8, 64)
    expected = block(x)
    replaced = quantize_linears(block, get_scheme("w8a8c8", act_mode="static"))
    with pytest.raises(RuntimeError, match="no range observed"):
        set_quant_state(block, QuantState.FAKE_QUANT)
    set_quant_state(block, QuantState.CALIBRATE)
    assert torch.equal(block(x), expected)
    set_quant_state(block, QuantState.FAKE_QUANT)
    for qlinear in replaced.values():
        assert qlinear.state is qlinear.input_quantizer.state is QuantState.FAKE_QUANT
    fake = block(x)
    assert not torch.equal(fake, expected) and (fake - expected).abs().max() < 0.1
    set_quant_state(block, QuantState.FROZEN)
    assert torch.equal(block(x), fake)
    set_quant_state(block, QuantState.FLOAT)
    assert torch.equal(block(x), expected)
    assert all(q._frozen_codes is None for q in replaced.values())


def test_quantize_linears_matches_full_names_under_prefix() -> None:
    """A compressed-tensors ``ignore`` entry names one module in full: it holds in that block only."""
    ignore = ["model.layers.3.self_attn.q_proj", r"re:model\.layers\.3\.mlp\.experts\.0\..*"]
    there = quantize_linears(_Block(), get_scheme("w8a8c8", act_mode="static"), ignore=ignore, prefix="model.layers.3.")
    elsewhere = quantize_linears(_Block(), get_scheme("w8a8c8", act_mode="static"), ignore=ignore,
                                 prefix="model.layers.2.")
    assert set(elsewhere) - set(there) == {"self_attn.q_proj", *(f"mlp.experts.0.{p}" for p in
                                                                 ("gate_proj", "up_proj", "down_proj"))}
    assert set(quantize_linears(_Block(), get_scheme("w8a8c8", act_mode="static"), ignore=ignore)) == set(elsewhere)
