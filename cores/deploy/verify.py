"""Check a written checkpoint against its source, tensor by tensor.

Every checked tensor is read back from the written shards, dequantized, and
compared with the source weight (FP8 sources dequantized as on load): cosine
similarity, mean and max absolute error, and the relative error
``||W - W_q|| / ||W||``.

Bands (on the cosine similarity, which is ``~ 1 - rel_err**2 / 2``):

| weights | GOOD           | WARN           | FAIL     |
|---------|----------------|----------------|----------|
| int8    | >= 0.999       | >= 0.99        | below    |
| int4    | >= 0.98        | >= 0.90        | below    |
| bf16    | bit-identical  | -              | any diff |

Round-to-nearest of Gaussian weights gives about 0.99997 (int8 per channel) and
0.994 (int4, groups of 128); outlier-heavy rows lose a little more, which WARN
leaves room for. A broken export (wrong packing, scales or layout) lands near 0.
Any non-finite value is a FAIL.
"""

from __future__ import annotations

import logging
import math
import random
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor

from ..utils.checkpoint import CheckpointReader
from .format import WEIGHT_NAMES, dequantize_codes, weight_codes

log = logging.getLogger(__name__)

BANDS: dict[int, tuple[float, float]] = {8: (0.999, 0.99), 4: (0.98, 0.90)}
"""bits -> (GOOD at or above, WARN at or above) on the cosine similarity."""


@dataclass(frozen=True)
class TensorCheck:
    """The comparison of one written tensor with its source.

    Attributes:
        name: Tensor (bf16) or linear module (quantized) name.
        bits: Code width (4, 8), or 16 for a bf16 copy.
        cosine: Cosine similarity of the flattened tensors.
        rel_err: ``||W - W_q|| / ||W||``.
        mean_abs_err: Mean absolute error.
        max_abs_err: Max absolute error.
        band: ``GOOD``, ``WARN`` or ``FAIL``.
    """

    name: str
    bits: int
    cosine: float
    rel_err: float
    mean_abs_err: float
    max_abs_err: float
    band: str


def compare(name: str, original: Tensor, restored: Tensor, bits: int) -> TensorCheck:
    """Metrics and band of ``restored`` against ``original``."""
    a, b = original.float().flatten(), restored.float().flatten()
    norm_a, norm_b = float(torch.linalg.vector_norm(a)), float(torch.linalg.vector_norm(b))
    cosine = float(torch.dot(a, b)) / max(norm_a * norm_b, 1e-30)
    diff = (b - a).abs_()
    finite = math.isfinite(norm_b)  # one inf or nan in ``restored`` makes its norm inf or nan
    if bits == 16:
        band = "GOOD" if finite and torch.equal(original, restored) else "FAIL"
    else:
        good, warn = BANDS[bits]
        band = "FAIL" if not finite or cosine < warn else "GOOD" if cosine >= good else "WARN"
    return TensorCheck(name, bits, cosine, float(torch.linalg.vector_norm(diff)) / max(norm_a, 1e-30),
                       float(diff.mean()) if diff.numel() else 0.0, float(diff.max()) if diff.numel() else 0.0, band)


def sample(names: list[str], n: int | None, seed: int) -> list[str]:
    """All ``names``, or ``n`` of them drawn at random (in their original order)."""
    if n is None or n >= len(names):
        return names
    keep = set(random.Random(seed).sample(names, n))
    return [x for x in names if x in keep]


def verify_quantized(source: CheckpointReader, output: CheckpointReader, linears: list[str], bits: int,
                     samples: int | None = None, seed: int = 0) -> list[TensorCheck]:
    """Dequantize written linears and compare them with the source weights.

    Args:
        source: The FP checkpoint.
        output: The written checkpoint.
        linears: Full names of the quantized linear modules.
        bits: Weight code width.
        samples: Check this many, drawn at random (None: all).
        seed: Sampling seed.
    """
    checks = []
    for linear in sample(linears, samples, seed):
        stored = output.read([f"{linear}.{n}" for n in WEIGHT_NAMES[bits]])
        restored = dequantize_codes(*weight_codes(stored, linear + ".", bits, str(output.model_dir)))
        checks.append(compare(linear, source.read([linear + ".weight"])[linear + ".weight"], restored, bits))
    return checks


def verify_copies(source: CheckpointReader, output: CheckpointReader, keys: list[str],
                  samples: int | None = None, seed: int = 0) -> list[TensorCheck]:
    """Compare written tensors with the source read as on load (FP8 dequantized): they must be identical."""
    return [compare(k, source.read([k])[k], output.read([k])[k], 16) for k in sample(keys, samples, seed)]


def summary(checks: list[TensorCheck]) -> dict:
    """Counts per band, worst cosine, and one row per module kind (``q_proj``, ``down_proj`` ...)."""
    kinds: dict[str, list[TensorCheck]] = defaultdict(list)
    for check in checks:
        kinds[check.name.removesuffix(".weight").rsplit(".", 1)[-1]].append(check)
    rows = {
        kind: {"n": len(cs), "min_cosine": min(c.cosine for c in cs),
               "mean_rel_err": sum(c.rel_err for c in cs) / len(cs), "max_abs_err": max(c.max_abs_err for c in cs),
               **{band: sum(c.band == band for c in cs) for band in ("GOOD", "WARN", "FAIL")}}
        for kind, cs in sorted(kinds.items())
    }
    return {"checked": len(checks), **{band: sum(c.band == band for c in checks) for band in ("GOOD", "WARN", "FAIL")},
            "min_cosine": min((c.cosine for c in checks), default=None), "by_kind": rows}


def log_table(summ: dict, total: int) -> None:
    """Log the per-kind table of :func:`summary`."""
    log.info("verify: %d of %d tensors checked: %d GOOD, %d WARN, %d FAIL", summ["checked"], total, summ["GOOD"],
             summ["WARN"], summ["FAIL"])
    log.info("%-14s %5s %10s %12s %12s %5s %5s %5s", "kind", "n", "min cos", "mean relerr", "max abs err",
             "GOOD", "WARN", "FAIL")
    for kind, r in summ["by_kind"].items():
        log.info("%-14s %5d %10.6f %12.3e %12.3e %5d %5d %5d", kind, r["n"], r["min_cosine"], r["mean_rel_err"],
                 r["max_abs_err"], r["GOOD"], r["WARN"], r["FAIL"])
