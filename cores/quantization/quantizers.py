"""Quantizer modules: fake quantization with learnable clipping and an explicit state.

Every quantizer follows one small interface:

- ``forward(x)`` dispatches on :class:`QuantState`: identity in ``FLOAT``,
  ``observe(x)`` then identity in ``CALIBRATE``, :meth:`Quantizer.fake_quant` in
  ``FAKE_QUANT`` and ``FROZEN`` (learned parameters detached in ``FROZEN``);
- ``observe(x)`` records calibration ranges (a no-op where the range comes from the
  input itself);
- ``fake_quant(x)`` runs in fp32 and returns ``x.dtype``;
- ``get_qparams()`` returns exactly what the deployed checkpoint stores.

Learnable clipping (weights: LWC, static activations and KV cache: LAC) multiplies
an observed range by :func:`~cores.quantization.primitives.sigmoid_clip`, which is
exactly 1.0 at initialisation, so a fresh quantizer reproduces round-to-nearest
absmax bit for bit.
"""

from __future__ import annotations

import abc
import enum
import math
from collections.abc import Iterator, Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from cores.quantization.primitives import (
    FP8_E4M3_MAX,
    FP8_MIN_SCALE,
    SCALE_EPS,
    Granularity,
    Workspace,
    block_size,
    compute_scale_zp,
    dequantize,
    fake_quantize,
    fake_quantize_fp8,
    fp8_row_scales,
    from_groups,
    group_range,
    int_range,
    pack_int4,
    per_token,
    quantize,
    scale_shape,
    sigmoid_clip,
    to_groups,
)

LWC_INIT_LOGIT = 0.0
"""Initial logit of the LWC bounds; the factor starts at exactly 1 and ranges over (0, 2).

OmniQuant starts its bounds at ``sigmoid(4.0)``, where the slope is 0.018: at our
budgets (a few hundred AdamW steps at most) the clip barely moves from there. At the
steepest point (slope 0.5) the same steps reach the clips W4 needs: on SmolLM2
(w4a8c8 dynamic, g64, 8 x 256 tokens, 4 epochs, lr 1e-2) the block MSE fell to
0.63-0.87 x RTN on six blocks, against 0.98-0.99 x from a logit of 4.0."""

LAC_INIT_LOGIT = 0.0
"""Initial logit of the LAC clip; the factor starts at exactly 1 and ranges over (0, 2).

Activations need large clips (massive-activation outliers put the absmax of a
``down_proj`` input 50-100x above a typical token's), so the clip starts where the
sigmoid is steepest: slope 0.5 instead of 0.018 at OmniQuant's 4.0. On SmolLM2 block 10
(w8a8c16, static, 4 epochs) this takes the block MSE from 0.40 (RTN) to 0.23,
where a logit of 4.0 reached only 0.39."""

ROUND_OFFSET_DTYPE = torch.bfloat16
"""Dtype of learned rounding offsets outside training: the frozen forward, the param file and deploy
all use these values (offsets in [-0.5, 0.5] keep 8 significant bits, 2**-9 near 0.5)."""

CLIP_GRID = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.15, 0.1, 0.05)
"""Clip factors of the static-range search (:meth:`ActQuantizer.start_clip_search`)."""

ActMode = Literal["static", "dynamic"]
ActFormat = Literal["int8", "fp8"]
KVFormat = Literal["int8", "fp8"]


WEIGHT_CHUNK_ELEMENTS = 1 << 20
"""Values per chunk when a weight is quantized for export (4 MiB fp32 buffers: few enough chunks that the
per-op overhead of torch stays small, small enough to stay in the last-level cache)."""


class WeightChunk(NamedTuple):
    """A run of rows of a weight, quantized (see :meth:`WeightQuantizer.iter_chunks`).

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


class QuantState(enum.Enum):
    """Lifecycle of a quantized module.

    Attributes:
        FLOAT: Full-precision forward; quantizers are bypassed.
        CALIBRATE: Full-precision forward while static quantizers observe ranges.
        FAKE_QUANT: Training-time fake quantization; clipping parameters get gradients.
        FROZEN: Parameters fixed; the quantized weight is computed once and cached.
    """

    FLOAT = "float"
    CALIBRATE = "calibrate"
    FAKE_QUANT = "fake_quant"
    FROZEN = "frozen"


class Quantizer(nn.Module, abc.ABC):
    """Base class: the state machine and the observe / fake-quant dispatch."""

    def __init__(self) -> None:
        super().__init__()
        self.state = QuantState.FLOAT

    def set_state(self, state: QuantState) -> None:
        """Move to ``state``.

        Args:
            state: The new state.
        """
        self.state = state

    def observe(self, x: Tensor) -> None:
        """Record calibration statistics of ``x``; nothing to record by default."""

    @abc.abstractmethod
    def fake_quant(self, x: Tensor) -> Tensor:
        """Quantize-dequantize ``x`` in fp32; returns ``x.dtype``."""

    def learnable_parameters(self) -> list[nn.Parameter]:
        """The clipping parameters an optimizer should train."""
        return list(self.parameters())

    def forward(self, x: Tensor) -> Tensor:
        if self.state is QuantState.FLOAT:
            return x
        if self.state is QuantState.CALIBRATE:
            self.observe(x)
            return x
        return self.fake_quant(x)

    def _learned(self, param: Tensor) -> Tensor:
        """``param`` in fp32, detached while frozen."""
        param = param.float()
        return param.detach() if self.state is QuantState.FROZEN else param

    def extra_repr(self) -> str:
        return f"state={self.state.value}"


class WeightQuantizer(Quantizer):
    """Symmetric integer weight quantizer with optional learnable weight clipping.

    With ``lwc=True`` (OmniQuant LWC) each scale row (output channel, or group for
    group granularity) has logits ``upbound_factor`` and ``lowbound_factor``; the
    row's max and min are multiplied by ``sigmoid_clip`` of them before the absmax
    scale is taken. At initialisation both factors are exactly 1, so the result is
    plain round-to-nearest absmax quantization (RTN), which is also what
    ``lwc=False`` computes.

    With ``learn_rounding=True`` (SignRound-style) every weight has an offset
    ``round_offset`` in [-0.5, 0.5], zero at init, added to ``w / scale`` before the
    round; it learns jointly with the clips (straight-through gradient). Outside
    ``FAKE_QUANT`` the offsets are used as :data:`ROUND_OFFSET_DTYPE` values, the
    ones the param dir stores, so the frozen forward, the export and the deployed
    codes agree bit for bit.

    Args:
        shape: Weight shape ``[..., out, in]``.
        bits: Code width (2..8).
        granularity: Per-channel or per-group (any :class:`Granularity` works).
        lwc: Learn clipping bounds.
        device: Device of the clipping parameters.
        fp8_scales: Put the group scales of each output row on the grid vLLM's W4A8-FP8
            kernels hold them in (:func:`~cores.quantization.primitives.fp8_row_scales`), and
            round the codes with those scales.
        learn_rounding: Learn a rounding offset per weight.

    Raises:
        ValueError: When the group size does not divide the input dim.
    """

    def __init__(
        self,
        shape: Sequence[int],
        bits: int,
        granularity: Granularity,
        lwc: bool = False,
        device: torch.device | str | None = None,
        fp8_scales: bool = False,
        learn_rounding: bool = False,
    ) -> None:
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        self.bits = bits
        self.granularity = granularity
        self.qmin, self.qmax = int_range(bits)
        self.lwc = lwc
        self.fp8_scales = fp8_scales
        self.groups_per_row = self.shape[-1] // block_size(self.shape, granularity)
        n_rows = math.prod(self.shape) // block_size(self.shape, granularity)
        for name in ("upbound_factor", "lowbound_factor"):
            param = nn.Parameter(torch.full((n_rows, 1), LWC_INIT_LOGIT, device=device)) if lwc else None
            self.register_parameter(name, param)
        self.learn_rounding = learn_rounding
        offset = nn.Parameter(torch.zeros(self.shape, device=device)) if learn_rounding else None
        self.register_parameter("round_offset", offset)

    def _offsets(self) -> Tensor | None:
        """Rounding offsets in [-0.5, 0.5] (fp32, weight-shaped); stored-dtype values unless training."""
        if not self.learn_rounding:
            return None
        offset = self.round_offset
        if self.state is not QuantState.FAKE_QUANT:
            offset = offset.detach().to(ROUND_OFFSET_DTYPE)
        return offset.float().clamp(-0.5, 0.5)

    def _clip_factors(self) -> tuple[Tensor, Tensor] | None:
        """LWC factors ``(upper, lower)`` of every scale row, computed on the whole parameters."""
        if not self.lwc:
            return None
        return (sigmoid_clip(self._learned(self.upbound_factor), LWC_INIT_LOGIT),
                sigmoid_clip(self._learned(self.lowbound_factor), LWC_INIT_LOGIT))

    def _scale_zp(self, groups: Tensor, factors: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
        """Scale and zero-point of ``groups`` (scale rows), ``factors`` the LWC factors of these rows.

        Every step is elementwise on the rows, so any run of rows gets the scales
        the whole weight gives them, bit for bit.
        """
        lo = groups.amin(dim=-1, keepdim=True)
        hi = groups.amax(dim=-1, keepdim=True)
        if factors is not None:
            hi = hi * factors[0]
            lo = lo * factors[1]
        scale, zero_point = compute_scale_zp(lo, hi, self.bits, symmetric=True)
        if self.fp8_scales:
            scale = fp8_row_scales(scale.view(-1, self.groups_per_row)).view(scale.shape)
        return scale, zero_point

    def _groups(self, weight: Tensor) -> Tensor:
        self._check_shape(weight)
        return to_groups(weight.float(), self.granularity)

    def _check_shape(self, weight: Tensor) -> None:
        if tuple(weight.shape) != self.shape:
            raise ValueError(f"weight shape {tuple(weight.shape)} does not match quantizer shape {self.shape}")

    def fake_quant(self, x: Tensor) -> Tensor:
        groups = self._groups(x)
        scale, zero_point = self._scale_zp(groups, self._clip_factors())
        offsets = self._offsets()
        offsets = None if offsets is None else to_groups(offsets, self.granularity)
        out = fake_quantize(groups, scale, zero_point, self.qmin, self.qmax, offset=offsets)
        return from_groups(out, x.shape).to(x.dtype)

    @torch.no_grad()
    def iter_chunks(self, weight: Tensor, chunk_elements: int = WEIGHT_CHUNK_ELEMENTS,
                    workspace: Workspace | None = None) -> Iterator[WeightChunk]:
        """Quantize ``weight`` a run of rows at a time (rows of its ``[-1, in]`` view).

        The working set is a few buffers of about ``chunk_elements`` values, reused
        from chunk to chunk: no full-size fp32 copy of the weight is made and the
        arithmetic runs in cache. Codes and scales are bit-identical to
        :meth:`fake_quant`'s.

        Args:
            weight: The float weight (any float dtype; computed in fp32).
            chunk_elements: About how many values one chunk holds.
            workspace: Where the buffers come from (keep one for many weights); None: fresh ones.

        Yields:
            :class:`WeightChunk`; its tensors are overwritten by the next chunk.
        """
        self._check_shape(weight)
        rows = weight.reshape(-1, self.shape[-1])
        block = block_size(self.shape, self.granularity)
        # a scale spanning several rows (per-tensor) needs them all in one chunk
        step = max(1, chunk_elements // rows.shape[1]) if block <= rows.shape[1] else rows.shape[0]
        size = (min(step, rows.shape[0]), rows.shape[1])
        workspace = Workspace() if workspace is None else workspace
        x32, work = (workspace.get(name, size, device=weight.device) for name in ("weight", "quotient"))
        codes = workspace.get("codes", size, torch.int8, weight.device)
        factors = self._clip_factors()
        offsets = self._offsets()
        offsets = None if offsets is None else offsets.reshape(-1, self.shape[-1])
        for start in range(0, rows.shape[0], step):
            n = min(step, rows.shape[0] - start)
            x = x32[:n]
            x.copy_(rows[start:start + n])
            groups = x.view(-1, block)
            first = start * rows.shape[1] // block
            scale_rows = slice(first, first + groups.shape[0])
            scale, _ = self._scale_zp(groups, None if factors is None else
                                      (factors[0][scale_rows], factors[1][scale_rows]))
            # symmetric; unclipped absmax scales keep every |x / scale| within qmax: no clamp needed
            offset = None if offsets is None else offsets[start:start + n].reshape(-1, block)
            quantize(groups, scale, None, self.qmin, self.qmax, out=codes[:n].view(-1, block),
                     work=work[:n].view(-1, block), clamp=factors is not None or self.fp8_scales or offset is not None,
                     offset=offset)
            yield WeightChunk(slice(start, start + n), x, codes[:n], work[:n], scale_rows, scale)

    @torch.no_grad()
    def quantize_weight(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        """Integer codes and scale of ``weight``, as deployed.

        Args:
            weight: The float weight.

        Returns:
            ``(codes, scale)``: ``int8`` codes shaped like ``weight`` and the fp32
            scale in compressed-tensors layout (``[out, 1]`` per channel,
            ``[out, in // g]`` per group).
        """
        codes = torch.empty(self.shape, dtype=torch.int8, device=weight.device)
        scale = torch.empty(scale_shape(self.shape, self.granularity), device=weight.device)
        for chunk in self.iter_chunks(weight):
            codes.view(-1, self.shape[-1])[chunk.rows] = chunk.codes
            scale.view(-1, 1)[chunk.scale_rows] = chunk.scale
        return codes, scale

    def dequantize_weight(self, codes: Tensor, scale: Tensor) -> Tensor:
        """fp32 weight a serving engine reconstructs from ``(codes, scale)``.

        Bit-identical to :meth:`fake_quant` of the weight the codes came from.

        Args:
            codes: ``int8`` codes from :meth:`quantize_weight`.
            scale: Scale from :meth:`quantize_weight`.

        Returns:
            The dequantized fp32 weight.
        """
        scale = scale.float().reshape(-1, 1)
        groups = dequantize(to_groups(codes, self.granularity), scale, torch.zeros_like(scale))
        return from_groups(groups, self.shape)

    def qparam_specs(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """``name -> (dtype, shape)`` of the deployed tensors, in the order :meth:`iter_qparams` yields them.

        Raises:
            ValueError: For a bit width that has no deployed format here.
        """
        scale = (torch.float32, scale_shape(self.shape, self.granularity))
        if self.bits == 8:
            return {"weight": (torch.int8, self.shape), "weight_scale": scale}
        if self.bits == 4:
            return {"weight_packed": (torch.int32, (*self.shape[:-1], self.shape[-1] // 8)), "weight_scale": scale,
                    "weight_shape": (torch.int64, (len(self.shape),))}
        raise ValueError(f"no deployed format for {self.bits}-bit weights; use 4 or 8 bits")

    @torch.no_grad()
    def iter_qparams(self, weight: Tensor, workspace: Workspace | None = None
                     ) -> Iterator[tuple[str, Tensor, WeightChunk | None]]:
        """:meth:`get_qparams` as a stream that never holds the codes whole.

        Yields ``(name, tensor, chunk)``: first the codes (``weight``, or
        ``weight_packed`` for 4 bits) one run of rows at a time (rows of the
        ``[-1, cols]`` view of the deployed tensor), each with its
        :class:`WeightChunk`; then ``weight_scale`` (and ``weight_shape``) whole,
        with ``chunk`` None. Chunk tensors are overwritten by the next chunk.
        ``workspace`` is that of :meth:`iter_chunks` (and of the int4 packing).

        Raises:
            ValueError: For a bit width that has no deployed format here.
        """
        specs = self.qparam_specs()
        codes_name = next(iter(specs))
        scale = torch.empty(specs["weight_scale"][1], device=weight.device)
        workspace = Workspace() if workspace is None else workspace
        for chunk in self.iter_chunks(weight, workspace=workspace):
            scale.view(-1, 1)[chunk.scale_rows] = chunk.scale
            yield codes_name, chunk.codes if self.bits == 8 else pack_int4(chunk.codes, workspace, checked=False), chunk
        yield "weight_scale", scale, None
        if self.bits == 4:
            yield "weight_shape", torch.tensor(self.shape, dtype=torch.int64), None

    def get_qparams(self, weight: Tensor) -> dict[str, Tensor]:
        """Deployed tensors for ``weight`` under compressed-tensors names.

        8-bit: ``weight`` (int8) and ``weight_scale``. 4-bit (``pack-quantized``):
        ``weight_packed`` (int32), ``weight_scale`` and ``weight_shape``.

        Args:
            weight: The float weight.

        Returns:
            Tensors keyed by their name inside the module.

        Raises:
            ValueError: For a bit width that has no deployed format here.
        """
        out = {name: torch.empty(shape, dtype=dtype, device=weight.device)
               for name, (dtype, shape) in self.qparam_specs().items()}
        for name, tensor, chunk in self.iter_qparams(weight):
            if chunk is None:
                out[name] = tensor
            else:
                out[name].view(-1, tensor.shape[-1])[chunk.rows] = tensor
        return out

    def extra_repr(self) -> str:
        return (
            f"shape={self.shape}, bits={self.bits}, granularity={self.granularity}, lwc={self.lwc}, "
            f"fp8_scales={self.fp8_scales}, learn_rounding={self.learn_rounding}, "
            f"{super().extra_repr()}"
        )


class ActQuantizer(Quantizer):
    """Activation quantizer: int8 static per-tensor or dynamic per-token, or fp8 dynamic per-token.

    ``dynamic``: the per-token absmax scale is recomputed on every call, as the
    serving engine does at run time; nothing is observed, learned or exported.
    With ``fmt="fp8"`` the token is cast to float8-e4m3 at scale ``absmax / 448``
    (floored at :data:`FP8_MIN_SCALE`), as vLLM's W4A8-FP8 linears do.
    ``static``: one per-tensor scale from the running absmax observed in
    ``CALIBRATE``; with ``lac=True`` a learnable clip (logit ``clip_factor``,
    exactly 1 at init) multiplies that absmax. The exported ``input_scale`` is
    the very scale :meth:`fake_quant` uses.

    ``symmetric=False`` (static int8 only) keeps the two ends apart: ``absmax`` holds
    ``[max(-x), max(x)]`` (each at least 0, so the range holds 0), the clip search scales
    both, LAC learns one clip per end, and ``[-lo, hi]`` maps onto ``qmin..qmax`` with a
    zero point (:func:`compute_scale_zp`), exported as ``input_scale`` and ``input_zero_point``.
    A one-sided range (the input of ``down_proj`` after a massive activation, say) then
    gets up to twice the resolution of the symmetric one.

    Args:
        bits: Code width (2..8).
        mode: ``"static"`` or ``"dynamic"``.
        lac: Learn the clip of a static scale.
        device: Device of the calibration buffer and clip parameter.
        fmt: ``"int8"`` codes, or ``"fp8"`` (dynamic mode only).
        symmetric: False: a static range with a zero point.

    Raises:
        ValueError: On an unknown mode or format, ``lac`` with a dynamic mode, fp8 with a static one, or an
            asymmetric dynamic or fp8 one.
    """

    def __init__(
        self,
        bits: int = 8,
        mode: ActMode = "static",
        lac: bool = False,
        device: torch.device | str | None = None,
        fmt: ActFormat = "int8",
        symmetric: bool = True,
    ) -> None:
        super().__init__()
        if not symmetric and (mode != "static" or fmt != "int8"):
            raise ValueError(f"a zero point is for static int8 activations; got {mode!r} {fmt!r}")
        if mode not in ("static", "dynamic"):
            raise ValueError(f"activation mode must be 'static' or 'dynamic', got {mode!r}")
        if fmt not in ("int8", "fp8") or (fmt == "fp8" and mode != "dynamic"):
            raise ValueError(f"activation format must be 'int8', or 'fp8' with a dynamic mode; got {fmt!r}, {mode!r}")
        if lac and mode == "dynamic":
            raise ValueError(
                "learned activation clipping needs a static scale; a dynamic scale is recomputed at run time"
            )
        self.bits = bits
        self.mode = mode
        self.fmt = fmt
        self.lac = lac
        self.symmetric = symmetric
        self.qmin, self.qmax = int_range(bits)
        static = mode == "static"
        ends = 1 if symmetric else 2
        self.register_buffer("absmax", torch.zeros(ends, device=device) if static else None)
        clip = nn.Parameter(torch.full((ends,), LAC_INIT_LOGIT, device=device)) if lac else None
        self.register_parameter("clip_factor", clip)
        self.register_buffer("clip_err", None, persistent=False)

    def set_state(self, state: QuantState) -> None:
        """Move to ``state``; a static quantizer must be calibrated before it quantizes.

        Raises:
            RuntimeError: When entering ``FAKE_QUANT``/``FROZEN`` with no observed range.
        """
        if (
            self.mode == "static"
            and state in (QuantState.FAKE_QUANT, QuantState.FROZEN)
            and not bool(self.absmax.max() > 0)
        ):
            raise RuntimeError(
                f"{type(self).__name__}: no range observed (absmax is 0); run CALIBRATE on data that "
                "reaches this module first (an MoE expert that saw no calibration tokens needs a fallback range)"
            )
        super().set_state(state)

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        """Fold ``max |x|`` into the running absmax (static mode only); while searching, score the clips."""
        if self.mode != "static" or x.numel() == 0:
            return
        if self.clip_err is None:
            if self.symmetric:
                seen = x.detach().abs().amax().float()
            else:
                lo, hi = torch.aminmax(x.detach())
                seen = torch.stack((-lo, hi)).float().clamp(min=0)
            self.absmax.copy_(torch.maximum(self.absmax, seen))
            return
        x32 = x.detach().float()
        for i, factor in enumerate(CLIP_GRID):
            self.clip_err[i] += (self._fake_quant_at(x32, self.absmax.float() * factor) - x32).pow(2).sum()

    def start_clip_search(self) -> None:
        """Score every clip of :data:`CLIP_GRID` (times the observed absmax) on the next calibration pass."""
        self.clip_err = torch.zeros(len(CLIP_GRID), dtype=torch.float64, device=self.absmax.device)

    @torch.no_grad()
    def finish_clip_search(self) -> float:
        """Take the clip with the least quantization MSE (into the learnable logit, else the range); returns it."""
        factor = CLIP_GRID[int(self.clip_err.argmin())]
        self.clip_err = None
        if self.lac:  # sigmoid_clip(logit) = sigmoid(logit) / sigmoid(LAC_INIT_LOGIT)
            half = factor * float(torch.sigmoid(torch.tensor(LAC_INIT_LOGIT)))
            self.clip_factor.fill_(math.log(half / (1 - half)))
        else:
            self.absmax.mul_(factor)
        return factor

    def _range_qparams(self, absmax: Tensor) -> tuple[Tensor, Tensor]:
        """``(scale [1], zero_point [1])`` of a static range: ``absmax`` ``[1]``, or ``[-lo, hi]`` asymmetric."""
        if self.symmetric:
            return compute_scale_zp(-absmax, absmax, self.bits)
        return compute_scale_zp(-absmax[:1], absmax[1:], self.bits, symmetric=False)

    def _fake_quant_at(self, x32: Tensor, absmax: Tensor) -> Tensor:
        """``x32`` fake-quantized with a static range ``absmax`` (the search's candidate)."""
        scale, zero_point = self._range_qparams(absmax)
        return fake_quantize(x32, scale, zero_point, self.qmin, self.qmax)

    def clipped_absmax(self) -> Tensor:
        """Calibrated absmax times the learned clip, fp32 ``[1]`` (``[2]``: both ends, asymmetric; static mode)."""
        absmax = self.absmax.float()
        if self.lac:
            absmax = absmax * sigmoid_clip(self._learned(self.clip_factor), LAC_INIT_LOGIT)
        return absmax

    def qparams(self) -> tuple[Tensor, Tensor]:
        """The static ``(scale [1], zero_point [1])`` that fake quantization uses and deploy exports (zero point
        0 when symmetric)."""
        return self._range_qparams(self.clipped_absmax())

    def scale(self) -> Tensor:
        """The static scale ``[1]`` that fake quantization uses and deploy exports."""
        return self.qparams()[0]

    def fake_quant(self, x: Tensor) -> Tensor:
        x32 = x.float()
        if self.mode == "dynamic" and self.fmt == "fp8":
            # as vLLM's per-token fp8 quantization: x times the reciprocal of the floored absmax scale
            scale = (x32.abs().amax(dim=-1, keepdim=True) / FP8_E4M3_MAX).clamp(min=FP8_MIN_SCALE)
            return fake_quantize_fp8(x32, scale, reciprocal=True).to(x.dtype)
        if self.mode == "dynamic":
            lo, hi = group_range(x32, per_token())
            scale, zero_point = compute_scale_zp(lo, hi, self.bits)
            out = fake_quantize(to_groups(x32, per_token()), scale, zero_point, self.qmin, self.qmax)
            return from_groups(out, x.shape).to(x.dtype)
        scale, zero_point = self.qparams()
        return fake_quantize(x32, scale, zero_point, self.qmin, self.qmax).to(x.dtype)

    @torch.no_grad()
    def _export_scale(self) -> Tensor:
        return self.scale().detach().float().reshape(1).clone()

    def get_qparams(self) -> dict[str, Tensor]:
        """``{"input_scale": fp32 [1]}`` for static mode (and ``"input_zero_point"``: int8 ``[1]``, asymmetric);
        empty for dynamic mode."""
        if self.mode != "static":
            return {}
        out = {"input_scale": self._export_scale()}
        if not self.symmetric:
            with torch.no_grad():
                out["input_zero_point"] = self.qparams()[1].detach().reshape(1).to(torch.int8)
        return out

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, mode={self.mode}, fmt={self.fmt}, lac={self.lac}, symmetric={self.symmetric}, "
                f"{super().extra_repr()}")


class KVQuantizer(ActQuantizer):
    """Static per-tensor quantizer for a KV-cache tensor, int8 or float8-e4m3.

    The scale is the calibrated absmax (times an optional learned clip) divided by
    127 (``int8``, symmetric integer codes) or 448 (``fp8``, e4m3fn, what vLLM
    accepts on GPU).

    Args:
        fmt: ``"int8"`` or ``"fp8"``.
        lac: Learn the clip of the scale.
        device: Device of the calibration buffer and clip parameter.

    Raises:
        ValueError: On an unknown format.
    """

    def __init__(self, fmt: KVFormat, lac: bool = False, device: torch.device | str | None = None) -> None:
        if fmt not in ("int8", "fp8"):
            raise ValueError(f"KV cache format must be 'int8' or 'fp8', got {fmt!r}")
        super().__init__(bits=8, mode="static", lac=lac, device=device)
        self.fmt = fmt

    def _range_qparams(self, absmax: Tensor) -> tuple[Tensor, Tensor]:
        """int8 as :class:`ActQuantizer`; fp8 ``absmax / 448`` and a zero point of 0 (e4m3 codes are symmetric)."""
        if self.fmt == "int8":
            return super()._range_qparams(absmax)
        scale = (absmax / FP8_E4M3_MAX).clamp(min=SCALE_EPS)
        return scale, torch.zeros_like(scale)

    def fake_quant(self, x: Tensor) -> Tensor:
        if self.fmt == "int8":
            return super().fake_quant(x)
        return fake_quantize_fp8(x.float(), self.scale()).to(x.dtype)

    def _fake_quant_at(self, x32: Tensor, absmax: Tensor) -> Tensor:
        if self.fmt == "int8":
            return super()._fake_quant_at(x32, absmax)
        return fake_quantize_fp8(x32, self._range_qparams(absmax)[0])

    def get_qparams(self) -> dict[str, Tensor]:
        """``{"scale": fp32 [1]}``; deploy names it ``k_scale`` / ``v_scale``."""
        return {"scale": self._export_scale()}

    def extra_repr(self) -> str:
        return f"fmt={self.fmt}, lac={self.lac}, state={self.state.value}"
