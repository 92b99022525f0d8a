"""Check every written weight against its source, as it is written.

A quantized linear is checked from the tensors written for it: its codes (the
integer values that are stored as ``int8``, or packed for W4) times its
``weight_scale``, compared with the source weight (FP8 sources dequantized as on load) one run of rows at a
time, while both are in memory: cosine similarity, mean and max absolute error,
and the relative error ``||W - W_q|| / ||W||``. The checks of a shard are
recorded with it, so a resumed deploy reports every tensor.

Bands (on the cosine similarity, which is ``~ 1 - rel_err**2 / 2``):

| weights | GOOD           | WARN           | FAIL         |
|---------|----------------|----------------|--------------|
| int8    | >= 0.999       | >= 0.99        | below        |
| int4    | >= 0.98        | >= 0.90        | below        |
| fp8     | >= 0.999       | >= 0.99        | below        |
| bf16    | all finite     | -              | a NaN or inf |

Round-to-nearest of Gaussian weights gives about 0.99997 (int8 per channel) and
0.994 (int4, groups of 128); outlier-heavy rows lose a little more, which WARN
leaves room for. FP8 e4m3 (3 mantissa bits) under absmax tile scales gives about 0.9997 on Gaussian
or real weights; a clip that saturates too many values (a small ``rms`` k, a low percentile) lands
in WARN, which :func:`fp8_recommendations` turns into advice. A broken export (wrong packing, scales
or layout) lands near 0.

An FP8 weight also gets a band on its *peak error*, the largest absolute error over the
tensor's absmax (:data:`FP8_PEAK_BANDS`): a cosine cannot see a clipped outlier, yet the few
largest weights of a tensor can be what the model needs most (SmolLM2's ``down_proj`` rows that
write its massive-activation channel: ``docs/defaults.md``). An unclipped e4m3 cast errs by at most
1/16 of a tile's absmax. When activation statistics chose the scales, both maxima weight each
column by its input channel's rms, so a large weight on a quiet channel may lose what the
statistics say it can.

Any non-finite value is a FAIL. A bf16 weight (an FP8 source dequantized by
``bfloat16``) is the loader's own dequantization of the source, so only its
values are checked.
"""

from __future__ import annotations

import logging
import math
import random
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor

from ..quantization import Workspace
from ..quantization.fp8_native import Fp8ErrorStats

log = logging.getLogger(__name__)

BANDS: dict[int, tuple[float, float]] = {8: (0.999, 0.99), 4: (0.98, 0.90)}
"""bits -> (GOOD at or above, WARN at or above) on the cosine similarity."""
FP8_BANDS: tuple[float, float] = (0.999, 0.99)
"""(GOOD at or above, WARN at or above) on the cosine similarity of an FP8 (e4m3, tile-scaled) weight."""
FP8_PEAK_BANDS: tuple[float, float] = (0.125, 0.5)
"""(GOOD at or below, WARN at or below) on an FP8 weight's peak error, ``max |W - W_q| / max |W|`` (each
column times its input channel's rms when activation statistics chose the scales)."""


@dataclass(frozen=True)
class TensorCheck:
    """The comparison of one written tensor with its source.

    Attributes:
        name: Tensor (bf16) or linear module (quantized) name.
        bits: Code width (4, 8), or 16 for a bf16 weight.
        cosine: Cosine similarity of the flattened tensors.
        rel_err: ``||W - W_q|| / ||W||``.
        mean_abs_err: Mean absolute error.
        max_abs_err: Max absolute error.
        band: ``GOOD``, ``WARN`` or ``FAIL``: the worse of the cosine's band and (fp8) the peak error's.
        fmt: ``int`` codes, or ``fp8`` (e4m3, ``bits`` 8).
        peak_err: fp8: ``max |W - W_q| / max |W|``, columns weighted as :class:`WeightCheck` says (None for
            int codes and bf16).
    """

    name: str
    bits: int
    cosine: float
    rel_err: float
    mean_abs_err: float
    max_abs_err: float
    band: str
    fmt: str = "int"
    peak_err: float | None = None


class WeightCheck:
    """A :class:`TensorCheck` accumulated over the row chunks of one weight.

    Args:
        name: Linear module name (quantized) or tensor name (bf16).
        bits: Code width, or 16 for a bf16 weight.
        workspace: Where the scratch buffer comes from (keep one for many weights).
        fmt: ``int`` codes, or ``fp8`` (its :data:`FP8_BANDS` and :data:`FP8_PEAK_BANDS`).
        peak_weight: fp8: per-input-channel factors ``[in]`` applied to the weight and its error before the
            peak error's two maxima (the input channel rms when activation statistics chose the scales: a
            large weight on a quiet channel may be clipped, as the statistics asked), or None.
    """

    def __init__(self, name: str, bits: int, workspace: Workspace | None = None, fmt: str = "int",
                 peak_weight: Tensor | None = None):
        self.name, self.bits, self.fmt, self.peak_weight = name, bits, fmt, peak_weight
        self.sums = dict.fromkeys(("xx", "xe", "ee", "abs"), 0.0)
        self.count, self.max_abs, self.finite = 0, 0.0, True
        self.peak_src, self.peak_err = 0.0, 0.0  # max |a W| and max |a (W - W_q)| (a = peak_weight, or 1)
        self.workspace = Workspace() if workspace is None else workspace

    @torch.no_grad()
    def update(self, original: Tensor, codes: Tensor, scale: Tensor, *, overwrite: bool = False) -> None:
        """Add a run of rows: the fp32 ``original`` against ``codes * scale``.

        Every statistic is one reduction over the chunk while it is in cache: the
        error ``original - codes * scale`` is formed once, its dot products with
        itself and ``original`` give the norms and the cosine, then its absolute
        values give the mean and max error.

        Args:
            original: Source values, fp32.
            codes: Their integer codes, same shape: ``int8``, or fp32 holding the
                same integers (:attr:`~cores.deploy.pack.WeightChunk.levels`, used without a conversion).
            scale: fp32 scales; each covers ``codes.numel() / scale.numel()`` consecutive codes.
            overwrite: The error may be formed in fp32 ``codes`` (a scratch buffer the caller is
                done with, as the chunk's levels): one buffer less to stream through the cache.
        """
        x = original.reshape(-1)
        groups = (scale.numel(), -1)
        if overwrite and codes.dtype == torch.float32 and codes.is_contiguous():
            error = codes.reshape(-1)
        else:
            error = self.workspace.get("error", x.shape, device=x.device)
            if codes.dtype != torch.float32:  # as floats: torch's mixed-dtype addcmul is several times slower
                codes = error.copy_(codes.reshape(-1))
        torch.addcmul(x.view(groups), codes.reshape(groups), scale.reshape(-1, 1), value=-1, out=error.view(groups))
        self._add(x, error)

    @torch.no_grad()
    def update_error(self, original: Tensor, error: Tensor, columns: slice | None = None) -> None:
        """Add a run of rows, or a rectangle of them: the fp32 ``original`` and its fp32 ``error``
        ``original - W_q`` (made ``|error|`` on the way), both ``[rows, len(columns)]`` row-major.

        Args:
            columns: The weight's input columns the rectangle holds (their :attr:`peak_weight`); None: all.
        """
        self._add(original.reshape(-1), error.reshape(-1), columns)

    def add_stats(self, stats: Fp8ErrorStats) -> None:
        """Add a run's error aggregates, as :meth:`update_error` would from its source and error: the native
        FP8 kernel's (:mod:`cores.quantization.fp8_native`), which never forms the error (its peak error
        already weighted by :attr:`peak_weight`)."""
        s = self.sums
        s["xx"] += stats.xx
        s["xe"] += stats.xe
        s["ee"] += stats.ee
        s["abs"] += stats.abs
        self.count += stats.count
        self.max_abs = max(self.max_abs, stats.max_abs)
        if self.fmt == "fp8":
            self.peak_src = max(self.peak_src, stats.peak_src)
            self.peak_err = max(self.peak_err, stats.peak_err)

    def _add(self, x: Tensor, error: Tensor, columns: slice | None = None) -> None:
        """Accumulate the flat source ``x`` and its error ``x - W_q`` (made ``|error|`` on the way)."""
        s = self.sums
        s["xx"] += float(torch.dot(x, x))
        s["xe"] += float(torch.dot(x, error))
        s["ee"] += float(torch.dot(error, error))
        error.abs_()
        self.max_abs = max(self.max_abs, float(error.amax()))  # NaN propagates to the sums: the check fails
        s["abs"] += float(error.sum())
        self.count += x.numel()
        if self.fmt == "fp8":
            if self.peak_weight is None:
                lo, hi = torch.aminmax(x)  # max |x| without an |x| buffer
                self.peak_src = max(self.peak_src, -float(lo), float(hi))
                self.peak_err = self.max_abs
            else:
                a = (self.peak_weight if columns is None else self.peak_weight[columns]).to(x.device, torch.float32)
                self.peak_src = max(self.peak_src, float((x.view(-1, a.numel()).abs() * a).amax()))
                self.peak_err = max(self.peak_err, float((error.view(-1, a.numel()) * a).amax()))

    @torch.no_grad()
    def update_values(self, values: Tensor) -> None:
        """Add a run of rows of a bf16 weight: only finiteness is checked."""
        lo, hi = torch.aminmax(values)  # a NaN propagates to both
        self.finite &= math.isfinite(float(lo)) and math.isfinite(float(hi))

    def result(self) -> TensorCheck:
        """The metrics and band of everything added."""
        if self.bits == 16:
            return TensorCheck(self.name, 16, 1.0, 0.0, 0.0, 0.0, "GOOD" if self.finite else "FAIL")
        s = self.sums
        xx, xr, rr = s["xx"], s["xx"] - s["xe"], s["xx"] - 2 * s["xe"] + s["ee"]  # r = x - e: the restored weight
        finite = all(math.isfinite(v) for v in (*s.values(), self.max_abs))
        cosine = xr / max(math.sqrt(xx * max(rr, 0.0)), 1e-30) if finite else float("nan")
        good, warn = FP8_BANDS if self.fmt == "fp8" else BANDS[self.bits]
        band = "FAIL" if not finite or not cosine >= warn else "GOOD" if cosine >= good else "WARN"
        peak = None
        if self.fmt == "fp8":
            peak = self.peak_err / max(self.peak_src, 1e-30) if finite else float("nan")
            good, warn = FP8_PEAK_BANDS
            peak_band = "FAIL" if not peak <= warn else "GOOD" if peak <= good else "WARN"
            band = max(band, peak_band, key=("GOOD", "WARN", "FAIL").index)
        return TensorCheck(self.name, self.bits, cosine, math.sqrt(s["ee"]) / max(math.sqrt(xx), 1e-30),
                           s["abs"] / max(self.count, 1), self.max_abs, band, self.fmt, peak)


def sample(names: list[str], n: int | None, seed: int) -> list[str]:
    """All ``names``, or ``n`` of them drawn at random (in their original order)."""
    if n is None or n >= len(names):
        return names
    keep = set(random.Random(seed).sample(names, n))
    return [x for x in names if x in keep]


def summary(checks: list[TensorCheck]) -> dict:
    """Counts per band, worst cosine, and one row per module kind (``q_proj``, ``down_proj`` ...)."""
    kinds: dict[str, list[TensorCheck]] = defaultdict(list)
    for check in checks:
        kinds[check.name.removesuffix(".weight").rsplit(".", 1)[-1]].append(check)
    rows = {
        kind: {"n": len(cs), "min_cosine": min(c.cosine for c in cs),
               "mean_rel_err": sum(c.rel_err for c in cs) / len(cs), "max_abs_err": max(c.max_abs_err for c in cs),
               **({"max_peak_err": max(c.peak_err for c in cs)} if all(c.peak_err is not None for c in cs) else {}),
               **{band: sum(c.band == band for c in cs) for band in ("GOOD", "WARN", "FAIL")}}
        for kind, cs in sorted(kinds.items())
    }
    return {"checked": len(checks), **{band: sum(c.band == band for c in checks) for band in ("GOOD", "WARN", "FAIL")},
            "min_cosine": min((c.cosine for c in checks), default=None), "by_kind": rows}


def log_table(summ: dict, total: int) -> None:
    """Log the per-kind table of :func:`summary`."""
    log.info("verify: %d of %d tensors checked: %d GOOD, %d WARN, %d FAIL", summ["checked"], total, summ["GOOD"],
             summ["WARN"], summ["FAIL"])
    log.info("%-14s %5s %10s %12s %12s %9s %5s %5s %5s", "kind", "n", "min cos", "mean relerr", "max abs err",
             "peak err", "GOOD", "WARN", "FAIL")
    for kind, r in summ["by_kind"].items():
        peak = f"{r['max_peak_err']:9.4f}" if "max_peak_err" in r else f"{'-':>9}"
        log.info("%-14s %5d %10.6f %12.3e %12.3e %s %5d %5d %5d", kind, r["n"], r["min_cosine"], r["mean_rel_err"],
                 r["max_abs_err"], peak, r["GOOD"], r["WARN"], r["FAIL"])


def fp8_recommendations(summ: dict, mode: str, act_aware: bool) -> list[str]:
    """What to change after an FP8 deploy whose :func:`summary` is ``summ`` (an empty list when all is GOOD and
    the mode clips nothing a cosine cannot see).

    Args:
        summ: The verification summary.
        mode: The calibration mode used (``max``, ``rms``, ``percentile``, ``mse``).
        act_aware: Whether activation statistics weighted the scales.
    """
    out = []
    if mode in ("rms", "percentile"):
        out.append(f"{mode} clips every tile's outliers, which the per-tensor cosine hardly sees but a model can "
                   "(SmolLM2-135M: ppl 32.8 bf16, 6466 rms k=6, 403 percentile 99.99, 33.0 mse; the peak-error band "
                   "fails a weight whose largest values lost over half): check the ppl with eval_ppl.py before "
                   "shipping; mse (with --calib_dir) is the safe choice")
    if not summ["WARN"] and not summ["FAIL"]:
        return out
    bad = sorted(k for k, r in summ["by_kind"].items() if r["WARN"] or r["FAIL"])
    where = f"{summ['WARN']} WARN / {summ['FAIL']} FAIL ({', '.join(bad)})"
    advice = {
        "rms": "the rms clip saturates too many values: raise --fp8_k, or use --fp8_mode mse (it never loses to max)",
        "percentile": "the percentile clip saturates too many values: raise --fp8_percentile toward 100, or use "
                      "--fp8_mode mse",
        "mse": "mse already minimises the (weighted) error per tile"
               + (": the weighted objective trades plain error for the loud channels; compare the ppl without "
                  "--calib_dir" if act_aware else "; a weight this far off e4m3 may belong in "
                  "modules_to_not_convert (keep it bf16)"),
        "max": "absmax scales are e4m3's best unclipped cast: a weight this far off is broken or has non-finite "
               "values; check the source",
    }[mode]
    out.append(f"{where}: {advice}")
    if summ["FAIL"]:
        out.append("FAIL tensors would serve visibly wrong outputs: do not ship this checkpoint as it is")
    return out
