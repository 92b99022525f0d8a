"""Quantization math as small pure functions.

Granularity is data: every scale/zero-point computation reshapes the tensor to a
``[n_rows, block]`` view (one row per scale), reduces along the last axis, and
reshapes back. Per-channel, per-group, per-token and per-tensor share that path.

Integer quantization is symmetric by default with ``scale = absmax / qmax`` and
``qmax = 2**(bits-1) - 1``; codes are clamped to the full signed range
``[-2**(bits-1), 2**(bits-1) - 1]`` as serving kernels do. Rounding in the
fake-quant path uses a straight-through estimator so gradients reach both the
input and the scale.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch
from torch import Tensor

SCALE_EPS = 1e-8
"""Smallest scale ever produced: all-zero rows quantize to 0 instead of NaN."""

FP8_E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)
"""Largest finite float8-e4m3fn value (448)."""


class Workspace:
    """Scratch tensors kept from call to call.

    Chunked loops (quantizing or checking a weight a run of rows at a time) take
    their buffers from a workspace that the caller keeps for many weights: on CPU
    the page faults of a fresh multi-MiB allocation cost more than the arithmetic
    done in it.
    """

    def __init__(self) -> None:
        self._tensors: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
            device: torch.device | str = "cpu") -> Tensor:
        """A contiguous tensor of ``shape`` with undefined contents, sharing memory with every other tensor
        asked under ``name`` (and ``dtype``, ``device``)."""
        key = (name, dtype, torch.device(device))
        numel = math.prod(shape)
        if key not in self._tensors or self._tensors[key].numel() < numel:
            self._tensors[key] = torch.empty(numel, dtype=dtype, device=device)
        return self._tensors[key][:numel].view(shape)


class GranularityKind(enum.Enum):
    """Which elements share one scale."""

    CHANNEL = "channel"
    GROUP = "group"
    TOKEN = "token"
    TENSOR = "tensor"


@dataclass(frozen=True)
class Granularity:
    """How a tensor is cut into rows that each get one scale.

    Attributes:
        kind: Which elements share a scale.
        group_size: Elements per group along the last dim (``GROUP`` only).
    """

    kind: GranularityKind
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.kind is GranularityKind.GROUP:
            if self.group_size is None or self.group_size <= 0:
                raise ValueError(f"group granularity needs a positive group_size, got {self.group_size}")
        elif self.group_size is not None:
            raise ValueError(f"group_size applies to group granularity only, not {self.kind.value}")

    def __str__(self) -> str:
        return f"group{self.group_size}" if self.kind is GranularityKind.GROUP else self.kind.value


def per_channel() -> Granularity:
    """One scale per output row of a weight ``[..., out, in]``."""
    return Granularity(GranularityKind.CHANNEL)


def per_group(group_size: int) -> Granularity:
    """One scale per ``group_size`` consecutive elements along the last (input) dim."""
    return Granularity(GranularityKind.GROUP, group_size)


def per_token() -> Granularity:
    """One scale per row of the flattened ``[tokens, features]`` activation."""
    return Granularity(GranularityKind.TOKEN)


def per_tensor() -> Granularity:
    """One scale for the whole tensor."""
    return Granularity(GranularityKind.TENSOR)


def block_size(shape: tuple[int, ...] | torch.Size, granularity: Granularity) -> int:
    """Number of elements that share one scale.

    Args:
        shape: Shape of the tensor to quantize.
        granularity: How scales are shared.

    Returns:
        The length of one row of the ``[n_rows, block]`` view.

    Raises:
        ValueError: For a 0-d tensor, or when the group size does not divide the
            last dim.
    """
    if len(shape) == 0:
        raise ValueError("cannot quantize a 0-d tensor; reshape it to at least 1-d")
    last = shape[-1]
    if granularity.kind is GranularityKind.TENSOR:
        return math.prod(shape)
    if granularity.kind is GranularityKind.GROUP:
        group = granularity.group_size
        if last % group != 0:
            raise ValueError(
                f"group size {group} does not divide the input dim {last} of shape {tuple(shape)}; "
                f"choose a group size that divides {last}"
            )
        return group
    return last


def scale_shape(shape: tuple[int, ...] | torch.Size, granularity: Granularity) -> tuple[int, ...]:
    """Shape of the exported scale, as compressed-tensors lays it out.

    Per-channel/per-token ``[..., rows, 1]``; per-group ``[..., rows, in // g]``;
    per-tensor ``[1]``.

    Args:
        shape: Shape of the quantized tensor.
        granularity: How scales are shared.

    Returns:
        The scale shape.
    """
    block = block_size(shape, granularity)
    if granularity.kind is GranularityKind.TENSOR:
        return (1,)
    return (*shape[:-1], shape[-1] // block)


def to_groups(x: Tensor, granularity: Granularity) -> Tensor:
    """Reshape ``x`` to ``[n_rows, block]``: one row per scale.

    Args:
        x: Tensor to quantize.
        granularity: How scales are shared.

    Returns:
        A view (or copy, for non-contiguous input) of ``x``.
    """
    return x.reshape(-1, block_size(x.shape, granularity))


def from_groups(x_groups: Tensor, shape: tuple[int, ...] | torch.Size) -> Tensor:
    """Inverse of :func:`to_groups`."""
    return x_groups.reshape(shape)


def group_range(x: Tensor, granularity: Granularity) -> tuple[Tensor, Tensor]:
    """Per-row minimum and maximum of the ``[n_rows, block]`` view.

    Args:
        x: Tensor to observe.
        granularity: How scales are shared.

    Returns:
        ``(min_val, max_val)``, each ``[n_rows, 1]``.
    """
    groups = to_groups(x, granularity)
    return groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True)


def int_range(bits: int) -> tuple[int, int]:
    """Signed integer code range ``(-2**(bits-1), 2**(bits-1) - 1)``."""
    if not 2 <= bits <= 8:
        raise ValueError(f"integer quantization supports 2..8 bits, got {bits}")
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def round_ste(x: Tensor) -> Tensor:
    """Round to nearest (ties to even) with an identity gradient.

    The result equals ``x.round()`` exactly: ``round(x) - x`` is exact in floating
    point (Sterbenz), so adding ``x`` back recovers ``round(x)``. Without autograd
    (evaluation, deploy) it is a plain round.
    """
    if not (torch.is_grad_enabled() and x.requires_grad):
        return x.round()
    return (x.round() - x).detach() + x


def compute_scale_zp(min_val: Tensor, max_val: Tensor, bits: int, symmetric: bool = True) -> tuple[Tensor, Tensor]:
    """Scale and zero-point that map ``[min_val, max_val]`` onto ``bits``-bit codes.

    Symmetric: ``scale = max(|min|, |max|) / qmax``, zero-point 0. Asymmetric: the
    range is widened to contain 0, ``scale = (max - min) / (qmax - qmin)`` and the
    zero-point (rounded with an STE, clamped to the code range) maps ``min`` to
    ``qmin``. Scales are clamped to at least :data:`SCALE_EPS`. Differentiable in
    ``min_val``/``max_val``.

    Args:
        min_val: Range lower bound, any shape.
        max_val: Range upper bound, same shape.
        bits: Code width.
        symmetric: Symmetric (zero-point 0) or asymmetric quantization.

    Returns:
        ``(scale, zero_point)`` with the shape of the inputs; the zero-point is a
        float tensor holding integers.
    """
    qmin, qmax = int_range(bits)
    if symmetric:
        absmax = torch.maximum(min_val.abs(), max_val.abs())
        scale = (absmax / qmax).clamp(min=SCALE_EPS)
        return scale, torch.zeros_like(scale)
    min_val = min_val.clamp(max=0)
    max_val = max_val.clamp(min=0)
    scale = ((max_val - min_val) / (qmax - qmin)).clamp(min=SCALE_EPS)
    zero_point = (qmin - round_ste(min_val / scale)).clamp(qmin, qmax)
    return scale, zero_point


def _codes(
    x: Tensor, scale: Tensor, zero_point: Tensor | None, qmin: int, qmax: int, ste: bool, work: Tensor | None = None,
    clamp: bool = True, offset: Tensor | None = None,
) -> Tensor:
    if ste:
        q = x / scale if offset is None else x / scale + offset
        return (round_ste(q) + zero_point).clamp(qmin, qmax)
    codes = torch.div(x, scale, out=work)
    if offset is not None:
        codes.add_(offset)
    codes.round_()
    if zero_point is not None:
        codes.add_(zero_point)
    return codes.clamp_(qmin, qmax) if clamp else codes


def quantize(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor | None,
    qmin: int,
    qmax: int,
    dtype: torch.dtype = torch.int8,
    *,
    out: Tensor | None = None,
    work: Tensor | None = None,
    clamp: bool = True,
    offset: Tensor | None = None,
) -> Tensor:
    """Integer codes ``clamp(round(x / scale [+ offset]) + zp, qmin, qmax)``.

    Args:
        x: Values; ``scale`` and ``zero_point`` broadcast against it.
        scale: Positive scale.
        zero_point: Zero-point (float tensor holding integers); None for symmetric codes.
        qmin: Smallest code.
        qmax: Largest code.
        dtype: Integer dtype of the result.
        out: Integer tensor shaped like ``x`` to write the codes into (and return);
            ``dtype`` is then its dtype.
        work: Float scratch tensor shaped like ``x`` (in the dtype of ``x / scale``)
            for the quotient; it holds the codes as floats on return. With ``out``
            nothing is allocated.
        clamp: False skips the clamp, for a caller whose codes cannot leave the range: the
            symmetric absmax scale ``max|x| / qmax`` keeps every ``|x / scale|`` within ``qmax``
            (float rounding moves it by ulps, far from the rounding boundary ``qmax + 0.5``).
        offset: Learned rounding offsets in [-0.5, 0.5], broadcast against ``x``, added to
            ``x / scale`` before the round (needs the clamp).

    Returns:
        The codes, in ``dtype``.
    """
    codes = _codes(x, scale, zero_point, qmin, qmax, ste=False, work=work, clamp=clamp, offset=offset)
    return codes.to(dtype) if out is None else out.copy_(codes)


def dequantize(q: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    """``(q - zp) * scale`` in the dtype of ``scale``."""
    return (q.to(scale.dtype) - zero_point) * scale


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                  offset: Tensor | None = None) -> Tensor:
    """Quantize-dequantize with a straight-through round.

    Bit-identical to ``dequantize(quantize(x, ...), ...)``; gradients flow to ``x``
    and ``offset`` inside the clamp range and to ``scale`` everywhere.

    Args:
        x: Values; ``scale`` and ``zero_point`` broadcast against it.
        scale: Positive scale.
        zero_point: Zero-point (float tensor holding integers).
        qmin: Smallest code.
        qmax: Largest code.
        offset: Learned rounding offsets added to ``x / scale`` before the round (see :func:`quantize`).

    Returns:
        The fake-quantized values, in the dtype of ``scale``.
    """
    return dequantize(_codes(x, scale, zero_point, qmin, qmax, ste=True, offset=offset), scale, zero_point)


def fake_quantize_fp8(x: Tensor, scale: Tensor, reciprocal: bool = False) -> Tensor:
    """float8-e4m3fn quantize-dequantize with a straight-through cast.

    ``(x / scale)`` is clamped to ``±448``, cast to ``float8_e4m3fn`` and back, and
    multiplied by ``scale``. The cast's gradient is the identity.

    Args:
        x: Values (fp32 or wider recommended).
        scale: Positive scale broadcasting against ``x``.
        reciprocal: Compute ``x * (1 / scale)`` instead of ``x / scale``, as vLLM's dynamic
            per-token fp8 quantization does (the two differ by an ulp now and then).

    Returns:
        The fake-quantized values, in the dtype of ``x``.
    """
    scaled = (x * scale.reciprocal() if reciprocal else x / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    cast = scaled.to(torch.float8_e4m3fn).to(scaled.dtype)
    return ((cast - scaled).detach() + scaled) * scale


FP8_MIN_SCALE = 1.0 / (FP8_E4M3_MAX * 512)
"""Smallest scale of vLLM's dynamic fp8 quantization (per token, or per row of the W4A8-FP8 group scales)."""


FP8_MIN_RATIO = 8 * 2.0**-9
"""Smallest nonzero group-scale ratio of the W4A8-FP8 grid: 8 times the smallest fp8-e4m3 subnormal."""


def fp8_row_scales(scale: Tensor) -> Tensor:
    """Group scales on the grid that vLLM's int4-weight / fp8-activation (W4A8-FP8) kernels hold.

    Those kernels keep each group scale as a float8-e4m3 value times a per-row fp32 scale:
    on load they take ``c = max(max(row) / 448, FP8_MIN_SCALE)``, cast ``row / c`` to fp8,
    divide it by 8 and cast again, and multiply back by ``8 c``. A scale off that grid would
    be served changed by up to 1/16. This returns scales near ``scale`` that the trip leaves
    unchanged, so every consumer (vLLM, compressed-tensors, our loader) dequantizes with the
    same values. Per row, ``c`` is ``max(row) / 448`` rounded up to 4 significant bits, the
    row's largest scale becomes exactly ``448 c`` and every other one ``c`` times its ratio to
    ``c`` rounded as the kernels round it; the products have at most 8 significant bits, so
    bf16 (vLLM reads the scales in the model's dtype) holds them exactly. Rows whose
    ``max / 448`` is below :data:`FP8_MIN_SCALE` take that floor for ``c``, as the kernels do;
    their scales are not bf16 values, but the kernels' trip recovers each fp8 ratio from the
    bf16 rounding (2^-9 relative, far inside half an fp8 step). A ratio the kernels would
    flush to 0 is raised to their smallest nonzero one (:data:`FP8_MIN_RATIO`), so no group
    loses its weights.

    Args:
        scale: Positive group scales, ``[rows, groups]`` (one row per output channel).

    Returns:
        The scales on the grid, fp32, same shape; the gradient is the identity.
    """
    s = scale.detach().float()
    top = s.amax(dim=-1, keepdim=True)
    mantissa, exponent = torch.frexp(top / FP8_E4M3_MAX)
    c = torch.ldexp(torch.ceil(mantissa * 16) / 16, exponent)
    floored = top / FP8_E4M3_MAX < FP8_MIN_SCALE
    c = torch.where(floored, torch.full_like(c, FP8_MIN_SCALE), c)
    ratio = (s / c).clamp(max=FP8_E4M3_MAX).to(torch.float8_e4m3fn).float()
    ratio = ((ratio / 8).to(torch.float8_e4m3fn).float() * 8).clamp(min=FP8_MIN_RATIO)
    ratio = torch.where((s == top) & ~floored, torch.full_like(ratio, FP8_E4M3_MAX), ratio)
    grid = ratio * c
    return (grid - scale).detach() + scale if scale.requires_grad else grid


def sigmoid_clip(logit: Tensor, init_logit: float) -> Tensor:
    """Learnable clip factor ``sigmoid(logit) / sigmoid(init_logit)``.

    Equals exactly 1.0 while ``logit`` holds its initial value (both sigmoids run
    through the same kernel on same-shaped tensors, and ``a / a == 1``), so a fresh
    learnable clip reproduces plain absmax bit for bit. The factor stays in
    ``(0, 1 / sigmoid(init_logit))`` and its gradient at init is
    ``1 - sigmoid(init_logit)``, the same as OmniQuant's ``sigmoid`` bound.

    Args:
        logit: Learnable logits.
        init_logit: The value ``logit`` was initialised to.

    Returns:
        The clip factor, shaped like ``logit``.
    """
    return torch.sigmoid(logit) / torch.sigmoid(torch.full_like(logit, init_logit))


def pack_int4(q: Tensor, workspace: Workspace | None = None, *, checked: bool = True) -> Tensor:
    """Pack int4 codes into int32 words, compressed-tensors ``pack-quantized`` layout.

    Eight consecutive codes along the last dim fill one word; code ``j`` of a word,
    offset by +8 to ``[0, 15]``, occupies bits ``4j .. 4j+3``. Built byte by byte
    (codes ``2k`` and ``2k+1`` in the low and high nibble of byte ``k``, from the
    int16 that holds both) and read as int32 words: little-endian hosts (the byte
    order of the file format) assumed.

    Args:
        q: ``int8`` codes in ``[-8, 7]``, shape ``[..., in]`` with ``in % 8 == 0``.
        workspace: Where the intermediate and result buffers come from (a chunked
            loop keeps one: fresh multi-MiB allocations cost more than the packing);
            the result is then overwritten by the next call. None: fresh tensors.
        checked: False skips the range check, for codes that a clamp to ``[-8, 7]`` (or
            the absmax scale) made.

    Returns:
        ``int32`` tensor ``[..., in // 8]``.

    Raises:
        ValueError: On a wrong dtype, codes outside ``[-8, 7]`` or ``in % 8 != 0``.
    """
    if q.dtype is not torch.int8:
        raise ValueError(f"pack_int4 expects int8 codes, got {q.dtype}")
    if q.ndim == 0 or q.shape[-1] % 8 != 0:
        raise ValueError(f"pack_int4 needs a last dim divisible by 8, got shape {tuple(q.shape)}")
    if checked and q.numel():
        lo, hi = torch.aminmax(q)
        if lo < -8 or hi > 7:
            raise ValueError(f"int4 codes must lie in [-8, 7], got [{int(lo)}, {int(hi)}]")
    workspace = Workspace() if workspace is None else workspace
    half = (*q.shape[:-1], q.shape[-1] // 2)
    offset = torch.add(q, 8, out=workspace.get("pack_offset", tuple(q.shape), torch.int8, q.device))
    pairs = offset.view(torch.int16)  # code 2k in the low byte, 2k+1 in the high byte
    packed = torch.bitwise_right_shift(pairs, 4, out=workspace.get("pack_pairs", half, torch.int16, q.device))
    packed |= pairs  # low byte: code 2k | code 2k+1 << 4
    return workspace.get("pack_words", half, torch.uint8, q.device).copy_(packed).view(torch.int32)


def unpack_int4(packed: Tensor, shape: tuple[int, ...] | torch.Size) -> Tensor:
    """Inverse of :func:`pack_int4`.

    Args:
        packed: ``int32`` words ``[..., in // 8]``.
        shape: The unpacked shape ``[..., in]``.

    Returns:
        ``int8`` codes in ``[-8, 7]`` with shape ``shape``.

    Raises:
        ValueError: On a wrong dtype or a shape that does not match ``packed``.
    """
    shape = tuple(int(s) for s in shape)
    if packed.dtype is not torch.int32:
        raise ValueError(f"unpack_int4 expects int32 words, got {packed.dtype}")
    if not shape or shape[-1] % 8 != 0 or tuple(packed.shape) != (*shape[:-1], shape[-1] // 8):
        raise ValueError(f"packed shape {tuple(packed.shape)} does not match unpacked shape {shape}")
    pairs = packed.contiguous().view(torch.uint8).to(torch.int16)
    nibbles = pairs << 4
    nibbles |= pairs
    nibbles &= 0x0F0F  # low byte: the low nibble (code 2k), high byte: the high one (code 2k+1)
    return nibbles.view(torch.int8).sub_(8).reshape(shape)


def sqnr_db(reference: Tensor, approx: Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(|ref|^2 / |ref - approx|^2)`` in dB."""
    reference, approx = reference.detach().double(), approx.detach().double()
    noise = (reference - approx).pow(2).sum()
    return float(10 * torch.log10(reference.pow(2).sum() / noise))
