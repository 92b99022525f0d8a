"""Quantizer modules: fake quantization with learnable clipping and an explicit state.

Every quantizer follows one small interface:

- ``forward(x)`` dispatches on :class:`QuantState`: identity in ``FLOAT``,
  ``observe(x)`` then identity in ``CALIBRATE``, :meth:`Quantizer.fake_quant` in
  ``FAKE_QUANT``, ``FROZEN`` and ``PACKED`` (learned parameters detached in the last two);
- ``observe(x)`` records calibration ranges (a no-op where the range comes from the
  input itself);
- ``fake_quant(x)`` runs in fp32 and returns ``x.dtype``;
- activation and KV quantizers: ``get_qparams()`` returns exactly the scales the deployed
  checkpoint stores;
- :class:`WeightQuantizer`: ``quantize_weight(w)`` gives the integer codes and scale of a
  whole weight (the ``FROZEN`` forward's), ``dequantize_weight(codes, scale)`` the weight
  they stand for, and :meth:`WeightQuantizer.quantize_groups` the codes and scales of a run
  of scale rows, on which the deploy stage (:mod:`cores.deploy.pack`) builds the chunked
  export of the deployed tensors.

Learnable clipping (weights: LWC, static activations and KV cache: LAC) multiplies
an observed range by :func:`~cores.quantization.primitives.sigmoid_clip`, which is
exactly 1.0 at initialisation, so a fresh quantizer reproduces round-to-nearest
absmax bit for bit.
"""

from __future__ import annotations

import abc
import enum
import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from cores.quantization.primitives import (
    FP8_E4M3_MAX,
    FP8_MIN_SCALE,
    SCALE_EPS,
    Granularity,
    block_size,
    compute_scale_zp,
    dequantize,
    fake_quantize,
    fake_quantize_fp8,
    fp8_row_scales,
    from_groups,
    group_range,
    int_range,
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


class QuantState(enum.Enum):
    """Lifecycle of a quantized module.

    Attributes:
        FLOAT: Full-precision forward; quantizers are bypassed.
        CALIBRATE: Full-precision forward while static quantizers observe ranges.
        FAKE_QUANT: Training-time fake quantization; clipping parameters get gradients.
        FROZEN: Parameters fixed; the quantized weight is computed once and cached.
        PACKED: The layer holds only its deployed codes and scale (as read from a deployed
            checkpoint), no float weight; the forward dequantizes them as in ``FROZEN`` (learned
            parameters detached). There is no way back: asking for ``FROZEN`` leaves it ``PACKED``,
            any other state raises.
    """

    FLOAT = "float"
    CALIBRATE = "calibrate"
    FAKE_QUANT = "fake_quant"
    FROZEN = "frozen"
    PACKED = "packed"


FIXED_STATES = (QuantState.FROZEN, QuantState.PACKED)
"""States whose forward uses fixed parameters: no gradient reaches the learned ones."""


def _next_state(module: nn.Module, state: QuantState) -> QuantState:
    """The state ``module`` (now in ``module.state``) takes when asked for ``state``: ``PACKED`` is final.

    Raises:
        RuntimeError: When a ``PACKED`` module is asked for a state other than ``FROZEN`` or ``PACKED``.
    """
    if module.state is not QuantState.PACKED:
        return state
    if state in FIXED_STATES:
        return QuantState.PACKED
    raise RuntimeError(f"{type(module).__name__} is PACKED: it holds only deployed codes and scales, no float "
                       f"weight, so it cannot move to {state.name}; build the layer again from its float weight")


class Quantizer(nn.Module, abc.ABC):
    """Base class: the state machine and the observe / fake-quant dispatch."""

    def __init__(self) -> None:
        super().__init__()
        self.state = QuantState.FLOAT

    def set_state(self, state: QuantState) -> None:
        """Move to ``state``; once ``PACKED``, ``FROZEN`` leaves it ``PACKED``.

        Args:
            state: The new state.

        Raises:
            RuntimeError: When leaving ``PACKED`` for a state other than ``FROZEN``.
        """
        self.state = _next_state(self, state)

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
        """``param`` in fp32, detached while frozen (or packed)."""
        param = param.float()
        return param.detach() if self.state in FIXED_STATES else param

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

    :meth:`quantize_groups` is the one quantization of every export: the whole weight in
    :meth:`quantize_weight` (the ``FROZEN`` forward), runs of rows in the deploy stage
    (:mod:`cores.deploy.pack`), with the same codes and scales bit for bit.

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

    def rounding_offsets(self) -> Tensor | None:
        """Rounding offsets in [-0.5, 0.5] (fp32, weight-shaped), stored-dtype values unless training; None
        without learned rounding."""
        if not self.learn_rounding:
            return None
        offset = self.round_offset
        if self.state is not QuantState.FAKE_QUANT:
            offset = offset.detach().to(ROUND_OFFSET_DTYPE)
        return offset.float().clamp(-0.5, 0.5)

    def clip_factors(self) -> tuple[Tensor, Tensor] | None:
        """LWC factors ``(upper, lower)`` of every scale row, fp32 ``[n_rows, 1]`` each; None without LWC.

        Computed on the whole parameters: a run of scale rows takes its rows of these (computing
        the sigmoid on a slice may differ in the last bit on CPU, where a vector loop's tail is scalar).
        """
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
        self.check_shape(weight)
        return to_groups(weight.float(), self.granularity)

    def check_shape(self, weight: Tensor) -> None:
        """Raise ValueError unless ``weight`` has the shape this quantizer was built for."""
        if tuple(weight.shape) != self.shape:
            raise ValueError(f"weight shape {tuple(weight.shape)} does not match quantizer shape {self.shape}")

    def fake_quant(self, x: Tensor) -> Tensor:
        groups = self._groups(x)
        scale, zero_point = self._scale_zp(groups, self.clip_factors())
        offsets = self.rounding_offsets()
        offsets = None if offsets is None else to_groups(offsets, self.granularity)
        out = fake_quantize(groups, scale, zero_point, self.qmin, self.qmax, offset=offsets)
        return from_groups(out, x.shape).to(x.dtype)

    @torch.no_grad()
    def quantize_groups(self, groups: Tensor, factors: tuple[Tensor, Tensor] | None = None,
                        offsets: Tensor | None = None, *, out: Tensor | None = None,
                        work: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Integer codes and scales of a run of consecutive scale rows (rows of the weight's
        :func:`~cores.quantization.primitives.to_groups` view).

        Every step is elementwise on the scale rows, so a run gets the codes and scales the
        whole weight gives it, bit for bit, and those of :meth:`fake_quant`. The codes are
        clamped only where they can leave the code range (LWC, fp8 scales, rounding offsets):
        an unclipped absmax scale keeps every ``|x / scale|`` within ``qmax``.

        Args:
            groups: fp32 values ``[n, block]``; with ``fp8_scales``, whole weight rows.
            factors: Their LWC factors: the same rows of each of :meth:`clip_factors`; None without LWC.
            offsets: Their rounding offsets ``[n, block]``: the same values of :meth:`rounding_offsets`;
                None without learned rounding.
            out: ``int8`` ``[n, block]`` to write the codes into; None: a new tensor.
            work: fp32 ``[n, block]`` scratch for the quotient (it holds the codes as floats on
                return); None: a new tensor.

        Returns:
            ``(codes, scale)``: ``int8`` codes ``[n, block]`` and fp32 scales ``[n, 1]``.
        """
        scale, _ = self._scale_zp(groups, factors)
        clamp = factors is not None or self.fp8_scales or offsets is not None
        codes = quantize(groups, scale, None, self.qmin, self.qmax, out=out, work=work, clamp=clamp, offset=offsets)
        return codes, scale

    @torch.no_grad()
    def quantize_weight(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        """Integer codes and scale of the whole ``weight``, as deployed (the ``FROZEN`` forward's).

        Args:
            weight: The float weight (any float dtype; computed in fp32).

        Returns:
            ``(codes, scale)``: ``int8`` codes shaped like ``weight`` and the fp32
            scale in compressed-tensors layout (``[out, 1]`` per channel,
            ``[out, in // g]`` per group, ``[1]`` per tensor).
        """
        offsets = self.rounding_offsets()
        offsets = None if offsets is None else to_groups(offsets, self.granularity)
        codes, scale = self.quantize_groups(self._groups(weight), self.clip_factors(), offsets)
        return from_groups(codes, self.shape), scale.reshape(scale_shape(self.shape, self.granularity))

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
            RuntimeError: When entering ``FAKE_QUANT``/``FROZEN``/``PACKED`` with no observed range, or
                leaving ``PACKED`` (:meth:`Quantizer.set_state`).
        """
        if (
            self.mode == "static"
            and state in (QuantState.FAKE_QUANT, *FIXED_STATES)
            and self.state is not QuantState.PACKED
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
