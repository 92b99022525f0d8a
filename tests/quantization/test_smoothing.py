"""Learned rounding offsets and smoothing scales: equivalence, initialisation, export."""

from __future__ import annotations

import pytest
import torch

from cores.quantization.block import init_smoothers, quant_state_dict, quantize_block, smoothers
from cores.models.layers import DecoderBlock, GQAAttention, SwiGLUMLP, rotary_cos_sin
from cores.quantization import (
    ROUND_OFFSET_DTYPE,
    QuantState,
    WeightQuantizer,
    get_scheme,
    per_channel,
    per_group,
    set_quant_state,
)
from cores.quantization.smoothing import Smoother

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, SEQ = 64, 4, 2, 16, 12


def _block(seed: int = 0, bias: bool = False) -> DecoderBlock:
    torch.manual_seed(seed)
    attn = GQAAttention(HIDDEN, HEADS, KV_HEADS, HEAD_DIM, qkv_bias=bias)
    block = DecoderBlock(HIDDEN, attn, SwiGLUMLP(HIDDEN, 96), 1e-6)
    with torch.no_grad():
        for norm in (block.input_layernorm, block.post_attention_layernorm):
            norm.weight.copy_((1 + 0.3 * torch.randn(HIDDEN)).bfloat16().float())
    return block.eval().requires_grad_(False)


def _rotary():
    inv_freq = 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
    return rotary_cos_sin(inv_freq, 1.0, SEQ, torch.float32, "cpu")


def test_every_declared_pair_gets_one_smoother_and_gqa_repeats_each_kv_channel() -> None:
    block = quantize_block(_block(), get_scheme("w8a8c16", act_mode="dynamic"), smooth=True)
    pairs = {id(s): [type(c).__name__ for c in consumers] for s, consumers in smoothers(block)}
    assert len(pairs) == 4  # input norm -> q/k/v, post-attention norm -> gate/up, v -> o, up -> down
    assert block.self_attn.o_proj.in_smooth is block.self_attn.v_proj.out_smooth
    assert all(block.self_attn.get_submodule(n).in_smooth is block.input_layernorm.smooth
               for n in ("q_proj", "k_proj", "v_proj"))
    v_smooth = block.self_attn.v_proj.out_smooth
    with torch.no_grad():
        v_smooth.log_scale.copy_(torch.arange(KV_HEADS * HEAD_DIM).float() / 100)
    cols = v_smooth.consumer_scale().view(KV_HEADS, HEADS // KV_HEADS, HEAD_DIM)
    assert torch.equal(cols[:, 0], cols[:, 1]) and cols.shape[0] * cols.shape[2] == v_smooth.channels
    names = quant_state_dict(block)
    assert "input_layernorm.smooth.log_scale" in names and "self_attn.v_proj.out_smooth.log_scale" in names
    assert not any(".in_smooth." in n for n in names)  # referenced, stored once by its producer


@pytest.mark.parametrize("bias", [False, True])
def test_smoothing_keeps_the_float_function(bias: bool) -> None:
    """With quantizers bypassed, any smoothing scales give the float block (up to the bf16 norm weights)."""
    block = _block(bias=bias)
    x = torch.randn(2, SEQ, HIDDEN)
    cos, sin = _rotary()
    ref = block(x, cos, sin)
    quantize_block(block, get_scheme("w8a8c16", act_mode="dynamic"), smooth=True)
    with torch.no_grad():
        for smoother, _ in smoothers(block):
            smoother.log_scale.copy_(0.5 * torch.randn(smoother.channels))
    set_quant_state(block, QuantState.CALIBRATE)  # float forward, smoothed weights
    out = block(x, cos, sin)
    assert not torch.equal(out, ref)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)


def test_smoothquant_init_takes_the_formula_and_keeps_dead_channels_at_one() -> None:
    smoother = Smoother(4)
    smoother.observe(torch.tensor([[4.0, 1.0, 0.0, 9.0]]))
    weight = torch.tensor([[1.0, 4.0, 2.0, 0.0], [-0.5, 1.0, 1.0, 0.0]])
    smoother.init_scale(0.5, [weight])
    expected = torch.tensor([(4 / 1) ** 0.5, (1 / 4) ** 0.5, 1.0, 1.0])
    torch.testing.assert_close(smoother.scale(), expected)
    smoother.observe(torch.tensor([[100.0, 100.0, 100.0, 100.0]]))  # stats are only taken before the init
    assert smoother.act_absmax.tolist() == [4.0, 1.0, 0.0, 9.0]
    smoother.init_scale(None, [weight])
    assert torch.equal(smoother.scale(), torch.ones(4))


def test_smoothing_search_lowers_the_static_activation_error() -> None:
    """A massive-activation channel: SmoothQuant at alpha 0.5 beats identity for static int8 inputs."""
    block = _block()
    x = torch.randn(4, SEQ, HIDDEN)
    x[..., 3] *= 80  # an outlier channel of the residual stream
    cos, sin = _rotary()
    ref = block(x, cos, sin)
    quantize_block(block, get_scheme("w8a8c16", act_mode="static"), smooth=True)
    losses = {}
    for alpha in (None, 0.5):
        set_quant_state(block, QuantState.CALIBRATE)
        if alpha is None:
            block(x, cos, sin)
        init_smoothers(block, alpha)
        for m in block.modules():
            if hasattr(m, "absmax") and m.absmax is not None:
                m.absmax.zero_()
        block(x, cos, sin)
        set_quant_state(block, QuantState.FROZEN)
        losses[alpha] = float((block(x, cos, sin) - ref).pow(2).mean())
    assert losses[0.5] < 0.5 * losses[None]


@pytest.mark.parametrize("bits,granularity", [(8, per_channel()), (4, per_group(32))])
def test_rounding_offsets_frozen_equal_export_and_zero_offsets_equal_rtn(bits, granularity) -> None:
    weight = torch.randn(48, 64)
    learned = WeightQuantizer(weight.shape, bits, granularity, lwc=True, learn_rounding=True)
    plain = WeightQuantizer(weight.shape, bits, granularity, lwc=True)
    for q in (learned, plain):
        q.set_state(QuantState.FROZEN)
    assert torch.equal(learned.fake_quant(weight), plain.fake_quant(weight))  # offsets start at 0: RTN
    with torch.no_grad():
        learned.round_offset.uniform_(-0.6, 0.6)
    codes, scale = learned.quantize_weight(weight)
    assert torch.equal(learned.fake_quant(weight), learned.dequantize_weight(codes, scale))
    assert not torch.equal(codes, plain.quantize_weight(weight)[0])
    stored = learned.round_offset.detach().to(ROUND_OFFSET_DTYPE).float().clamp(-0.5, 0.5)
    expected = (weight / scale.repeat_interleave(weight.numel() // scale.numel()).view_as(weight) + stored).round()
    assert torch.equal(codes.float(), expected.clamp(learned.qmin, learned.qmax))
