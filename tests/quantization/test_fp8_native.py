"""The native FP8 tile kernel (:mod:`cores.quantization.fp8_native`) against the torch path: bit-identical codes
and scales in every mode and dtype, its e4m3 cast against torch's over a dense set of fp32 values, and the
check's aggregates against :class:`~cores.deploy.verify.WeightCheck` fed the torch path's error."""

import ctypes
import math

import pytest
import torch

from blockptq_assets.tiny import make_tiny_checkpoint
from cores.deploy import DeployConfig, deploy
from cores.deploy.verify import WeightCheck
from cores.quantization import fp8_block, fp8_native
from cores.quantization.fp8_block import (
    FP8_MODES,
    Fp8BlockConfig,
    channel_weights,
    iter_quantize_fp8_block,
    quantize_fp8_block,
)

pytestmark = pytest.mark.skipif(fp8_native.compiler() is None,
                                reason="no C compiler (cc, gcc or $CC) on PATH: the native FP8 kernel cannot be built")

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
SHAPES = [(128, 128), (300, 200), (1, 129), (257, 127), (640, 384)]


@pytest.fixture(autouse=True)
def native(monkeypatch):
    """The kernel on (whatever the environment says), and built: a compiler that cannot build it is a failure."""
    monkeypatch.delenv("BLOCKPTQ_NATIVE", raising=False)
    assert fp8_native.native_library() is not None, "a C compiler exists but the native FP8 kernel did not build"


@pytest.fixture
def native_calls(monkeypatch):
    """Counts the runs the kernel quantized (so that a comparison cannot pass with the torch path twice)."""
    calls = []
    encode = fp8_native.encode_tiles

    def counted(*args, **kwargs):
        out = encode(*args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(fp8_block, "encode_tiles", counted)
    return calls


def torch_path(monkeypatch, fn):
    """``fn()`` with ``BLOCKPTQ_NATIVE=0`` (today's torch path)."""
    monkeypatch.setenv("BLOCKPTQ_NATIVE", "0")
    try:
        return fn()
    finally:
        monkeypatch.delenv("BLOCKPTQ_NATIVE")


def bits(t):
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t.view(torch.int32)


def assert_same(native, ref):
    assert torch.equal(bits(native[0]), bits(ref[0])), "codes differ"
    assert torch.equal(bits(native[1]), bits(ref[1])), "scales differ"


def heavy(shape, seed=0, dtype=torch.float32):
    """A Gaussian body with a few large outliers per tile, as real weights have."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * 0.02
    return torch.where(torch.rand(shape, generator=gen) < 0.002, w * 30, w).to(dtype)


def loud_channels(in_dim, seed=1):
    gen = torch.Generator().manual_seed(seed)
    ms = torch.rand(in_dim, generator=gen) * 0.1
    ms[torch.randperm(in_dim, generator=gen)[: max(1, in_dim // 16)]] = 50.0
    return channel_weights(ms)


# --- the e4m3 cast ---------------------------------------------------------------------------------------------

def kernel_cast(x):
    """The kernel's e4m3 codes of fp32 values ``x`` (scale 1: ``x / 1`` is ``x``)."""
    cols = 1024
    flat = torch.cat([x.reshape(-1), x.new_zeros(-x.numel() % cols)])
    w = flat.view(-1, cols)
    block = (256, cols)
    out = fp8_native.encode_tiles(w, block, torch.ones(-(-w.shape[0] // 256), 1))
    assert out is not None
    return out[0].view(torch.uint8).reshape(-1)[:x.numel()]


def torch_cast(x, clip):
    return (x.clamp(-448, 448) if clip else x).to(torch.float8_e4m3fn).view(torch.uint8)


def dense_values():
    """Every finite e4m3 value, every midpoint between neighbours (ties), each +-1 and 2 ulps, both signs, and
    the edges: fp32 subnormals, e4m3's normal / subnormal boundary, 448 / 464 / 480, fp32's largest."""
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    pos = codes[torch.isfinite(codes) & (codes >= 0)].unique().sort().values  # 0 .. 448
    grid = torch.cat([pos, torch.tensor([480.0])])  # 480: the NaN code's place, for the 464 midpoint
    mids = (grid[1:] + grid[:-1]) / 2  # exact in fp32
    edges = torch.tensor([2.0**-6, 2.0**-9, 2.0**-10, 2.0**-11, 464.0, 480.0, 1e30, 3.4028234663852886e38,
                          1.1754943508222875e-38, 1.401298464324817e-45, 5.877471754111438e-39])
    base = torch.cat([grid, mids, edges])
    vals, up, down = [base], base, base
    for _ in range(2):
        up, down = torch.nextafter(up, torch.tensor(math.inf)), torch.nextafter(down, torch.tensor(-math.inf))
        vals += [up, down]
    v = torch.cat(vals)
    v = torch.cat([v, -v])
    return v[torch.isfinite(v)]


def random_values(n=4_000_000, seed=0):
    """``n`` fp32 values: random bit patterns (every finite exponent), uniform on [-500, 500], and
    log-uniform magnitudes from 2^-24 to 2^10 (e4m3's subnormals, normals and overflow)."""
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randint(-2**31, 2**31, (n // 2,), generator=gen, dtype=torch.int64).to(torch.int32).view(
        torch.float32)
    uniform = (torch.rand(n // 4, generator=gen) - 0.5) * 1000
    sign = torch.where(torch.rand(n // 4, generator=gen) < 0.5, -1.0, 1.0)
    logu = sign * torch.exp2(torch.rand(n // 4, generator=gen) * 34 - 24)
    v = torch.cat([raw, uniform, logu])
    return v[torch.isfinite(v)]


@pytest.mark.parametrize("clip", [False, True])
def test_cast_equals_torch_on_every_tie_and_edge(clip):
    """Torch's cast and its clamp-then-cast (the clipping modes) alike: the kernel's saturating cast is both."""
    x = dense_values()
    assert torch.equal(kernel_cast(x), torch_cast(x, clip))


@pytest.mark.parametrize("clip", [False, True])
def test_cast_equals_torch_on_millions_of_random_floats(clip):
    x = random_values()
    assert torch.equal(kernel_cast(x), torch_cast(x, clip))


def test_cast_keeps_the_sign_of_zero_and_saturates_as_torch():
    x = torch.tensor([0.0, -0.0, 449.0, 463.9, 464.0, 464.1, 479.9, 480.0, -470.0, 1e38, 1e-30, -1e-30])
    assert kernel_cast(x).tolist() == torch_cast(x, False).tolist()
    assert kernel_cast(x)[:2].tolist() == [0x00, 0x80]
    assert kernel_cast(x)[2:10].tolist() == [0x7E] * 6 + [0xFE, 0x7E]  # torch's CPU cast saturates at +-448


# --- codes and scales ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", FP8_MODES)
def test_codes_and_scales_are_bit_identical(monkeypatch, native_calls, mode, shape, dtype):
    w = heavy(shape, seed=sum(shape), dtype=dtype)
    cfg = Fp8BlockConfig(mode=mode, grid=4)
    native = quantize_fp8_block(w, cfg)
    assert native_calls == [True]
    assert_same(native, torch_path(monkeypatch, lambda: quantize_fp8_block(w, cfg)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["rms", "percentile", "mse"])
def test_activation_aware_codes_are_bit_identical(monkeypatch, native_calls, mode, dtype):
    w = heavy((300, 200), dtype=dtype)
    a = loud_channels(200)
    cfg = Fp8BlockConfig(mode=mode, grid=6)
    native = quantize_fp8_block(w, cfg, a)
    assert native_calls == [True]
    assert_same(native, torch_path(monkeypatch, lambda: quantize_fp8_block(w, cfg, a)))


def constructed(dtype):
    """Tiles built to hit the cast's corners: every e4m3 value and every tie between neighbours (tiles whose
    absmax is 448: scale 1), quotients in e4m3's subnormal range, on subnormal ties and below it, a tile under
    the 1e-12 floor of the scale, a tile of negative zeros, an all-zero tile, quotients near integers."""
    gen = torch.Generator().manual_seed(7)
    w = torch.zeros(384, 384)
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    ladder = torch.sort(codes[torch.isfinite(codes) & (codes >= 0)].unique()).values  # 0 .. 448
    ties = (ladder[1:] + ladder[:-1]) / 2
    w[0, :126], w[0, 126] = ties, 448.0  # tile (0, 0)
    w[1, :126] = -ties
    w[2, :127] = ladder
    w[0, 128:255], w[0, 255] = ladder, -448.0  # tile (0, 1)
    w[1, 128:254] = ties.flip(0)
    w[128, 128] = 448.0  # tile (1, 1): subnormal quotients, ties between subnormals, below them
    w[129, 128:256] = torch.arange(128) * 2.0**-10
    w[130, 128:256] = -torch.arange(128) * 2.0**-12
    w[131, 128:256] = torch.arange(128) * 2.0**-6 / 128
    w[256:384, 0:128] = torch.randn(128, 128, generator=gen) * 1e-20  # tile (2, 0): below the 1e-12 floor
    w[256:260, 128:256] = -0.0  # tile (2, 1): negative zeros only (tile (1, 0) is all zero)
    w[256, 256] = 3.0  # tile (2, 2): values at k * 3 / 448 (quotients near integers)
    w[257, 256:384] = torch.arange(128) * 3.0 / 448
    return w.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", FP8_MODES)
def test_constructed_edge_tiles_are_bit_identical(monkeypatch, native_calls, mode, dtype):
    w = constructed(dtype)
    cfg = Fp8BlockConfig(mode=mode, grid=5)
    native = quantize_fp8_block(w, cfg)
    assert all(native_calls)
    assert_same(native, torch_path(monkeypatch, lambda: quantize_fp8_block(w, cfg)))


@pytest.mark.parametrize("cfg", [Fp8BlockConfig(mode="rms", k=0.5), Fp8BlockConfig(mode="percentile", percentile=50),
                                 Fp8BlockConfig(mode="mse", grid=3, grid_min=0.05)])
def test_saturating_clips_are_bit_identical(monkeypatch, native_calls, cfg):
    w = heavy((300, 260), dtype=torch.bfloat16)
    native = quantize_fp8_block(w, cfg)
    assert native_calls == [True]
    if cfg.mode != "mse":  # (mse clips what lowers the error: little)
        assert (native[0].view(torch.uint8) & 0x7F == 0x7E).float().mean() > 0.01  # many values at +-448
    assert_same(native, torch_path(monkeypatch, lambda: quantize_fp8_block(w, cfg)))


def test_fp16_and_fp32_subnormal_weights(monkeypatch, native_calls):
    gen = torch.Generator().manual_seed(3)
    half = (torch.randint(-1023, 1024, (200, 300), generator=gen) * 2.0**-24).half()  # fp16 subnormals only
    half[:128, :128] *= 0  # a zero tile next to them
    tiny = torch.randn(200, 300, generator=gen) * 1e-39  # fp32 subnormals
    for w in (half, tiny, half.float() * 2.0**100):
        for mode in ("max", "mse"):
            cfg = Fp8BlockConfig(mode=mode, grid=4)
            assert_same(quantize_fp8_block(w, cfg), torch_path(monkeypatch, lambda: quantize_fp8_block(w, cfg)))
    assert all(native_calls)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_weights_take_the_torch_path(monkeypatch, native_calls, bad):
    for dtype in DTYPES:
        w = heavy((300, 200), dtype=dtype)
        w[140, 150] = bad
        assert fp8_native.encode_tiles(w, (128, 128), None, False) is None
        for mode in ("max", "rms"):
            cfg = Fp8BlockConfig(mode=mode)
            assert_same(quantize_fp8_block(w, cfg), torch_path(monkeypatch, lambda: quantize_fp8_block(w, cfg)))
    assert not any(native_calls)  # every call fell back


def test_strided_weights_and_thread_counts(monkeypatch):
    """Views with a row stride or a column stride, and any thread count: the same codes, scales and (the work
    is split the same way whatever the thread count) the same statistics to the bit."""
    w = heavy((520, 700), dtype=torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        for view in (w[:, 37:600], w.t(), w[::2]):
            cfg = Fp8BlockConfig()
            ref = torch_path(monkeypatch, lambda: quantize_fp8_block(view, cfg))
            stats, peak = set(), torch.rand(view.shape[1])
            for n in (1, 3):
                torch.set_num_threads(n)
                assert_same(quantize_fp8_block(view, cfg), ref)
                stats.add(fp8_native.encode_tiles(view, cfg.block, None, True, peak)[2])
            assert len(stats) == 1
    finally:
        torch.set_num_threads(threads)


def test_the_baseline_isa_build_is_bit_identical(monkeypatch):
    """The kernel built without ``-march=native`` (8-lane vectors in SSE2 halves, fmaf through libm): the same
    cast, codes and statistics, so that the results do not depend on the host's vector units."""
    baseline = fp8_native._declare(ctypes.CDLL(str(fp8_native._build(fp8_native.compiler(), fp8_native.FLAGS))))
    w = constructed(torch.bfloat16)
    x = torch.cat([dense_values(), random_values(200_000)])
    native = kernel_cast(x), fp8_native.encode_tiles(w, (128, 128), None, True)
    monkeypatch.setattr(fp8_native, "_load", lambda: baseline)
    assert torch.equal(kernel_cast(x), native[0]) and torch.equal(native[0], torch_cast(x, False))
    base = fp8_native.encode_tiles(w, (128, 128), None, True)
    assert_same(base, native[1])
    assert base[2] == native[1][2]


def test_iter_runs_equal_the_whole_weight(native_calls):
    w = heavy((600, 200), dtype=torch.bfloat16)
    cfg = Fp8BlockConfig(mode="percentile")
    codes, scale_inv = quantize_fp8_block(w, cfg)
    runs = list(iter_quantize_fp8_block(w, cfg, elements=128 * 200, error_stats=True))
    assert len(runs) == 5 and all(r.stats is not None and not r.pieces for r in runs)
    assert torch.equal(torch.cat([r.codes for r in runs]).view(torch.uint8), codes.view(torch.uint8))
    assert torch.equal(torch.cat([r.scale_inv for r in runs]), scale_inv)
    assert sum(r.stats.count for r in runs) == w.numel()


def test_native_off_and_cuda_keep_the_torch_path(monkeypatch, native_calls):
    monkeypatch.setenv("BLOCKPTQ_NATIVE", "0")
    assert fp8_native.native_library() is None
    run = next(iter_quantize_fp8_block(heavy((128, 128)), error_stats=True))
    assert run.stats is None and run.pieces and native_calls == []
    monkeypatch.delenv("BLOCKPTQ_NATIVE")
    assert not fp8_native.native_usable(heavy((128, 128), dtype=torch.float64))
    assert not fp8_native.native_usable(torch.empty(128, 128, device="meta"))


# --- the check's aggregates ------------------------------------------------------------------------------------

def checks(monkeypatch, w, cfg, act):
    """``(native WeightCheck, torch WeightCheck, float64 sums of the torch path's error)`` of ``w``."""
    peak = None if act is None else act.sqrt()

    def run(native):
        check = WeightCheck("w", 8, fmt="fp8", peak_weight=peak)
        errors = []
        for r in iter_quantize_fp8_block(w, cfg, act, elements=128 * w.shape[1] * 2, error_stats=True,
                                         peak_weight=peak):
            assert (r.stats is not None) == native
            if r.stats is not None:
                check.add_stats(r.stats)
            for cols, source, error in r.pieces:
                errors.append((cols, source.double(), error.double()))
                check.update_error(source.clone(), error.clone(), cols)
        return check, errors

    native, _ = run(True)
    ref, errors = torch_path(monkeypatch, lambda: run(False))
    exact = {"xx": sum(float((x * x).sum()) for _, x, _ in errors),
             "xe": sum(float((x * e).sum()) for _, x, e in errors),
             "ee": sum(float((e * e).sum()) for _, _, e in errors),
             "abs": sum(float(e.abs().sum()) for *_, e in errors)}
    return native, ref, exact


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode,act", [("max", False), ("rms", True), ("percentile", False), ("mse", True)])
def test_check_aggregates_agree_with_the_torch_check(monkeypatch, mode, act, dtype):
    w = heavy((700, 330), seed=5, dtype=dtype)
    a = loud_channels(330) if act else None
    native, ref, exact = checks(monkeypatch, w, Fp8BlockConfig(mode=mode, grid=4), a)
    for key, value in exact.items():  # the same elementwise error; 16-term fp32 partials summed in double
        assert native.sums[key] == pytest.approx(value, rel=1e-6, abs=1e-300), key
    assert native.count == ref.count == w.numel()
    # the error elements are torch's bit for bit (a fused multiply-add, as torch's addcmul): equal maxima
    assert (native.max_abs, native.peak_src, native.peak_err) == (ref.max_abs, ref.peak_src, ref.peak_err)
    mine, theirs = native.result(), ref.result()
    assert mine.band == theirs.band
    xx, xe, ee = exact["xx"], exact["xe"], exact["ee"]
    assert mine.cosine == pytest.approx((xx - xe) / math.sqrt(xx * (xx - 2 * xe + ee)), rel=1e-7)
    assert mine.rel_err == pytest.approx(math.sqrt(ee / xx), rel=1e-7)
    # torch sums in fp32 (torch.dot), whose relative error over ~2e5 terms reaches 1e-5: the torch path's
    # metrics are that far from the exact ones, ours about 1e-8
    assert mine.cosine == pytest.approx(theirs.cosine, rel=1e-5)
    assert mine.rel_err == pytest.approx(theirs.rel_err, rel=1e-4)
    assert mine.mean_abs_err == pytest.approx(theirs.mean_abs_err, rel=1e-5)
    assert mine.max_abs_err == theirs.max_abs_err and mine.peak_err == theirs.peak_err


def test_a_deploy_writes_the_same_bytes_and_verdicts(tmp_path, monkeypatch):
    src = make_tiny_checkpoint(tmp_path / "llama", "llama", dtype=torch.bfloat16, max_shard_size="400KB",
                               hidden_size=256, intermediate_size=384)
    for mode in ("max", "mse"):
        out = {}
        for native in (True, False):
            monkeypatch.setenv("BLOCKPTQ_NATIVE", "1" if native else "0")
            folder = tmp_path / f"{mode}-{native}"
            result = deploy(DeployConfig(str(src), str(folder), "fp8", fp8_mode=mode))
            out[native] = ({f.name: f.read_bytes() for f in sorted(folder.glob("*.safetensors"))}, result.verify)
        (files, verify), (ref_files, ref_verify) = out[True], out[False]
        assert files == ref_files, mode
        assert {k: verify[k] for k in ("checked", "GOOD", "WARN", "FAIL")} == {
            k: ref_verify[k] for k in ("checked", "GOOD", "WARN", "FAIL")}
        assert verify["min_cosine"] == pytest.approx(ref_verify["min_cosine"], rel=1e-6)
