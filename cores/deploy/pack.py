"""Pack a quantized weight into its deployed tensors, a run of rows at a time.

The deployed tensors of a linear are those of compressed-tensors
(:mod:`cores.formats.compressed_tensors`): ``weight`` (int8 codes) and ``weight_scale`` for
8 bits; ``weight_packed`` (eight int4 codes per int32 word), ``weight_scale`` and
``weight_shape`` for 4 bits; plus ``input_scale`` (and ``input_zero_point``) of a static
input quantizer. The codes and scales are those of
:meth:`~cores.quantization.quantizers.WeightQuantizer.quantize_groups`, the quantization the
``FROZEN`` forward runs on the whole weight (:meth:`~cores.quantization.quantizers.WeightQuantizer.quantize_weight`),
here run on runs of rows whose buffers are reused from chunk to chunk: no full-size fp32 copy
of the weight is made, the arithmetic stays in cache, and the codes and scales are those of the
whole weight, bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor

from ..quantization import QuantLinear, WeightQuantizer, Workspace, block_size, pack_int4, scale_shape

WEIGHT_CHUNK_ELEMENTS = 1 << 20
"""Values per chunk when a weight is quantized for export (4 MiB fp32 buffers: few enough chunks that the
per-op overhead of torch stays small, small enough to stay in the last-level cache)."""


class WeightChunk(NamedTuple):
    """A run of rows of a weight, quantized (see :func:`iter_weight_chunks`).

    Attributes:
        rows: The rows, of the weight's ``[-1, in]`` view.
        weight: Their values in fp32, ``[n, in]``.
        codes: Their ``int8`` codes, ``[n, in]``.
        levels: The same codes as fp32 values (exactly those of ``codes``), ``[n, in]``: what a check
            of the dequantized weight multiplies without converting ``codes`` again.
        scale_rows: Their scale rows, of the ``[-1, 1]`` view of the scale.
        scale: The fp32 scales of those rows, ``[n_scales, 1]``; each covers ``codes.numel() / n_scales``
            consecutive values of ``codes``.
    """

    rows: slice
    weight: Tensor
    codes: Tensor
    levels: Tensor
    scale_rows: slice
    scale: Tensor


@torch.no_grad()
def iter_weight_chunks(quantizer: WeightQuantizer, weight: Tensor, chunk_elements: int = WEIGHT_CHUNK_ELEMENTS,
                       workspace: Workspace | None = None) -> Iterator[WeightChunk]:
    """Quantize ``weight`` with ``quantizer`` a run of rows at a time (rows of its ``[-1, in]`` view).

    The working set is a few buffers of about ``chunk_elements`` values, reused from chunk to chunk.
    A scale that spans several rows (per tensor) puts them all in one chunk.

    Args:
        quantizer: The weight's quantizer, in the state whose codes to export.
        weight: The float weight (any float dtype; computed in fp32).
        chunk_elements: About how many values one chunk holds.
        workspace: Where the buffers come from (keep one for many weights); None: fresh ones.

    Yields:
        :class:`WeightChunk`; its tensors are overwritten by the next chunk.

    Raises:
        ValueError: When ``weight`` does not have the quantizer's shape.
    """
    quantizer.check_shape(weight)
    rows = weight.reshape(-1, quantizer.shape[-1])
    block = block_size(quantizer.shape, quantizer.granularity)
    step = max(1, chunk_elements // rows.shape[1]) if block <= rows.shape[1] else rows.shape[0]
    size = (min(step, rows.shape[0]), rows.shape[1])
    workspace = Workspace() if workspace is None else workspace
    x32, work = (workspace.get(name, size, device=weight.device) for name in ("weight", "quotient"))
    codes = workspace.get("codes", size, torch.int8, weight.device)
    factors = quantizer.clip_factors()
    offsets = quantizer.rounding_offsets()
    offsets = None if offsets is None else offsets.reshape(-1, quantizer.shape[-1])
    for start in range(0, rows.shape[0], step):
        n = min(step, rows.shape[0] - start)
        x = x32[:n]
        x.copy_(rows[start:start + n])
        first = start * rows.shape[1] // block
        scale_rows = slice(first, first + x.numel() // block)
        _, scale = quantizer.quantize_groups(
            x.view(-1, block), None if factors is None else (factors[0][scale_rows], factors[1][scale_rows]),
            None if offsets is None else offsets[start:start + n].reshape(-1, block),
            out=codes[:n].view(-1, block), work=work[:n].view(-1, block))
        yield WeightChunk(slice(start, start + n), x, codes[:n], work[:n], scale_rows, scale)


def weight_qparam_specs(quantizer: WeightQuantizer) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """``name -> (dtype, shape)`` of the deployed tensors of a weight, in the order
    :func:`iter_weight_qparams` yields them.

    Raises:
        ValueError: For a bit width that has no deployed format here.
    """
    shape = quantizer.shape
    scale = (torch.float32, scale_shape(shape, quantizer.granularity))
    if quantizer.bits == 8:
        return {"weight": (torch.int8, shape), "weight_scale": scale}
    if quantizer.bits == 4:
        return {"weight_packed": (torch.int32, (*shape[:-1], shape[-1] // 8)), "weight_scale": scale,
                "weight_shape": (torch.int64, (len(shape),))}
    raise ValueError(f"no deployed format for {quantizer.bits}-bit weights; use 4 or 8 bits")


@torch.no_grad()
def iter_weight_qparams(quantizer: WeightQuantizer, weight: Tensor, workspace: Workspace | None = None
                        ) -> Iterator[tuple[str, Tensor, WeightChunk | None]]:
    """:func:`weight_qparams` as a stream that never holds the codes whole.

    Yields ``(name, tensor, chunk)``: first the codes (``weight``, or ``weight_packed`` for 4 bits)
    one run of rows at a time (rows of the ``[-1, cols]`` view of the deployed tensor), each with its
    :class:`WeightChunk`; then ``weight_scale`` (and ``weight_shape``) whole, with ``chunk`` None.
    Chunk tensors are overwritten by the next chunk. ``workspace`` is that of
    :func:`iter_weight_chunks` (and of the int4 packing).

    Raises:
        ValueError: For a bit width that has no deployed format here.
    """
    specs = weight_qparam_specs(quantizer)
    codes_name = next(iter(specs))
    scale = torch.empty(specs["weight_scale"][1], device=weight.device)
    workspace = Workspace() if workspace is None else workspace
    for chunk in iter_weight_chunks(quantizer, weight, workspace=workspace):
        scale.view(-1, 1)[chunk.scale_rows] = chunk.scale
        packed = chunk.codes if quantizer.bits == 8 else pack_int4(chunk.codes, workspace, checked=False)
        yield codes_name, packed, chunk
    yield "weight_scale", scale, None
    if quantizer.bits == 4:
        yield "weight_shape", torch.tensor(quantizer.shape, dtype=torch.int64), None


def weight_qparams(quantizer: WeightQuantizer, weight: Tensor) -> dict[str, Tensor]:
    """Deployed tensors of ``weight`` under compressed-tensors names, whole.

    8-bit: ``weight`` (int8) and ``weight_scale``. 4-bit (``pack-quantized``): ``weight_packed``
    (int32), ``weight_scale`` and ``weight_shape``.

    Args:
        quantizer: The weight's quantizer.
        weight: The float weight.

    Returns:
        Tensors keyed by their name inside the module.

    Raises:
        ValueError: For a bit width that has no deployed format here.
    """
    out = {name: torch.empty(shape, dtype=dtype, device=weight.device)
           for name, (dtype, shape) in weight_qparam_specs(quantizer).items()}
    for name, tensor, chunk in iter_weight_qparams(quantizer, weight):
        if chunk is None:
            out[name] = tensor
        else:
            out[name].view(-1, tensor.shape[-1])[chunk.rows] = tensor
    return out


def linear_qparams(linear: QuantLinear) -> dict[str, Tensor]:
    """Deployed tensors of a quantized linear under compressed-tensors names, whole.

    Those of :func:`weight_qparams` for its :meth:`~QuantLinear.export_weight`, plus ``input_scale``
    (and ``input_zero_point``, asymmetric) for a static input quantizer. ``bias`` is not included: it
    ships unchanged (or as :meth:`~QuantLinear.export_bias`).
    """
    qparams = weight_qparams(linear.weight_quantizer, linear.export_weight())
    if linear.input_quantizer is not None:
        qparams.update(linear.input_quantizer.get_qparams())
    return qparams

