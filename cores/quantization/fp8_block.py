"""FP8 (e4m3) weights with one scale per ``b0 x b1`` tile: the DeepSeek-V3 layout, and how to pick the scales.

A weight ``[out, in]`` is cut into tiles of ``block = (b0, b1)`` (128 x 128 in every
released checkpoint); each tile ``t`` gets one fp32 ``scale_inv[t]`` and its values are
stored as ``float8_e4m3fn(w / scale_inv[t])``, so that ``w ~ fp8 * scale_inv``. Edge tiles
are padded with zeros as DeepSeek's ``weight_quant`` does: the scale grid is
``[ceil(out / b0), ceil(in / b1)]`` and padding never counts (every statistic below
gives it weight 0).

How a tile's clip ``c`` (``scale_inv = c / 448``) is chosen, all vectorised over every
tile of a run of tile rows:

| mode         | clip                                                                      |
|--------------|---------------------------------------------------------------------------|
| `max`        | the tile's absmax (no value saturates; DeepSeek's own cast)               |
| `rms`        | ``min(k * rms, absmax)``                                                  |
| `percentile` | the ``p``-th percentile of ``|w|``, ``min(., absmax)``                    |
| `mse`        | the factor ``f`` of a grid over ``[lo, 1]`` times absmax that minimises    |
|              | the tile's squared error after the e4m3 round trip (f = 1 is on the grid, |
|              | so `mse` is never worse than `max`)                                       |

Activation-aware: with a per-input-channel weight ``a_j`` (the mean square of the
linear's input channel ``j`` on calibration data, normalised to mean 1), every
statistic weights element ``(i, j)`` by ``a_j``: `rms` is the weighted rms,
`percentile` the weighted percentile, `mse` minimises ``sum_ij a_j (w_ij - q_ij)^2``, the
expected output error ``E||x (W - Q)^T||^2`` when input channels are uncorrelated.
`max` has nothing to choose and takes no statistics.

On CPU the codes (and the `max` scales, and a check's error statistics) come from a fused native kernel
(:mod:`cores.quantization.fp8_native`, built at first use; ``BLOCKPTQ_NATIVE=0`` turns it off), byte for byte
those of the torch path below, which CUDA tensors, weights with a NaN or an infinity, and hosts without a C
compiler take.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from .fp8_native import Fp8ErrorStats, encode_tiles, native_usable
from .primitives import FP8_E4M3_MAX

FP8_BLOCK: tuple[int, int] = (128, 128)
FP8_MODES: tuple[str, ...] = ("max", "rms", "percentile", "mse")
MIN_SCALE = 1e-12 / FP8_E4M3_MAX
"""The smallest ``scale_inv`` (an all-zero tile), as the twins of :mod:`blockptq_assets.tiny` always had."""
ACT_FLOOR = 1e-3
"""Floor of a normalised channel weight: a channel silent on the calibration data still counts a little."""


@dataclass(frozen=True)
class Fp8BlockConfig:
    """How the tile scales are chosen.

    Attributes:
        mode: ``max``, ``rms``, ``percentile`` or ``mse``.
        k: ``rms``: the clip in tile rms units.
        percentile: ``percentile``: the clip as a percentile of ``|w|`` (in (0, 100]).
        grid: ``mse``: clip factors tried.
        grid_min: ``mse``: the smallest factor of absmax tried (the grid is ``linspace(grid_min, 1, grid)``).
        block: The tile shape.

    Raises:
        ValueError: On an unknown mode or a value out of range.
    """

    mode: str = "max"
    k: float = 6.0
    percentile: float = 99.99
    grid: int = 20
    grid_min: float = 0.5
    block: tuple[int, int] = FP8_BLOCK

    def __post_init__(self):
        if self.mode not in FP8_MODES:
            raise ValueError(f"unknown FP8 calibration mode {self.mode!r}; valid: {', '.join(FP8_MODES)}")
        if not self.k > 0:
            raise ValueError(f"the rms clip factor k must be positive, got {self.k}")
        if not 0 < self.percentile <= 100:
            raise ValueError(f"the percentile must be in (0, 100], got {self.percentile}")
        if self.grid < 1 or not 0 < self.grid_min <= 1:
            raise ValueError(f"the mse grid needs at least 1 factor in (0, 1], got {self.grid} from {self.grid_min}")
        if len(self.block) != 2 or min(self.block) < 1:
            raise ValueError(f"the FP8 block must be two positive sizes, got {self.block}")

    def describe(self) -> str:
        """``max``, ``rms k=6`` ... for logs and reports."""
        extra = {"rms": f" k={self.k:g}", "percentile": f" p={self.percentile:g}",
                 "mse": f" grid={self.grid} from {self.grid_min:g}"}.get(self.mode, "")
        return self.mode + extra


def scale_grid(out_dim: int, in_dim: int, block: tuple[int, int] = FP8_BLOCK) -> tuple[int, int]:
    """The shape of ``weight_scale_inv`` for a ``[out_dim, in_dim]`` weight: ``ceil`` of each dim by the block."""
    return -(-out_dim // block[0]), -(-in_dim // block[1])


def channel_weights(mean_square: Tensor) -> Tensor:
    """Per-input-channel weights from activation mean squares: mean 1, floored at :data:`ACT_FLOOR`."""
    a = mean_square.float().clamp(min=0)
    mean = a.mean()
    a = a / mean if mean > 0 else torch.ones_like(a)
    return a.clamp(min=ACT_FLOOR)


def _tiles(x: Tensor, block: tuple[int, int]) -> Tensor:
    """``[rows, cols]`` (zero-padded to whole tiles) as ``[tile rows, tile cols, b0 * b1]``."""
    b0, b1 = block
    rows, cols = scale_grid(*x.shape, block)
    if x.shape != (rows * b0, cols * b1):
        padded = x.new_zeros(rows * b0, cols * b1)
        padded[:x.shape[0], :x.shape[1]] = x
        x = padded
    return x.view(rows, b0, cols, b1).permute(0, 2, 1, 3).reshape(rows, cols, b0 * b1)


Rectangle = tuple[slice, slice, tuple[int, int, int, int]]


def _rectangles(shape: tuple[int, int], block: tuple[int, int]) -> list[Rectangle]:
    """``[rows, cols]`` as at most four rectangles of equal tiles (the whole tiles, the ragged last tile column,
    the ragged last tile row, their corner), each ``(rows, cols, [tile rows, tile height, tile cols, tile
    width])``: the shape its slice of a row-major tensor views as without a copy, so that a tile statistic is a
    reduction over dims 1 and 3 and a ``[tile rows, 1, tile cols, 1]`` scale broadcasts over each tile."""
    (b0, b1), (rows, cols) = block, shape
    out = []
    for r0, r1 in ((0, rows // b0 * b0), (rows // b0 * b0, rows)):
        for c0, c1 in ((0, cols // b1 * b1), (cols // b1 * b1, cols)):
            h, w = r1 - r0, c1 - c0
            if h and w:
                t0, t1 = min(b0, h), min(b1, w)
                out.append((slice(r0, r1), slice(c0, c1), (h // t0, t0, w // t1, t1)))
    return out


def _grid(rect: Rectangle, block: tuple[int, int]) -> tuple[slice, slice]:
    """The scale-grid cells of a rectangle of :func:`_rectangles`."""
    rows, cols, (n0, _, n1, _) = rect
    return slice(rows.start // block[0], rows.start // block[0] + n0), slice(cols.start // block[1],
                                                                             cols.start // block[1] + n1)


def _tile_absmax(weight: Tensor, block: tuple[int, int]) -> Tensor:
    """fp32 ``max |w|`` of every tile, reduced in the weight's own dtype (exact for a max): no fp32 copy."""
    out = torch.empty(scale_grid(*weight.shape, block), dtype=torch.float32, device=weight.device)
    for rect in _rectangles(tuple(weight.shape), block):
        v = weight[rect[0], rect[1]].reshape(rect[2])
        out[_grid(rect, block)] = v.abs().amax((1, 3)).float()  # faster than amax and amin, no fp32 copy
    return out


def _element_weights(shape: tuple[int, int], act: Tensor | None, block: tuple[int, int], device) -> Tensor:
    """The weight of each element of :func:`_tiles`: 0 on padding, else ``a_j`` (1 without statistics)."""
    cols = torch.ones(shape[1], device=device) if act is None else act.to(device, torch.float32)
    return _tiles(cols.expand(shape).contiguous(), block)


def fp8_round_trip(x: Tensor, scale_inv: Tensor) -> Tensor:
    """``float8_e4m3fn(x / s) * s`` (saturating at +-448) for tiles ``[..., n]`` with scales ``[...]``."""
    s = scale_inv.unsqueeze(-1)
    return (x / s).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).float().mul_(s)


def _weighted_quantile(values: Tensor, weights: Tensor, q: float) -> Tensor:
    """Per row of ``[T, n]``: the smallest value whose weighted cumulative share reaches ``q``."""
    sorted_v, order = values.sort(dim=-1)
    cum = weights.gather(-1, order).cumsum(-1)
    target = (cum[..., -1:] * q).clamp(min=torch.finfo(torch.float32).tiny)
    idx = torch.searchsorted(cum.contiguous(), target.contiguous()).clamp_(max=values.shape[-1] - 1)
    return sorted_v.gather(-1, idx).squeeze(-1)


@torch.no_grad()
def tile_scales(weight: Tensor, cfg: Fp8BlockConfig = Fp8BlockConfig(), act: Tensor | None = None) -> Tensor:
    """The fp32 ``scale_inv`` of every tile of ``weight`` (see the module for the modes).

    Args:
        weight: ``[rows, in]``, any float dtype; a run of rows of a larger weight must
            start on a tile row (its scales are those rows of the whole weight's).
        cfg: The mode and its settings.
        act: Per-input-channel weights ``[in]`` (:func:`channel_weights`), or None.

    Returns:
        ``[ceil(rows / b0), ceil(in / b1)]`` fp32.

    Raises:
        ValueError: When ``act`` is given to ``max``, or does not match ``in``.
    """
    _check_args(weight, cfg, act)
    return _scales(weight, cfg, act)


def _check_args(weight: Tensor, cfg: Fp8BlockConfig, act: Tensor | None) -> None:
    if weight.dim() != 2:
        raise ValueError(f"FP8 block quantization takes 2-D weights, got shape {tuple(weight.shape)}")
    if act is not None and cfg.mode == "max":
        raise ValueError("mode max has no clip to choose and takes no activation statistics: use rms, "
                         "percentile or mse")
    if act is not None and act.shape != (weight.shape[1],):
        raise ValueError(f"activation statistics of shape {tuple(act.shape)} do not match the weight's "
                         f"{weight.shape[1]} input channels")


def _scales(weight: Tensor, cfg: Fp8BlockConfig, act: Tensor | None) -> Tensor:
    """:func:`tile_scales`, arguments checked: ``max`` straight from the weight's dtype, the modes that weigh
    every element from an fp32 copy in the tile layout (:func:`_tiles`)."""
    if cfg.mode == "max":
        return _tile_absmax(weight, cfg.block).clamp_(min=1e-12) / FP8_E4M3_MAX
    shape = tuple(weight.shape)
    x = _tiles(weight.float(), cfg.block)
    absmax = torch.maximum(x.amax(-1), x.amin(-1).neg_())
    if cfg.mode == "mse":
        wt = None if act is None else _element_weights(shape, act, cfg.block, x.device)
        return _mse_clip(x, wt, absmax, cfg).clamp(min=1e-12) / FP8_E4M3_MAX
    wt = _element_weights(shape, act, cfg.block, x.device)
    if cfg.mode == "rms":
        rms = ((x * x * wt).sum(-1) / wt.sum(-1).clamp(min=1e-30)).sqrt()
        clip = torch.minimum(cfg.k * rms, absmax)
    else:
        clip = _weighted_quantile(x.abs(), wt, cfg.percentile / 100)
    return clip.clamp(min=1e-12) / FP8_E4M3_MAX


def _mse_clip(x: Tensor, wt: Tensor | None, absmax: Tensor, cfg: Fp8BlockConfig) -> Tensor:
    """Per tile, the clip ``f * absmax`` over the grid with the least weighted round-trip error (ties: larger f).

    ``wt`` None weighs every element 1 (padding needs no weight 0: a zero round-trips to zero). Each factor
    costs a few passes over preallocated buffers: divide, clamp, cast to e4m3, the bit-arithmetic cast back
    (:func:`e4m3_to_float`, several times faster than torch's), and one dot product per tile.
    """
    best_err = torch.full_like(absmax, float("inf"))
    best = absmax.clone()
    root_wt = None if wt is None else wt.sqrt()
    scaled, restored = torch.empty_like(x), torch.empty_like(x)
    codes = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    for f in torch.linspace(1.0, cfg.grid_min, cfg.grid).tolist():  # 1 first: a tie keeps the unclipped scale
        clip = absmax * f
        s = clip.clamp(min=1e-12) / FP8_E4M3_MAX
        torch.div(x, s.unsqueeze(-1), out=scaled)  # the error is taken in code units, then scaled by s^2
        codes.copy_(torch.clamp(scaled, -FP8_E4M3_MAX, FP8_E4M3_MAX, out=restored))
        diff = e4m3_to_float(codes, restored).sub_(scaled)
        if root_wt is not None:
            diff.mul_(root_wt)
        err = torch.linalg.vecdot(diff, diff) * s.square()
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, clip, best)
    return best


def e4m3_to_float(codes: Tensor, out: Tensor) -> Tensor:
    """``codes.float()`` into the fp32 ``out`` for finite ``float8_e4m3fn`` codes (what a clamp to +-448 casts).

    Bit arithmetic, several times faster than torch's CPU cast: the byte, sign-extended into an int32, is
    shifted so that exponent and mantissa sit at bits 20..26 (fp32's exponent field starts at bit 23), the
    sign copies at bits 27..30 are masked off (the sign stays at bit 31), and a multiply by ``2**120``
    rebiases the exponent (e4m3's bias 7 to fp32's 127) and turns subnormals, read as fp32 subnormals, into
    their exact values. A NaN code reads as +-480 here (:func:`cores.utils.checkpoint.fp8_e4m3_to_float`
    turns those into NaN).
    """
    bits = out.view(torch.int32)
    bits.copy_(codes.view(torch.int8))  # sign-extended: the sign in bits 7..31
    bits <<= 20  # exponent and mantissa to bits 20..26, sign copies to 27..31
    bits &= -0x78000001  # 0x87FFFFFF: the sign and the 7 bits of exponent and mantissa
    return out.mul_(2.0**120)


@dataclass(frozen=True)
class Fp8Run:
    """One run of tile rows of :func:`iter_quantize_fp8_block`.

    Attributes:
        rows: The weight's rows it covers.
        codes: ``float8_e4m3fn [rows, in]``.
        scale_inv: fp32 ``[tile rows, tile cols]``.
        pieces: With ``errors`` (or ``error_stats`` on the torch path): per rectangle of equal tiles, ``(cols,
            source, error)``, both fp32 ``[rows, cols]`` row-major: the source as read, and ``source - codes *
            scale_inv``; else empty.
        stats: With ``error_stats`` where the native kernel ran: the aggregates of that error (never formed);
            else None.
    """

    rows: slice
    codes: Tensor
    scale_inv: Tensor
    pieces: tuple[tuple[slice, Tensor, Tensor], ...] = ()
    stats: Fp8ErrorStats | None = None


def _encode(weight: Tensor, scale_inv: Tensor, block: tuple[int, int], clip: bool, errors: bool
            ) -> tuple[Tensor, list[tuple[slice, Tensor, Tensor]]]:
    """``float8_e4m3fn(clamp(w / scale_inv[tile], +-448))`` in the weight's row layout, a rectangle of equal tiles
    at a time (each scale broadcast over its tile, nothing padded or permuted); with ``errors`` also each
    rectangle's fp32 source and its error ``source - codes * scale_inv`` (see :class:`Fp8Run`).

    ``clip`` False skips the clamp: with absmax scales ``|w / s|`` exceeds 448 by an fp32 rounding at most,
    which the cast rounds to 448 as the clamp would.
    """
    codes = torch.empty(weight.shape, dtype=torch.float8_e4m3fn, device=weight.device)
    pieces = []
    for rect in _rectangles(tuple(weight.shape), block):
        rows, cols, shape = rect
        s = scale_inv[_grid(rect, block)].float().view(shape[0], 1, shape[2], 1)
        source = weight[rows, cols].reshape(shape).float()  # then divide: bf16 / fp32 is many times slower on CPU
        q = source / s if errors or weight.dtype == torch.float32 else source.div_(s)  # (fp32: source is weight)
        if clip:
            q.clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX)
        out = codes[rows, cols].view(shape)
        out.copy_(q)
        if errors:
            h, w = rows.stop - rows.start, cols.stop - cols.start
            error = torch.addcmul(source, e4m3_to_float(out, q), s, value=-1, out=q)  # w - codes * s
            pieces.append((cols, source.reshape(h, w), error.view(h, w)))
    return codes, pieces


@torch.no_grad()
def quantize_fp8_block(weight: Tensor, cfg: Fp8BlockConfig = Fp8BlockConfig(), act: Tensor | None = None
                       ) -> tuple[Tensor, Tensor]:
    """``(float8_e4m3fn codes [out, in], fp32 scale_inv [ceil(out/b0), ceil(in/b1)])`` of ``weight``.

    Each value is cast as ``float8_e4m3fn(clamp(w / scale_inv[tile], +-448))`` (values past a clip saturate),
    each tile's scale broadcast over it in the weight's own layout (:func:`_encode`).
    """
    _check_args(weight, cfg, act)
    run = _quantize_run(weight, cfg, act, False, False, None)
    return run[0], run[1]


def _quantize_run(weight: Tensor, cfg: Fp8BlockConfig, act: Tensor | None, errors: bool, error_stats: bool,
                  peak_weight: Tensor | None
                  ) -> tuple[Tensor, Tensor, list[tuple[slice, Tensor, Tensor]], Fp8ErrorStats | None]:
    """``(codes, scale_inv, pieces, stats)`` of a run (see :class:`Fp8Run`): the fused native kernel
    (:mod:`cores.quantization.fp8_native`, bit-identical codes and scales) where it takes the weight and no
    ``errors`` pieces are asked for, else (and for a weight with a NaN or an infinity) :func:`_scales` and
    :func:`_encode`."""
    scale_inv = None
    if not errors and native_usable(weight):
        scale_inv = None if cfg.mode == "max" else _scales(weight, cfg, act)
        out = encode_tiles(weight, cfg.block, scale_inv, error_stats, peak_weight)
        if out is not None:
            return out[0], out[1], [], out[2]
    if scale_inv is None:
        scale_inv = _scales(weight, cfg, act)
    codes, pieces = _encode(weight, scale_inv, cfg.block, cfg.mode != "max", errors or error_stats)
    return codes, scale_inv, pieces, None


def tile_row_step(in_dim: int, block: tuple[int, int] = FP8_BLOCK, elements: int = 1 << 22) -> int:
    """Rows per run (whole tile rows) so that a run holds about ``elements`` values."""
    return max(1, elements // (block[0] * max(in_dim, 1))) * block[0]


@torch.no_grad()
def iter_quantize_fp8_block(weight: Tensor, cfg: Fp8BlockConfig = Fp8BlockConfig(), act: Tensor | None = None,
                            elements: int = 1 << 22, errors: bool = False, error_stats: bool = False,
                            peak_weight: Tensor | None = None) -> Iterator[Fp8Run]:
    """:func:`quantize_fp8_block` a run of tile rows at a time (:class:`Fp8Run`).

    Tiles are independent, so the result is that of the whole weight; only a run's buffers exist at a time.
    ``errors`` adds each run's source and error in fp32, for a check (:class:`Fp8Run`), formed while the
    run is in cache. ``error_stats`` asks for what a check keeps of the error: its aggregates
    (:attr:`Fp8Run.stats`, the peak error's columns weighted by ``peak_weight`` ``[in]``) where the native
    kernel runs, else the pieces of ``errors``.
    """
    _check_args(weight, cfg, act)
    step = tile_row_step(weight.shape[1], cfg.block, elements)
    for start in range(0, weight.shape[0], step):
        rows = slice(start, min(start + step, weight.shape[0]))
        codes, scale_inv, pieces, stats = _quantize_run(weight[rows], cfg, act, errors, error_stats, peak_weight)
        yield Fp8Run(rows, codes, scale_inv, tuple(pieces), stats)


def scale_tiles_(values: Tensor, scale_inv: Tensor, block: tuple[int, int] = FP8_BLOCK) -> Tensor:
    """``values *= scale_inv`` broadcast over each tile, in place (``[rows, in]`` fp32, a run starting on a tile
    row; ``scale_inv`` its tile rows)."""
    for rect in _rectangles(tuple(values.shape), block):
        shape = rect[2]
        values[rect[0], rect[1]].view(shape).mul_(scale_inv[_grid(rect, block)].float().view(shape[0], 1,
                                                                                             shape[2], 1))
    return values


def dequantize_tiles(codes: Tensor, scale_inv: Tensor, block: tuple[int, int] = FP8_BLOCK) -> Tensor:
    """fp32 ``codes * scale_inv`` broadcast over each tile (``[rows, in]``, a run starting on a tile row).

    ``float8_e4m3fn`` codes are widened by :func:`e4m3_to_float` (finite codes, several times faster than
    torch's cast; a NaN code, which no quantizer here writes, would read as a finite value).
    """
    if codes.dtype == torch.float8_e4m3fn:
        values = e4m3_to_float(codes, torch.empty(codes.shape, dtype=torch.float32, device=codes.device))
    else:
        values = codes.float()
    return scale_tiles_(values, scale_inv, block)


def weighted_error(weight: Tensor, restored: Tensor, act: Tensor | None = None) -> float:
    """``sum_ij a_j (w_ij - r_ij)^2 / sum_ij a_j w_ij^2``: the relative output error under channel weights ``a``."""
    a = torch.ones(weight.shape[1]) if act is None else act.float()
    err = (weight.float() - restored.float()).square().mul(a).sum()
    return float(err / weight.float().square().mul(a).sum().clamp(min=1e-30))
