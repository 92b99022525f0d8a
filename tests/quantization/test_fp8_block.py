"""FP8 e4m3 with one scale per 128x128 tile: the scale grid, the four calibration modes, activation weighting."""

import pytest
import torch

from cores.quantization.fp8_block import (
    MIN_SCALE,
    Fp8BlockConfig,
    channel_weights,
    dequantize_tiles,
    fp8_round_trip,
    iter_quantize_fp8_block,
    quantize_fp8_block,
    scale_grid,
    tile_scales,
    weighted_error,
)
from cores.quantization.primitives import FP8_E4M3_MAX
from cores.utils.checkpoint import dequantize_fp8_blockwise

SHAPES = [(128, 128), (200, 300), (64, 576), (1, 129), (257, 127)]


def heavy(shape, seed=0):
    """Student-t-like weights: a Gaussian body with a few large outliers per tile, as real weights have."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * 0.02
    outliers = torch.rand(shape, generator=gen) < 0.002
    return torch.where(outliers, w * 30, w)


def reference_absmax_cast(weight, block=128):
    """The DeepSeek ``weight_quant`` cast the tiny FP8 twins used before: zero-padded tiles, absmax / 448."""
    out_dim, in_dim = weight.shape
    rows, cols = -(-out_dim // block), -(-in_dim // block)
    padded = torch.zeros(rows * block, cols * block, dtype=torch.float32)
    padded[:out_dim, :in_dim] = weight.float()
    tiles = padded.view(rows, block, cols, block)
    scale_inv = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_E4M3_MAX
    q = (tiles / scale_inv[:, None, :, None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return q.view(rows * block, cols * block)[:out_dim, :in_dim].contiguous(), scale_inv


def loud_channels(in_dim, seed=1):
    """Channel weights (mean 1) where a few channels carry most of the activation energy."""
    gen = torch.Generator().manual_seed(seed)
    ms = torch.rand(in_dim, generator=gen) * 0.1
    ms[torch.randperm(in_dim, generator=gen)[: max(1, in_dim // 16)]] = 50.0
    return channel_weights(ms)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ["max", "rms", "percentile", "mse"])
def test_scale_grid_and_codes_have_the_official_shapes(shape, mode):
    w = heavy(shape).bfloat16()
    codes, scale_inv = quantize_fp8_block(w, Fp8BlockConfig(mode=mode, grid=4))
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == shape
    assert scale_inv.dtype == torch.float32 and scale_inv.shape == scale_grid(*shape) == (-(-shape[0] // 128),
                                                                                         -(-shape[1] // 128))
    assert torch.isfinite(scale_inv).all() and (scale_inv > 0).all()


def test_padding_of_edge_tiles_never_counts():
    """An edge tile's scale is that of its real values: the same values inside a whole tile give the same scale."""
    w = heavy((200, 300))
    for mode in ("max", "rms", "percentile", "mse"):
        cfg = Fp8BlockConfig(mode=mode, grid=8)
        edge = tile_scales(w, cfg)[1, 2]  # rows 128:200, cols 256:300
        alone = tile_scales(w[128:, 256:], cfg)
        assert alone.shape == (1, 1) and edge == alone[0, 0], mode


@pytest.mark.parametrize("shape", SHAPES)
def test_max_mode_is_the_old_absmax_cast(shape):
    w = heavy(shape).bfloat16()
    codes, scale_inv = quantize_fp8_block(w)
    ref_codes, ref_scale = reference_absmax_cast(w)
    assert torch.equal(scale_inv, ref_scale)
    assert torch.equal(codes.view(torch.uint8), ref_codes.view(torch.uint8))


def test_zero_tile_gets_the_floor_scale_and_zero_codes():
    w = torch.zeros(130, 130)
    w[:128, :128] = 1.0
    codes, scale_inv = quantize_fp8_block(w, Fp8BlockConfig(mode="mse"))
    assert scale_inv[0, 0] == pytest.approx(1 / FP8_E4M3_MAX)
    assert torch.equal(scale_inv[1:, :].flatten(), torch.full((2,), MIN_SCALE))
    assert (codes[128:].float() == 0).all() and (codes[:, 128:].float() == 0).all()


@pytest.mark.parametrize("act", [False, True], ids=["plain", "act-aware"])
@pytest.mark.parametrize("seed", range(3))
def test_mse_is_never_worse_than_max_on_the_weighted_error(act, seed):
    w = heavy((256, 384), seed)
    a = loud_channels(384, seed) if act else None
    errors = {}
    for mode in ("max", "mse"):
        codes, scale_inv = quantize_fp8_block(w, Fp8BlockConfig(mode=mode), a if mode == "mse" else None)
        errors[mode] = weighted_error(w, dequantize_tiles(codes, scale_inv), a)
    assert errors["mse"] <= errors["max"]
    # tile by tile too: the grid holds f = 1 (absmax), so no tile loses
    wt = torch.ones(384) if a is None else a

    def per_tile(mode):
        restored = dequantize_tiles(*quantize_fp8_block(w, Fp8BlockConfig(mode=mode), a if mode == "mse" else None))
        return ((w - restored).square() * wt).view(2, 128, 3, 128).sum((1, 3))

    assert (per_tile("mse") <= per_tile("max") * (1 + 1e-6)).all()


def test_activation_weighting_moves_the_choice_toward_loud_channels():
    """A tile whose outliers sit in the loud channels: weighted, rms and percentile clip less of them, and mse
    gets a lower weighted error (the objective it minimises) than the plain choice on the same grid."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(128, 128, generator=gen) * 0.02
    w[:, :4] *= 20  # channels 0..3 hold the outliers ...
    ms = torch.full((128,), 0.01)
    ms[:4] = 100.0  # ... and carry the activations
    a = channel_weights(ms)
    for cfg in (Fp8BlockConfig(mode="rms", k=3), Fp8BlockConfig(mode="percentile", percentile=99)):
        assert tile_scales(w, cfg, a)[0, 0] > tile_scales(w, cfg)[0, 0], cfg.mode
    # loud channels elsewhere from the outliers: the weighted choice clips harder than the plain one
    quiet = ms.flip(0)
    for cfg in (Fp8BlockConfig(mode="rms", k=3), Fp8BlockConfig(mode="percentile", percentile=99.9)):
        assert tile_scales(w, cfg, channel_weights(quiet))[0, 0] < tile_scales(w, cfg, a)[0, 0], cfg.mode
    w = heavy((256, 256), 3)
    a = loud_channels(256, 3)
    cfg = Fp8BlockConfig(mode="mse", grid=40)
    aware, plain = tile_scales(w, cfg, a), tile_scales(w, cfg)
    assert not torch.equal(aware, plain)
    err = {name: weighted_error(w, dequantize_tiles(*quantize_fp8_block(w, cfg, act)), a)
           for name, act in (("aware", a), ("plain", None))}
    assert err["aware"] <= err["plain"]


@pytest.mark.parametrize("act", [False, True], ids=["plain", "act-aware"])
@pytest.mark.parametrize("cfg", [Fp8BlockConfig(mode="rms", k=1.0), Fp8BlockConfig(mode="rms", k=6.0),
                                 Fp8BlockConfig(mode="rms", k=1e4), Fp8BlockConfig(mode="percentile", percentile=50),
                                 Fp8BlockConfig(mode="percentile", percentile=100), Fp8BlockConfig(mode="mse")],
                         ids=lambda c: c.describe())
def test_clipping_modes_never_exceed_absmax(cfg, act):
    w = heavy((200, 300))
    a = loud_channels(300) if act else None
    absmax = tile_scales(w)
    scales = tile_scales(w, cfg, a)
    assert (scales <= absmax).all()
    if cfg.mode == "mse":
        assert (scales >= absmax * cfg.grid_min * (1 - 1e-6)).all()
    if cfg.mode == "percentile" and cfg.percentile == 100 or cfg.mode == "rms" and cfg.k == 1e4:
        assert torch.equal(scales, absmax)  # no clip at all


def test_rms_clip_is_k_times_the_tile_rms():
    w = heavy((128, 256))
    scales = tile_scales(w, Fp8BlockConfig(mode="rms", k=2.0))
    rms = w.view(1, 128, 2, 128).square().mean((1, 3)).sqrt()
    assert torch.allclose(scales, 2 * rms / FP8_E4M3_MAX, rtol=1e-5)


@pytest.mark.parametrize("mode,act", [("max", False), *[(m, act) for m in ("rms", "percentile", "mse")
                                                           for act in (False, True)]])
def test_iter_quantize_equals_whole_weight_quantize(mode, act):
    w = heavy((600, 200)).bfloat16()
    a = loud_channels(200) if act else None
    cfg = Fp8BlockConfig(mode=mode, grid=6)
    codes, scale_inv = quantize_fp8_block(w, cfg, a)
    runs = list(iter_quantize_fp8_block(w, cfg, a, elements=128 * 200, errors=True))  # one tile row a run: 5
    assert len(runs) == 5 and runs[-1].rows == slice(512, 600)  # runs, ragged last
    assert torch.equal(torch.cat([r.codes for r in runs]).view(torch.uint8), codes.view(torch.uint8))
    assert torch.equal(torch.cat([r.scale_inv for r in runs]), scale_inv)
    # errors: per run, the whole tiles' columns and the ragged last tile column, source and error in fp32
    assert all([p[0] for p in r.pieces] == [slice(0, 128), slice(128, 200)] for r in runs)
    assert torch.equal(torch.cat([torch.cat([p[1] for p in r.pieces], 1) for r in runs]), w.float())
    error = torch.cat([torch.cat([p[2] for p in r.pieces], 1) for r in runs])
    torch.testing.assert_close(error, w.float() - dequantize_tiles(codes, scale_inv), rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(256, 384), (300, 200)])  # whole tiles (the broadcast view), a ragged edge
def test_tile_paths_equal_the_elementwise_definition(shape):
    """Codes and restored values of the broadcast tile view and of the ragged fallback are the elementwise
    ``w / s`` and ``codes * s`` with the scale repeated over each tile (torch's own fp8 cast back)."""
    w = heavy(shape)
    codes, scale_inv = quantize_fp8_block(w, Fp8BlockConfig())
    s = scale_inv.repeat_interleave(128, 0)[:shape[0]].repeat_interleave(128, 1)[:, :shape[1]]
    expected = (w / s).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(codes.view(torch.uint8), expected.view(torch.uint8))
    assert torch.equal(dequantize_tiles(codes, scale_inv), codes.float() * s)


def test_dequantize_is_the_loaders_dequantization():
    """Our codes read back through the checkpoint loader's FP8 path give our restored weight (bf16-rounded)."""
    w = heavy((300, 200))
    codes, scale_inv = quantize_fp8_block(w, Fp8BlockConfig(mode="mse"))
    ours = dequantize_tiles(codes, scale_inv)
    assert torch.equal(dequantize_fp8_blockwise(codes, scale_inv).float(), ours.bfloat16().float())
    assert torch.equal(fp8_round_trip(w[:128, :128].reshape(1, -1), scale_inv[0, :1]).view(128, 128),
                       ours[:128, :128])
    cos = torch.nn.functional.cosine_similarity(w.flatten(), ours.flatten(), dim=0)
    assert cos > 0.999  # e4m3 under tile scales: ~0.9996


def test_channel_weights_mean_one_and_floor():
    a = channel_weights(torch.tensor([0.0, 1.0, 3.0, 0.0]))
    assert a.mean() == pytest.approx(1.0, abs=1e-3) and a.min() > 0
    assert torch.equal(channel_weights(torch.zeros(4)), torch.ones(4))


@pytest.mark.parametrize("kwargs,match", [
    ({"mode": "absmax"}, "unknown FP8 calibration mode 'absmax'; valid: max, rms, percentile, mse"),
    ({"mode": "rms", "k": 0}, "k must be positive"),
    ({"percentile": 0}, r"percentile must be in \(0, 100\]"),
    ({"percentile": 100.5}, r"percentile must be in \(0, 100\]"),
    ({"grid": 0}, "at least 1 factor"),
    ({"grid_min": 0}, "at least 1 factor"),
    ({"block": (128,)}, "two positive sizes"),
    ({"block": (0, 128)}, "two positive sizes"),
])
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Fp8BlockConfig(**kwargs)


def test_bad_inputs_are_refused():
    w = heavy((128, 64))
    with pytest.raises(ValueError, match="mode max has no clip to choose"):
        tile_scales(w, Fp8BlockConfig(), torch.ones(64))
    with pytest.raises(ValueError, match=r"shape \(32,\) do not match the weight's 64 input channels"):
        tile_scales(w, Fp8BlockConfig(mode="mse"), torch.ones(32))
    with pytest.raises(ValueError, match="takes 2-D weights"):
        tile_scales(torch.ones(2, 3, 4))


@pytest.mark.parametrize("act", [False, True], ids=["plain", "act-aware"])
def test_mse_picks_the_best_factor_of_a_brute_force_search(act):
    """The vectorised search against a plain loop over the grid, tile by tile, with torch's own fp8 cast."""
    w = heavy((256, 200), 5)
    a = loud_channels(200, 5) if act else None
    cfg = Fp8BlockConfig(mode="mse", grid=7, grid_min=0.4)
    scales = tile_scales(w, cfg, a)
    wt = torch.ones(200) if a is None else a
    absmax = tile_scales(w) * FP8_E4M3_MAX
    for r in range(2):
        for c in range(2):
            tile, tw = w[r * 128:(r + 1) * 128, c * 128:(c + 1) * 128], wt[c * 128:(c + 1) * 128]

            def err(s):
                q = (tile / s).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).float() * s
                return float(((tile - q).square() * tw).sum())

            errors = [err(absmax[r, c] * f / FP8_E4M3_MAX) for f in torch.linspace(1.0, 0.4, 7).tolist()]
            assert err(scales[r, c]) <= min(errors) * (1 + 1e-5)
