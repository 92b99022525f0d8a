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
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

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
    return _tile_scales(_tiles(weight.float(), cfg.block), tuple(weight.shape), cfg, act)


def _check_args(weight: Tensor, cfg: Fp8BlockConfig, act: Tensor | None) -> None:
    if weight.dim() != 2:
        raise ValueError(f"FP8 block quantization takes 2-D weights, got shape {tuple(weight.shape)}")
    if act is not None and cfg.mode == "max":
        raise ValueError("mode max has no clip to choose and takes no activation statistics: use rms, "
                         "percentile or mse")
    if act is not None and act.shape != (weight.shape[1],):
        raise ValueError(f"activation statistics of shape {tuple(act.shape)} do not match the weight's "
                         f"{weight.shape[1]} input channels")


def _tile_scales(x: Tensor, shape: tuple[int, int], cfg: Fp8BlockConfig, act: Tensor | None) -> Tensor:
    """:func:`tile_scales` of the tiles ``x`` (:func:`_tiles`) of a ``shape`` weight, arguments checked."""
    absmax = torch.maximum(x.amax(-1), x.amin(-1).neg_())
    if cfg.mode == "max":
        return absmax.clamp(min=1e-12) / FP8_E4M3_MAX
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
    (:func:`_e4m3_to_float`, several times faster than torch's), and one dot product per tile.
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
        diff = _e4m3_to_float(codes, restored).sub_(scaled)
        if root_wt is not None:
            diff.mul_(root_wt)
        err = torch.linalg.vecdot(diff, diff) * s.square()
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, clip, best)
    return best


def _e4m3_to_float(codes: Tensor, out: Tensor) -> Tensor:
    """``codes.float()`` into ``out`` for finite ``float8_e4m3fn`` codes (what a clamp to +-448 casts): the
    bit arithmetic of :func:`cores.utils.checkpoint.fp8_e4m3_to_float`, without its NaN pass."""
    bits = out.view(torch.int32)
    bits.copy_(codes.view(torch.uint8))
    bits <<= 24
    bits >>= 4
    bits &= -0x78000001  # 0x87FFFFFF: the sign and the 7 bits of exponent and mantissa
    return out.mul_(2.0**120)


def _tile_view(x: Tensor, scale_inv: Tensor, block: tuple[int, int]) -> tuple[Tensor, Tensor] | None:
    """``x`` as ``[R, b0, C, b1]`` and ``scale_inv`` as ``[R, 1, C, 1]`` (a broadcast, nothing copied) when
    ``x`` is whole tiles; None for a ragged edge."""
    b0, b1 = block
    rows, cols = x.shape
    if rows % b0 or cols % b1 or not x.is_contiguous():
        return None
    return x.view(rows // b0, b0, cols // b1, b1), scale_inv.float().view(rows // b0, 1, cols // b1, 1)


def _full_scales(scale_inv: Tensor, shape: torch.Size, block: tuple[int, int]) -> Tensor:
    b0, b1 = block
    return scale_inv.float().repeat_interleave(b0, 0)[:shape[0]].repeat_interleave(b1, 1)[:, :shape[1]]


@torch.no_grad()
def quantize_fp8_block(weight: Tensor, cfg: Fp8BlockConfig = Fp8BlockConfig(), act: Tensor | None = None
                       ) -> tuple[Tensor, Tensor]:
    """``(float8_e4m3fn codes [out, in], fp32 scale_inv [ceil(out/b0), ceil(in/b1)])`` of ``weight``.

    Each value is cast as ``float8_e4m3fn(clamp(w / scale_inv[tile], +-448))`` (values past a clip saturate), in
    the tile layout the scales were chosen in (no full-size scale tensor), then laid back out as rows: a
    one-byte copy.
    """
    _check_args(weight, cfg, act)
    x = _tiles(weight.float(), cfg.block)
    scale_inv = _tile_scales(x, tuple(weight.shape), cfg, act)
    codes = (x / scale_inv.unsqueeze(-1)).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    (b0, b1), (rows, cols) = cfg.block, scale_inv.shape
    codes = codes.view(rows, cols, b0, b1).permute(0, 2, 1, 3).reshape(rows * b0, cols * b1)
    return codes[:weight.shape[0], :weight.shape[1]].contiguous(), scale_inv


def tile_row_step(in_dim: int, block: tuple[int, int] = FP8_BLOCK, elements: int = 1 << 22) -> int:
    """Rows per run (whole tile rows) so that a run holds about ``elements`` values."""
    return max(1, elements // (block[0] * max(in_dim, 1))) * block[0]


def iter_quantize_fp8_block(weight: Tensor, cfg: Fp8BlockConfig = Fp8BlockConfig(), act: Tensor | None = None,
                            elements: int = 1 << 22) -> Iterator[tuple[slice, Tensor, Tensor, Tensor]]:
    """:func:`quantize_fp8_block` a run of tile rows at a time: ``(rows, those rows in fp32, their codes, their
    scale rows)``.

    Tiles are independent, so the result is that of the whole weight; only a run is in fp32 at a time (cast
    once, for the scales, the codes and the caller's check).
    """
    step = tile_row_step(weight.shape[1], cfg.block, elements)
    for start in range(0, weight.shape[0], step):
        rows = slice(start, min(start + step, weight.shape[0]))
        w32 = weight[rows].float()
        codes, scale_inv = quantize_fp8_block(w32, cfg, act)
        yield rows, w32, codes, scale_inv


def dequantize_tiles(codes: Tensor, scale_inv: Tensor, block: tuple[int, int] = FP8_BLOCK) -> Tensor:
    """fp32 ``codes * scale_inv`` broadcast over each tile (``[rows, in]``, a run starting on a tile row).

    ``float8_e4m3fn`` codes are widened by :func:`_e4m3_to_float` (finite codes, several times faster than
    torch's cast; a NaN code, which no quantizer here writes, would read as a finite value).
    """
    if codes.dtype == torch.float8_e4m3fn:
        values = _e4m3_to_float(codes, torch.empty(codes.shape, dtype=torch.float32, device=codes.device))
    else:
        values = codes.float()
    tiles = _tile_view(values, scale_inv, block)
    if tiles is None:
        return values.mul_(_full_scales(scale_inv, values.shape, block))
    tiles[0].mul_(tiles[1])
    return values


def weighted_error(weight: Tensor, restored: Tensor, act: Tensor | None = None) -> float:
    """``sum_ij a_j (w_ij - r_ij)^2 / sum_ij a_j w_ij^2``: the relative output error under channel weights ``a``."""
    a = torch.ones(weight.shape[1]) if act is None else act.float()
    err = (weight.float() - restored.float()).square().mul(a).sum()
    return float(err / weight.float().square().mul(a).sum().clamp(min=1e-30))
