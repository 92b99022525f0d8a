"""Quantizer modules: LWC / LAC exactness at init, gradients, exports, states."""

from __future__ import annotations

import pytest
import torch

from vllm_reference import vllm_per_token_fp8, vllm_w4a8_fp8_scales

from cores.quantization import (
    LAC_INIT_LOGIT,
    FP8_E4M3_MAX,
    FP8_MIN_SCALE,
    ActQuantizer,
    Granularity,
    KVQuantizer,
    QuantState,
    WeightQuantizer,
    compute_scale_zp,
    fake_quantize,
    fake_quantize_fp8,
    fp8_row_scales,
    from_groups,
    group_range,
    int_range,
    per_channel,
    per_group,
    quantize,
    sqnr_db,
    to_groups,
)

WEIGHT_CASES = [(8, per_channel()), (4, per_group(64)), (4, per_group(128)), (8, per_group(32))]


def _weight_quantizer(weight: torch.Tensor, bits: int, granularity: Granularity, lwc: bool) -> WeightQuantizer:
    quantizer = WeightQuantizer(weight.shape, bits, granularity, lwc=lwc)
    quantizer.set_state(QuantState.FAKE_QUANT)
    return quantizer


def _reference_rtn(weight: torch.Tensor, bits: int, granularity: Granularity) -> torch.Tensor:
    w32 = weight.float()
    scale, zp = compute_scale_zp(*group_range(w32, granularity), bits)
    out = fake_quantize(to_groups(w32, granularity), scale, zp, *int_range(bits))
    return from_groups(out, weight.shape).to(weight.dtype)


def _calibrated(quantizer: ActQuantizer, *batches: torch.Tensor) -> ActQuantizer:
    quantizer.set_state(QuantState.CALIBRATE)
    for batch in batches:
        assert quantizer(batch) is batch
    quantizer.set_state(QuantState.FAKE_QUANT)
    return quantizer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("bits", "granularity"), WEIGHT_CASES, ids=lambda c: str(c))
def test_lwc_at_init_equals_rtn_exactly(bits: int, granularity: Granularity, seed: int, dtype: torch.dtype) -> None:
    weight = torch.randn(96, 256, generator=torch.Generator().manual_seed(seed)).to(dtype)
    lwc = _weight_quantizer(weight, bits, granularity, lwc=True)
    rtn = _weight_quantizer(weight, bits, granularity, lwc=False)
    out = lwc(weight)
    assert out.dtype is dtype
    assert torch.equal(out, rtn(weight))
    assert torch.equal(out, _reference_rtn(weight, bits, granularity))
    for a, b in zip(lwc.quantize_weight(weight), rtn.quantize_weight(weight), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("bits", "granularity"), WEIGHT_CASES, ids=lambda c: str(c))
def test_lwc_gradients_reach_both_bounds(bits: int, granularity: Granularity) -> None:
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    quantizer = _weight_quantizer(weight, bits, granularity, lwc=True)
    assert quantizer.upbound_factor.shape == quantizer.lowbound_factor.shape
    assert quantizer.upbound_factor.shape[0] == to_groups(weight, granularity).shape[0]
    ((quantizer(weight) - weight) ** 2).mean().backward()
    up, low = quantizer.upbound_factor.grad, quantizer.lowbound_factor.grad
    assert torch.isfinite(up).all() and torch.isfinite(low).all()
    assert up.abs().sum() > 0 and low.abs().sum() > 0
    # The symmetric scale follows the larger bound, so every row trains one of them.
    assert torch.all((up.abs() + low.abs()) > 0)


def test_lwc_training_lowers_weight_error() -> None:
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    quantizer = _weight_quantizer(weight, 4, per_group(64), lwc=True)
    optimizer = torch.optim.Adam(quantizer.learnable_parameters(), lr=0.05)
    losses = []
    for _ in range(40):
        loss = ((quantizer(weight) - weight) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0]


@pytest.mark.parametrize(("bits", "granularity", "floor"), [(8, per_channel(), 35.0), (4, per_group(128), 15.0)])
def test_rtn_sqnr_floor_on_gaussian_weight(bits: int, granularity: Granularity, floor: float) -> None:
    weight = torch.randn(512, 1024, generator=torch.Generator().manual_seed(0))
    assert sqnr_db(weight, _weight_quantizer(weight, bits, granularity, lwc=True)(weight)) > floor


@pytest.mark.parametrize(("bits", "granularity"), WEIGHT_CASES, ids=lambda c: str(c))
def test_quantize_weight_codes_and_scales(bits: int, granularity: Granularity) -> None:
    weight = torch.randn(48, 256, generator=torch.Generator().manual_seed(3)).bfloat16()
    quantizer = _weight_quantizer(weight, bits, granularity, lwc=True)
    with torch.no_grad():
        quantizer.upbound_factor.fill_(1.0)
    codes, scale = quantizer.quantize_weight(weight)
    qmin, qmax = int_range(bits)
    assert codes.dtype is torch.int8 and codes.shape == weight.shape
    assert codes.min() >= qmin and codes.max() <= qmax
    n_cols = 1 if granularity == per_channel() else 256 // granularity.group_size
    assert scale.dtype is torch.float32 and scale.shape == (48, n_cols)
    assert torch.equal(quantizer.dequantize_weight(codes, scale), quantizer(weight.float()))


@pytest.mark.parametrize(("bits", "granularity"), WEIGHT_CASES, ids=lambda c: str(c))
def test_round_to_nearest_codes_need_no_clamp(bits: int, granularity: Granularity) -> None:
    """Without LWC the export skips the clamp: its codes still stay in range and equal the clamped ones,
    on rows made to sit at the edges (the absmax on either side, all zeros, below the scale floor, huge)."""
    weight = torch.randn(12, 256, generator=torch.Generator().manual_seed(9))
    weight[0, 3], weight[1, 7] = 5.0, -5.0  # the absmax on either side: codes +-qmax exactly
    weight[2] = 0.0
    weight[3] *= 1e-12  # absmax / qmax below SCALE_EPS: the floored scale
    weight[4] *= 1e30
    weight[5] = torch.linspace(-1.0, 1.0, 256)  # many values on the half-way points of some scale
    quantizer = _weight_quantizer(weight, bits, granularity, lwc=False)
    codes, scale = quantizer.quantize_weight(weight.bfloat16())
    qmin, qmax = int_range(bits)
    x = to_groups(weight.bfloat16().float(), granularity)
    assert torch.equal(codes, from_groups(quantize(x, scale.reshape(-1, 1), None, qmin, qmax).float(),
                                          weight.shape).to(torch.int8))
    assert int(codes.abs().max()) == qmax and int(codes.min()) >= qmin
    assert torch.equal(quantizer.dequantize_weight(codes, scale), quantizer(weight.bfloat16().float()))


def test_weight_quantizer_errors() -> None:
    with pytest.raises(ValueError, match="group size 128 does not divide the input dim 576"):
        WeightQuantizer((1536, 576), 4, per_group(128), lwc=True)
    quantizer = _weight_quantizer(torch.zeros(8, 64), 8, per_channel(), lwc=False)
    with pytest.raises(ValueError, match="does not match quantizer shape"):
        quantizer(torch.zeros(8, 32))


def test_float_and_calibrate_states_are_identity() -> None:
    weight = torch.randn(8, 64)
    quantizer = WeightQuantizer(weight.shape, 4, per_group(32), lwc=True)
    assert quantizer(weight) is weight
    quantizer.set_state(QuantState.CALIBRATE)
    assert quantizer(weight) is weight


def test_frozen_weight_quantizer_gives_no_gradient_to_bounds() -> None:
    weight = torch.randn(16, 64)
    quantizer = _weight_quantizer(weight, 4, per_group(32), lwc=True)
    expected = quantizer(weight)
    quantizer.set_state(QuantState.FROZEN)
    out = quantizer(weight)
    assert torch.equal(out, expected) and not out.requires_grad


@pytest.mark.parametrize("quantizer", [WeightQuantizer((16, 64), 4, per_group(32), lwc=True, learn_rounding=True),
                                       ActQuantizer(8, "static", lac=True)], ids=lambda q: type(q).__name__)
def test_packed_quantizer_is_frozen_for_good(quantizer) -> None:
    """PACKED computes as FROZEN (learned parameters detached); FROZEN leaves it PACKED, any other state raises."""
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    if isinstance(quantizer, ActQuantizer):
        _calibrated(quantizer, x)
    quantizer.set_state(QuantState.FROZEN)
    expected = quantizer(x)
    quantizer.set_state(QuantState.PACKED)
    out = quantizer(x)
    assert torch.equal(out, expected) and not out.requires_grad
    quantizer.set_state(QuantState.FROZEN)
    assert quantizer.state is QuantState.PACKED
    for state in (QuantState.FLOAT, QuantState.CALIBRATE, QuantState.FAKE_QUANT):
        with pytest.raises(RuntimeError, match="is PACKED"):
            quantizer.set_state(state)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dynamic_act_quant_is_per_token(dtype: torch.dtype) -> None:
    x = (torch.randn(2, 16, 64) * torch.logspace(-2, 1, 16)[:, None]).to(dtype)
    quantizer = ActQuantizer(8, "dynamic")
    quantizer.set_state(QuantState.FAKE_QUANT)
    out = quantizer(x)
    assert out.dtype is dtype and out.shape == x.shape
    x32 = x.float()
    row_scale = x32.abs().amax(dim=-1, keepdim=True) / 127
    assert torch.all((out.float() - x32).abs() <= row_scale / 2 * (1 + 1e-5) + x32.abs() * 2**-8)
    assert quantizer.get_qparams() == {} and quantizer.learnable_parameters() == []
    with pytest.raises(ValueError, match="needs a static scale"):
        ActQuantizer(8, "dynamic", lac=True)
    with pytest.raises(ValueError, match="'static' or 'dynamic'"):
        ActQuantizer(8, "per_token")  # type: ignore[arg-type]


def test_static_act_calibration_is_a_running_absmax() -> None:
    quantizer = ActQuantizer(8, "static", lac=True)
    with pytest.raises(RuntimeError, match="no range observed"):
        quantizer.set_state(QuantState.FAKE_QUANT)
    batches = [torch.randn(4, 32) * s for s in (1.0, 5.0, 2.0)]
    _calibrated(quantizer, *batches, torch.empty(0, 32))
    assert torch.equal(quantizer.absmax, torch.cat(batches).abs().amax().reshape(1))


@pytest.mark.parametrize("lac", [False, True])
def test_static_input_scale_export_is_the_scale_fake_quant_uses(lac: bool) -> None:
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0)) * 3
    quantizer = _calibrated(ActQuantizer(8, "static", lac=lac), x)
    exported = quantizer.get_qparams()["input_scale"]
    assert exported.shape == (1,) and exported.dtype is torch.float32
    assert torch.equal(exported, x.abs().amax().reshape(1) / 127)
    if lac:
        with torch.no_grad():
            quantizer.clip_factor.fill_(LAC_INIT_LOGIT - 2.0)  # below the init: a real clip
        exported = quantizer.get_qparams()["input_scale"]
        assert exported < x.abs().amax() / 127
    expected = fake_quantize(x, exported, torch.zeros(1), -128, 127)
    assert torch.equal(quantizer(x), expected)
    quantizer.set_state(QuantState.FROZEN)
    assert torch.equal(quantizer(x), expected)
    assert torch.equal(quantizer.get_qparams()["input_scale"], exported)


@pytest.mark.parametrize("lac", [False, True])
def test_asymmetric_static_range_keeps_both_ends_and_exports_its_zero_point(lac: bool) -> None:
    """A one-sided input (a SiLU-gated product: mostly positive, a small negative tail) gets ``[-lo, hi]``
    mapped onto -128..127: about twice the resolution of the symmetric range, and the exported
    ``input_scale`` / ``input_zero_point`` are exactly what fake quantization uses."""
    gen = torch.Generator().manual_seed(0)
    x = torch.nn.functional.silu(torch.randn(16, 64, generator=gen) * 3) * 2
    asym = _calibrated(ActQuantizer(8, "static", lac=lac, symmetric=False), x)
    sym = _calibrated(ActQuantizer(8, "static", lac=lac), x)
    assert torch.equal(asym.absmax, torch.stack((-x.min(), x.max())))
    qp = asym.get_qparams()
    scale, zero_point = qp["input_scale"], qp["input_zero_point"]
    assert scale.dtype is torch.float32 and zero_point.dtype is torch.int8 and scale.shape == zero_point.shape == (1,)
    assert scale == pytest.approx(float((x.max() - x.min()) / 255), rel=1e-6) and int(zero_point) < -100
    expected = fake_quantize(x, scale, zero_point.float(), -128, 127)
    assert torch.equal(asym(x), expected)
    err_asym, err_sym = ((q(x) - x).square().mean() for q in (asym, sym))
    assert err_asym < 0.5 * err_sym
    if lac:  # one learned clip per end, both reached by the gradient
        assert asym.clip_factor.shape == (2,)
        asym(x).square().sum().backward()
        assert (asym.clip_factor.grad != 0).all()
    with pytest.raises(ValueError, match="zero point is for static int8"):
        ActQuantizer(8, "dynamic", symmetric=False)


def test_lac_gradient_reaches_clip() -> None:
    calib = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    calib[0, 0] = 40.0
    quantizer = _calibrated(ActQuantizer(8, "static", lac=True), calib)
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    ((quantizer(x) - x) ** 2).mean().backward()
    grad = quantizer.clip_factor.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    quantizer.clip_factor.grad = None
    quantizer.set_state(QuantState.FROZEN)
    out = quantizer(x.requires_grad_())
    out.sum().backward()
    assert quantizer.clip_factor.grad is None and x.grad is not None


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("lac", [False, True])
def test_kv_quantizer(fmt: str, lac: bool) -> None:
    cache = torch.randn(2, 4, 32, 64, generator=torch.Generator().manual_seed(0)).bfloat16()
    quantizer = _calibrated(KVQuantizer(fmt, lac=lac), cache)
    absmax = cache.float().abs().amax().reshape(1)
    scale = quantizer.get_qparams()["scale"]
    assert scale.shape == (1,) and scale.dtype is torch.float32
    assert torch.equal(scale, absmax / (FP8_E4M3_MAX if fmt == "fp8" else 127))
    q_scale, zero_point = quantizer.qparams()  # the one static path: what fake quant uses and deploy exports
    assert torch.equal(q_scale, scale) and torch.equal(zero_point, torch.zeros(1))
    out = quantizer(cache)
    assert out.dtype is torch.bfloat16 and torch.isfinite(out).all()
    assert sqnr_db(cache.float(), out.float()) > (25 if fmt == "fp8" else 35)
    if fmt == "fp8":
        assert torch.equal(out, fake_quantize_fp8(cache.float(), scale).bfloat16())
    if lac:
        x = cache.float()
        ((quantizer(x) - x) ** 2).mean().backward()
        assert torch.isfinite(quantizer.clip_factor.grad).all() and quantizer.clip_factor.grad.abs().sum() > 0


def test_kv_quantizer_rejects_unknown_format() -> None:
    with pytest.raises(ValueError, match="'int8' or 'fp8'"):
        KVQuantizer("int4")  # type: ignore[arg-type]


@pytest.mark.parametrize("magnitude", [1e-30, 1e-6, 1e-3, 3e-2, 1.0, 1e3])
def test_fp8_row_scales_are_what_vllm_serves(magnitude: float) -> None:
    """vLLM's W4A8-FP8 kernels re-encode group scales through fp8; scales on our grid come out unchanged (bf16
    included), stay within 1/8 of the absmax scales (up to the floors of tiny rows), and are never 0."""
    gen = torch.Generator().manual_seed(3)
    scale = (torch.rand(256, 16, generator=gen) * magnitude) * torch.logspace(-4, 0, 16)[torch.randperm(16, generator=gen)]
    grid = fp8_row_scales(scale)
    assert torch.equal(vllm_w4a8_fp8_scales(grid), grid) and bool((grid > 0).all())
    if magnitude >= 3e-2:  # where the fp8 ratio is a normal number: 3 mantissa bits, 4 for the row's scale
        top = scale.amax(dim=-1, keepdim=True)
        normal = (scale >= top / 3584) & (top / FP8_E4M3_MAX >= FP8_MIN_SCALE)
        ratio = (grid / scale)[normal]
        assert 0.93 <= float(ratio.min()) and float(ratio.max()) <= 1.13 and normal.float().mean() > 0.5
        top = scale.argmax(dim=-1, keepdim=True)
        assert torch.all(grid.gather(-1, top) >= scale.gather(-1, top))  # the row's largest is never clipped
    assert torch.equal(fp8_row_scales(grid), grid)  # idempotent


def test_fp8_scale_weights_quantize_as_served() -> None:
    """With fp8 group scales the codes are rounded with the served scales, the export equals the fake
    quant, the scale gradient passes straight through, and LWC still trains."""
    weight = torch.randn(48, 256, generator=torch.Generator().manual_seed(4)).bfloat16()
    quantizer = WeightQuantizer(weight.shape, 4, per_group(64), lwc=True, fp8_scales=True)
    quantizer.set_state(QuantState.FAKE_QUANT)
    with torch.no_grad():
        quantizer.upbound_factor.uniform_(-1.0, 1.0)
    codes, scale = quantizer.quantize_weight(weight)
    assert torch.equal(vllm_w4a8_fp8_scales(scale.view(48, 4)), scale.view(48, 4))
    assert int(codes.max()) <= 7 and int(codes.min()) >= -8
    out = quantizer(weight.float())
    assert torch.equal(quantizer.dequantize_weight(codes, scale), out)
    out.square().sum().backward()
    assert quantizer.upbound_factor.grad.abs().sum() > 0
    plain, on_grid = (_weight_quantizer(weight, 4, per_group(64), lwc=False) for _ in range(2))
    on_grid.fp8_scales = True
    assert not torch.equal(plain(weight.float()), on_grid(weight.float()))  # the grid moves the scales


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dynamic_fp8_act_quant_is_vllm_per_token_fp8(dtype: torch.dtype) -> None:
    """fp8 activations: each token cast to e4m3 at absmax / 448 (floored as vLLM floors it), x times 1 / scale."""
    x = (torch.randn(2, 16, 64) * torch.logspace(-6, 2, 16)[:, None]).to(dtype)
    x[0, 0] = 0.0
    quantizer = ActQuantizer(8, "dynamic", fmt="fp8")
    quantizer.set_state(QuantState.FAKE_QUANT)
    out = quantizer(x)
    x32 = x.float()
    codes, scale = vllm_per_token_fp8(x32)
    served = codes.float() * scale
    assert out.dtype is dtype and torch.equal(out, served.to(dtype)) and bool(torch.isfinite(out).all())
    assert (out.float() - x32).abs().max() <= (x32.abs() / 16).max()  # 3 mantissa bits
    assert quantizer.get_qparams() == {}
    with pytest.raises(ValueError, match="'fp8' with a dynamic mode"):
        ActQuantizer(8, "static", fmt="fp8")
