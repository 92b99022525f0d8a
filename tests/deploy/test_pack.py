"""The deploy stage's packing of a weight: chunked export, compressed-tensors layout, equality with the frozen codes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from compressed_tensors.compressors.naive_quantized import NaiveQuantizationCompressor
from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from torch import nn

from cores.deploy.pack import (
    iter_weight_chunks,
    iter_weight_qparams,
    linear_qparams,
    weight_qparam_specs,
    weight_qparams,
)
from cores.quantization import (
    ActQuantizer,
    Granularity,
    QuantLinear,
    QuantScheme,
    QuantState,
    WeightQuantizer,
    Workspace,
    dequantize,
    fake_quantize,
    get_scheme,
    per_channel,
    per_group,
    per_tensor,
    scale_shape,
    to_groups,
    unpack_int4,
)

WEIGHT_CASES = [(8, per_channel()), (4, per_group(64)), (4, per_group(128)), (8, per_group(32))]


def _weight_quantizer(weight: torch.Tensor, bits: int, granularity: Granularity, lwc: bool,
                      **kwargs: bool) -> WeightQuantizer:
    quantizer = WeightQuantizer(weight.shape, bits, granularity, lwc=lwc, **kwargs)
    quantizer.set_state(QuantState.FAKE_QUANT)
    return quantizer


def _chunked(quantizer: WeightQuantizer, weight: torch.Tensor, chunk_elements: int,
             workspace: Workspace) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and scale of ``weight`` assembled from :func:`iter_weight_chunks`, checking the chunks cover the rows."""
    cols = weight.shape[-1]
    codes = torch.empty(weight.shape, dtype=torch.int8)
    scale = torch.empty(scale_shape(weight.shape, quantizer.granularity))
    rows = []
    for chunk in iter_weight_chunks(quantizer, weight, chunk_elements, workspace):
        codes.view(-1, cols)[chunk.rows] = chunk.codes
        scale.view(-1, 1)[chunk.scale_rows] = chunk.scale
        assert torch.equal(chunk.weight, weight.reshape(-1, cols)[chunk.rows].float())
        assert torch.equal(chunk.levels, chunk.codes.float())
        rows.append(chunk.rows)
    assert [r.start for r in rows] == [0, *(r.stop for r in rows[:-1])] and rows[-1].stop == weight.numel() // cols
    return codes, scale


PACK_CASES = [
    # bits, granularity, lwc, learn_rounding, fp8_scales
    (8, per_channel(), False, False, False),
    (8, per_channel(), True, False, False),
    (8, per_channel(), True, True, False),
    (8, per_group(32), True, False, False),
    (8, per_tensor(), False, False, False),
    (8, per_tensor(), True, True, False),
    (4, per_channel(), True, False, False),
    (4, per_group(64), False, False, False),
    (4, per_group(64), True, True, False),
    (4, per_group(64), True, False, True),
    (4, per_group(128), False, True, True),
    (4, per_tensor(), True, False, False),
]


@pytest.mark.parametrize("state", [QuantState.FAKE_QUANT, QuantState.FROZEN], ids=lambda s: s.value)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("bits", "granularity", "lwc", "rounding", "fp8"), PACK_CASES, ids=str)
def test_quantize_weight_is_the_chunked_export(bits: int, granularity: Granularity, lwc: bool, rounding: bool,
                                               fp8: bool, dtype: torch.dtype, state: QuantState) -> None:
    """The whole-weight codes of the frozen forward are the deploy stage's chunked ones, bit for bit, whatever the
    chunk size (chunks of one row, or of several that split a weight unevenly), with learned clips and rounding."""
    gen = torch.Generator().manual_seed(11)
    weight = torch.randn(2, 24, 256, generator=gen).to(dtype)
    quantizer = _weight_quantizer(weight, bits, granularity, lwc=lwc, learn_rounding=rounding, fp8_scales=fp8)
    with torch.no_grad():
        if lwc:
            quantizer.upbound_factor.uniform_(-2.0, 3.0, generator=gen)
            quantizer.lowbound_factor.uniform_(-2.0, 3.0, generator=gen)
        if rounding:
            quantizer.round_offset.uniform_(-0.6, 0.6, generator=gen)  # some beyond the clamp to [-0.5, 0.5]
    quantizer.set_state(state)
    codes, scale = quantizer.quantize_weight(weight)
    assert codes.dtype is torch.int8 and codes.shape == weight.shape
    assert scale.dtype is torch.float32 and scale.shape == scale_shape(weight.shape, granularity)
    workspace = Workspace()
    for chunk_elements in (1, 700, 4096, 1 << 20):
        chunked = _chunked(quantizer, weight, chunk_elements, workspace)
        assert torch.equal(chunked[0], codes) and torch.equal(chunked[1], scale)
    assert torch.equal(quantizer.dequantize_weight(codes, scale), quantizer(weight.float()))
    whole = weight_qparams(quantizer, weight)
    assert torch.equal(whole["weight_scale"], scale)
    stored = whole["weight"] if bits == 8 else unpack_int4(whole["weight_packed"], weight.shape)
    assert torch.equal(stored, codes)


def test_weight_export_matches_compressed_tensors_w8() -> None:
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(4))
    quantizer = _weight_quantizer(weight, 8, per_channel(), lwc=True)
    with torch.no_grad():
        quantizer.upbound_factor.uniform_(1.0, 3.0)
        quantizer.lowbound_factor.uniform_(1.0, 3.0)
    qparams = weight_qparams(quantizer, weight)
    assert set(qparams) == {"weight", "weight_scale"}
    scheme = QuantizationScheme(
        targets=["Linear"], weights=QuantizationArgs(num_bits=8, strategy="channel", symmetric=True)
    )
    to_compress = {"weight": weight, "weight_scale": qparams["weight_scale"]}
    compressed = NaiveQuantizationCompressor.compress(to_compress, scheme)
    assert torch.equal(compressed["weight"], qparams["weight"])
    restored = NaiveQuantizationCompressor.decompress(dict(qparams), scheme)["weight"]
    assert torch.equal(restored, quantizer(weight))


@pytest.mark.parametrize("group_size", [64, 128])
def test_weight_export_matches_compressed_tensors_w4(group_size: int) -> None:
    weight = torch.randn(64, 512, generator=torch.Generator().manual_seed(5))
    quantizer = _weight_quantizer(weight, 4, per_group(group_size), lwc=True)
    with torch.no_grad():
        quantizer.upbound_factor.uniform_(0.5, 3.0)
    qparams = weight_qparams(quantizer, weight)
    assert set(qparams) == {"weight_packed", "weight_scale", "weight_shape"}
    assert qparams["weight_packed"].shape == (64, 512 // 8)
    assert qparams["weight_scale"].shape == (64, 512 // group_size)
    assert qparams["weight_shape"].tolist() == [64, 512]
    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=4, strategy="group", group_size=group_size, symmetric=True),
    )
    to_compress = {"weight": weight, "weight_scale": qparams["weight_scale"]}
    compressed = PackedQuantizationCompressor.compress(to_compress, scheme)
    assert torch.equal(compressed["weight_packed"], qparams["weight_packed"])
    restored = PackedQuantizationCompressor.decompress(dict(qparams), scheme)["weight"]
    assert torch.equal(restored, quantizer(weight))


@pytest.mark.parametrize(("bits", "granularity"), [(8, per_channel()), (4, per_group(64))], ids=str)
def test_streamed_qparams_are_the_whole_ones_in_spec_order(bits: int, granularity: Granularity) -> None:
    weight = torch.randn(96, 256, generator=torch.Generator().manual_seed(8)).bfloat16()
    quantizer = _weight_quantizer(weight, bits, granularity, lwc=True)
    specs, whole = weight_qparam_specs(quantizer), weight_qparams(quantizer, weight)
    assert list(whole) == list(specs)
    assert all((v.dtype, tuple(v.shape)) == specs[k] for k, v in whole.items())
    streamed: dict[str, list[torch.Tensor]] = {}
    for name, tensor, chunk in iter_weight_qparams(quantizer, weight, Workspace()):
        assert (chunk is not None) == (name == next(iter(specs)))
        streamed.setdefault(name, []).append(tensor.clone())
    assert list(streamed) == list(specs)
    assert all(torch.equal(torch.cat(v).reshape(whole[k].shape), whole[k]) for k, v in streamed.items())


def test_pack_errors() -> None:
    with pytest.raises(ValueError, match="no deployed format"):
        weight_qparams(WeightQuantizer((8, 64), 6, per_channel()), torch.zeros(8, 64))
    with pytest.raises(ValueError, match="does not match quantizer shape"):
        next(iter_weight_chunks(WeightQuantizer((8, 64), 8, per_channel()), torch.zeros(8, 32)))


SCHEMES = [
    get_scheme("w8a8c8", act_mode="static"),
    get_scheme("w8a8c16", act_mode="dynamic"),
    get_scheme("w4a8c16", act_mode="static", group_size=64),
    get_scheme("w4a8c8", act_mode="dynamic"),
]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: f"{s.name}-{s.act_mode}")
def test_exported_tensors_reproduce_the_trained_forward(scheme: QuantScheme) -> None:
    """What deploy writes for a linear, dequantized as a serving engine does, gives the FAKE_QUANT output."""
    torch.manual_seed(0)
    x = torch.randn(4, 16, 256)
    qlinear = QuantLinear.from_scheme(nn.Linear(256, 96), scheme)
    qlinear.set_state(QuantState.CALIBRATE)
    qlinear(x)
    qlinear.set_state(QuantState.FAKE_QUANT)
    with torch.no_grad():
        for param in qlinear.learnable_parameters():
            param.uniform_(1.0, 4.0)
    expected = qlinear(x)
    qparams = linear_qparams(qlinear)
    if scheme.w_bits == 8:
        codes = qparams["weight"]
    else:
        codes = unpack_int4(qparams["weight_packed"], tuple(qparams["weight_shape"].tolist()))
    scale = qparams["weight_scale"].reshape(-1, 1)
    weight = dequantize(to_groups(codes, scheme.weight_granularity), scale, torch.zeros_like(scale))
    if scheme.act_mode == "static":
        input_scale = qparams["input_scale"]
        x_q = fake_quantize(x, input_scale, torch.zeros_like(input_scale), -128, 127)
    else:
        dynamic = ActQuantizer(8, "dynamic")
        dynamic.set_state(QuantState.FROZEN)
        x_q = dynamic(x)
    out = F.linear(x_q, weight.reshape(qlinear.weight.shape), qlinear.bias)
    assert torch.equal(out, expected)
    weight_keys = (
        {"weight", "weight_scale"} if scheme.w_bits == 8 else {"weight_packed", "weight_scale", "weight_shape"}
    )
    assert set(qparams) == weight_keys | ({"input_scale"} if scheme.act_mode == "static" else set())
