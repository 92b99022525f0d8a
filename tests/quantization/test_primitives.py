"""Property checks for the pure quantization math."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

from cores.quantization import (
    FP8_E4M3_MAX,
    SCALE_EPS,
    Granularity,
    GranularityKind,
    Workspace,
    block_size,
    compute_scale_zp,
    dequantize,
    fake_quantize,
    fake_quantize_fp8,
    group_range,
    int_range,
    pack_int4,
    per_channel,
    per_group,
    per_tensor,
    per_token,
    quantize,
    round_ste,
    scale_shape,
    sigmoid_clip,
    sqnr_db,
    to_groups,
    unpack_int4,
)

GRANULARITIES = [per_channel(), per_group(16), per_group(32), per_token(), per_tensor()]
SHAPES = [(8, 64), (3, 5, 32), (1, 96)]


def _qparams(
    x: torch.Tensor, granularity: Granularity, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = group_range(x, granularity)
    return compute_scale_zp(lo, hi, bits, symmetric=symmetric)


def test_granularity_is_validated() -> None:
    with pytest.raises(ValueError, match="positive group_size"):
        per_group(0)
    with pytest.raises(ValueError, match="group granularity only"):
        Granularity(GranularityKind.TOKEN, 8)
    assert str(per_group(64)) == "group64" and str(per_channel()) == "channel"


def test_scale_shapes_follow_compressed_tensors() -> None:
    assert scale_shape((256, 1024), per_channel()) == (256, 1)
    assert scale_shape((256, 1024), per_group(128)) == (256, 8)
    assert scale_shape((2, 7, 1024), per_token()) == (2, 7, 1)
    assert scale_shape((256, 1024), per_tensor()) == (1,)
    assert block_size((256, 1024), per_tensor()) == 256 * 1024


def test_group_size_must_divide_input_dim() -> None:
    with pytest.raises(ValueError, match=r"group size 128 does not divide the input dim 576"):
        to_groups(torch.zeros(1536, 576), per_group(128))
    assert to_groups(torch.zeros(1536, 576), per_group(64)).shape == (1536 * 9, 64)


@pytest.mark.parametrize("bits", [4, 8])
def test_int_range(bits: int) -> None:
    assert int_range(bits) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    with pytest.raises(ValueError, match=r"2\.\.8 bits"):
        int_range(9)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("granularity", GRANULARITIES, ids=str)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_round_trip_error_is_at_most_half_a_step(
    seed: int, shape: tuple[int, ...], granularity: Granularity, bits: int, symmetric: bool
) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * torch.rand(shape[-1], generator=gen) * 3 + 0.5
    scale, zp = _qparams(x, granularity, bits, symmetric)
    qmin, qmax = int_range(bits)
    groups = to_groups(x, granularity)
    codes = quantize(groups, scale, zp, qmin, qmax)
    assert codes.dtype is torch.int8 and codes.min() >= qmin and codes.max() <= qmax
    error = (groups - dequantize(codes, scale, zp)).abs()
    assert torch.all(error <= scale / 2 * (1 + 1e-5) + 1e-7 * groups.abs())
    fq = fake_quantize(groups, scale, zp, qmin, qmax)
    assert torch.equal(fq, dequantize(codes, scale, zp))
    assert torch.equal(fake_quantize(fq, scale, zp, qmin, qmax), fq)


def test_zero_rows_give_eps_scale_and_zero_codes() -> None:
    x = torch.zeros(4, 16)
    scale, zp = _qparams(x, per_channel(), 8, True)
    assert torch.all(scale == SCALE_EPS)
    assert torch.equal(fake_quantize(x, scale, zp, *int_range(8)), x)


def test_round_ste_is_exact_round_with_identity_gradient() -> None:
    x = (torch.randn(1000) * 50).requires_grad_()
    out = round_ste(x)
    assert torch.equal(out, x.detach().round())
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_fake_quantize_gradients_reach_input_and_scale() -> None:
    x = torch.randn(16, 32, requires_grad=True)
    scale = (x.detach().abs().amax(dim=-1, keepdim=True) / 127 * 0.7).requires_grad_()
    out = fake_quantize(x, scale, torch.zeros_like(scale), *int_range(8))
    ((out - x.detach()) ** 2).sum().backward()
    for grad in (x.grad, scale.grad):
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("seed", [0, 1])
def test_fp8_fake_quant_error_is_small_and_finite(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 128, 64, generator=gen)
    scale = x.abs().amax() / FP8_E4M3_MAX
    out = fake_quantize_fp8(x, scale)
    assert torch.isfinite(out).all()
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normals, 2^-10 * scale for subnormals.
    bound = torch.maximum(x.abs() * 2**-4, 2**-10 * scale.expand_as(x)) * (1 + 1e-6)
    assert torch.all((x - out).abs() <= bound)
    assert sqnr_db(x, out) > 28


def test_fp8_fake_quant_saturates_and_passes_gradients() -> None:
    x = torch.tensor([-1000.0, -1.0, 0.0, 0.3, 1000.0], requires_grad=True)
    scale = torch.tensor([1.0], requires_grad=True)
    out = fake_quantize_fp8(x, scale)
    assert out[0] == -FP8_E4M3_MAX and out[-1] == FP8_E4M3_MAX
    out.sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))
    assert torch.isfinite(scale.grad).all()


@pytest.mark.parametrize("rows", [1, 7, 33, 1000, 4097])
def test_sigmoid_clip_is_exactly_one_at_init(rows: int) -> None:
    logit = torch.full((rows, 1), 4.0)
    assert torch.equal(sigmoid_clip(logit, 4.0), torch.ones_like(logit))
    assert torch.all(sigmoid_clip(torch.full((rows, 1), 1.0), 4.0) < 1)


@pytest.mark.parametrize("shape", [(1, 8), (3, 16), (5, 136), (2, 3, 64)])
@pytest.mark.parametrize("seed", [0, 1])
def test_int4_pack_round_trip_matches_compressed_tensors(shape: tuple[int, ...], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(-8, 8, shape, generator=gen, dtype=torch.int8)
    codes.view(-1)[:2] = torch.tensor([-8, 7], dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.dtype is torch.int32 and packed.shape == (*shape[:-1], shape[-1] // 8)
    assert torch.equal(unpack_int4(packed, shape), codes)
    assert torch.equal(packed, pack_to_int32(codes, 4))
    assert torch.equal(unpack_from_int32(packed, 4, torch.Size(shape)), codes)
    workspace = Workspace()
    for _ in range(2):  # buffers reused: the result is the same
        assert torch.equal(pack_int4(codes, workspace), packed)


def test_quantize_into_buffers_allocates_nothing_new() -> None:
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    scale, zero_point = compute_scale_zp(*group_range(x, per_channel()), 8)
    expected = quantize(x, scale, zero_point, -128, 127)
    out, work = torch.empty(8, 64, dtype=torch.int8), torch.empty(8, 64)
    assert quantize(x, scale, zero_point, -128, 127, out=out, work=work) is out and torch.equal(out, expected)
    assert torch.equal(quantize(x, scale, None, -128, 127), expected)  # symmetric: no zero-point to add


def test_workspace_reuses_memory_per_name() -> None:
    workspace = Workspace()
    a = workspace.get("a", (4, 8))
    assert workspace.get("a", (2, 3)).data_ptr() == a.data_ptr() and workspace.get("a", (2, 3)).shape == (2, 3)
    assert workspace.get("b", (4, 8)).data_ptr() != a.data_ptr()
    assert workspace.get("a", (4, 8), torch.int8).dtype is torch.int8  # another dtype, another buffer
    assert workspace.get("a", (64, 8)).shape == (64, 8)  # grows when asked for more


def test_int4_pack_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="divisible by 8"):
        pack_int4(torch.zeros(4, 12, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.full((2, 8), 8, dtype=torch.int8))
    with pytest.raises(ValueError, match="int8"):
        pack_int4(torch.zeros(2, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="does not match"):
        unpack_int4(torch.zeros(2, 2, dtype=torch.int32), (2, 24))
