"""A quantized linear layer with an explicit lifecycle, and helpers to swap it in."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from cores.quantization.primitives import scale_shape
from cores.quantization.quantizers import FIXED_STATES, ActQuantizer, Quantizer, QuantState, WeightQuantizer
from cores.quantization.schemes import DEFAULT_IGNORE, QuantScheme, TargetSchemes, matches
from cores.quantization.smoothing import Smoother


class QuantLinear(nn.Module):
    """``nn.Linear`` with a weight quantizer and an optional input quantizer.

    Keeps the wrapped layer's ``weight`` and ``bias`` parameters under the same
    names (the very same tensors, not copies), so checkpoint keys still load.

    States (see :class:`QuantState`):

    - ``FLOAT``: exactly ``nn.Linear``.
    - ``CALIBRATE``: float output; the input quantizer observes its input.
    - ``FAKE_QUANT``: fp32 math on fake-quantized input and weight; the clipping
      parameters receive gradients. The weight's fake-quant chain and the matmul are
      recomputed in the backward instead of kept (:meth:`forward`).
    - ``FROZEN``: the weight is quantized once to integer codes and a scale (what
      deploy writes) and dequantized in each forward, bit-identical to
      ``FAKE_QUANT``; no parameter receives gradients (the input still does).
    - ``PACKED`` (:meth:`load_packed`): the layer holds only the deployed codes and
      scale it was given, no float weight (``weight`` is None); the forward is the
      ``FROZEN`` one. A final state: ``FROZEN`` leaves it ``PACKED``, any other raises.

    The deployed tensors of a layer (packed codes, scales, input scale) are made by the
    deploy stage, :mod:`cores.deploy.pack`, from :meth:`export_weight` and the quantizers.

    ``weight`` may be stored narrower than the compute (bf16 in training): every
    forward reads it in fp32, which is exact, so the results are those of an fp32 copy.

    Smoothing (:mod:`~cores.quantization.smoothing`): ``out_smooth``, a registered
    :class:`Smoother`, divides this layer's output rows (and bias); ``in_smooth``, a
    reference to the smoother of the layer that feeds it (not registered here),
    multiplies its input columns. Outside ``FLOAT`` every forward and the export use
    :meth:`effective_weight`.

    Args:
        linear: The layer to wrap.
        weight_quantizer: Quantizer for ``linear.weight``.
        input_quantizer: Quantizer for the input activations, or ``None``.

    Raises:
        ValueError: When the weight quantizer was built for another shape.
    """

    def __init__(
        self,
        linear: nn.Linear,
        weight_quantizer: WeightQuantizer,
        input_quantizer: ActQuantizer | None = None,
    ) -> None:
        super().__init__()
        if tuple(linear.weight.shape) != weight_quantizer.shape:
            raise ValueError(
                f"weight quantizer shape {weight_quantizer.shape} does not match weight {tuple(linear.weight.shape)}"
            )
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer
        self.state = QuantState.FLOAT
        self.scheme: QuantScheme | None = None  # the scheme it was built from (set by quantize_linears)
        self.register_buffer("_frozen_codes", None, persistent=False)
        self.register_buffer("_frozen_scale", None, persistent=False)
        self.out_smooth: Smoother | None = None
        object.__setattr__(self, "in_smooth", None)  # owned by the producer: a reference, not a submodule

    @property
    def smoothed(self) -> bool:
        return self.in_smooth is not None or self.out_smooth is not None

    def effective_weight(self) -> Tensor:
        """The fp32 weight the quantizer sees: columns times the input smoothing, rows over the output one."""
        weight = self.weight.float()
        if self.in_smooth is not None:
            weight = weight * self.in_smooth.consumer_scale()
        if self.out_smooth is not None:
            weight = weight / self.out_smooth.scale()[:, None]
        return weight

    def effective_bias(self) -> Tensor | None:
        """The fp32 bias of the forward: over the output smoothing, rounded as deploy stores it."""
        if self.bias is None:
            return None
        if self.out_smooth is None:
            return self.bias.float()
        return self.out_smooth.divide(self.bias)

    def export_bias(self) -> Tensor | None:
        """The bias deploy writes when the output is smoothed (in the smoother's dtype); None: unchanged."""
        if self.bias is None or self.out_smooth is None:
            return None
        with torch.no_grad():
            return self.effective_bias().to(self.out_smooth.dtype)

    @classmethod
    def from_scheme(cls, linear: nn.Linear, scheme: QuantScheme, lwc: bool = True, lac: bool = True,
                    rounding: bool = False) -> QuantLinear:
        """Wrap ``linear`` with the quantizers ``scheme`` asks for.

        Args:
            linear: The layer to wrap (its weight may be on the meta device: the quantizers are then built
                there too, for a layout plan or for :meth:`load_packed`).
            scheme: Weight and activation settings.
            lwc: Learn weight clipping.
            lac: Learn activation clipping (static activations only).
            rounding: Learn a rounding offset per weight.

        Returns:
            The wrapper, in ``FLOAT`` state.
        """
        device = linear.weight.device
        weight_quantizer = WeightQuantizer(
            linear.weight.shape, scheme.w_bits, scheme.weight_granularity, lwc=lwc, device=device,
            fp8_scales=scheme.act_format == "fp8", learn_rounding=rounding,
        )
        static = scheme.act_mode == "static"
        input_quantizer = ActQuantizer(scheme.a_bits, scheme.act_mode, lac=lac and static, device=device,
                                       fmt=scheme.act_format, symmetric=scheme.act_symmetric)
        return cls(linear, weight_quantizer, input_quantizer)

    def _quantizers(self) -> list[Quantizer]:
        return [q for q in (self.weight_quantizer, self.input_quantizer) if q is not None]

    def set_state(self, state: QuantState) -> None:
        """Move this layer and its quantizers to ``state``.

        Entering ``FROZEN`` quantizes the weight and caches codes and scale;
        leaving it drops the cache. A ``PACKED`` layer stays ``PACKED`` when asked
        for ``FROZEN`` (so :func:`set_quant_state` can freeze a block that holds some).

        Args:
            state: The new state.

        Raises:
            RuntimeError: When a ``PACKED`` layer is asked for another state than ``FROZEN``.
            ValueError: When asked for ``PACKED``: only :meth:`load_packed` gives a layer its codes.
        """
        if self.state is QuantState.PACKED:
            if state not in FIXED_STATES:
                raise RuntimeError(f"{type(self).__name__} is PACKED: it holds only its deployed codes and scale, "
                                   f"no float weight, so it cannot move to {state.name}; build the layer again "
                                   "from its float weight")
            for quantizer in self._quantizers():  # a quantizer put in after load_packed is frozen
                quantizer.set_state(QuantState.FROZEN)
            return
        if state is QuantState.PACKED:
            raise ValueError(f"{type(self).__name__} becomes PACKED through load_packed(codes, scale)")
        for quantizer in self._quantizers():
            quantizer.set_state(state)
        self.state = state
        if state is QuantState.FROZEN:
            self._frozen_codes, self._frozen_scale = self.weight_quantizer.quantize_weight(self.export_weight())
        else:
            self._frozen_codes = self._frozen_scale = None

    @torch.no_grad()
    def load_packed(self, codes: Tensor, scale: Tensor) -> None:
        """Hold deployed ``codes`` and ``scale`` instead of the float weight: the ``PACKED`` state.

        The layer and its quantizers become ``PACKED`` (quantizers behave as in ``FROZEN``), the
        codes and scale become the (non-persistent) buffers the ``FROZEN`` forward dequantizes,
        and ``weight`` becomes None, so the weight is not held twice. The weight may be on the meta
        device (a block built there): only its shape is read. The bias, if any, is kept as it is
        (a deployed bias already holds any output smoothing, so a smoothed layer is refused). A
        static input quantizer needs its range or stored scale before this call.

        Args:
            codes: ``int8`` codes shaped like the weight (4-bit codes unpacked), on the device to run on.
            scale: Their fp32 scales: ``[out, 1]`` per channel, ``[out, in // g]`` per group (any shape with
                that many values, one per scale row), on the same device.

        Raises:
            ValueError: On codes or scales that do not fit the weight quantizer, or a smoothed layer.
            RuntimeError: When a static input quantizer has no range (:meth:`ActQuantizer.set_state`).
        """
        quantizer = self.weight_quantizer
        expected = scale_shape(quantizer.shape, quantizer.granularity)
        if codes.dtype is not torch.int8 or tuple(codes.shape) != quantizer.shape:
            raise ValueError(f"packed codes must be int8 {quantizer.shape}, got {codes.dtype} {tuple(codes.shape)}")
        if scale.numel() != math.prod(expected):
            raise ValueError(f"packed scale must hold {math.prod(expected)} values {expected}, "
                             f"got {tuple(scale.shape)}")
        if self.smoothed:
            raise ValueError("a smoothed layer cannot be PACKED: the deployed codes and bias hold the smoothing")
        for q in reversed(self._quantizers()):  # the input quantizer's range check first: nothing moved if it fails
            q.set_state(QuantState.PACKED)
        self.state = QuantState.PACKED
        self._frozen_codes, self._frozen_scale = codes, scale.float().reshape(expected)
        self.weight = None

    def export_weight(self) -> Tensor:
        """The weight to quantize for the frozen forward and deploy (smoothed, without gradients).

        Raises:
            RuntimeError: On a ``PACKED`` layer, which holds no float weight.
        """
        if self.weight is None:
            raise RuntimeError(f"{type(self).__name__} is PACKED: it holds no float weight to quantize")
        if not self.smoothed:
            return self.weight
        with torch.no_grad():
            return self.effective_weight()

    def fake_quant_weight(self) -> Tensor:
        """The fake-quantized effective weight of the ``FAKE_QUANT`` forward (smoothing, scales, round, clamp).

        Under autograd :meth:`forward` checkpoints this chain together with its matmul: its intermediates,
        several fp32 copies of the weight, are recomputed in the backward instead of kept.
        """
        return self.weight_quantizer(self.effective_weight())

    def learnable_parameters(self) -> list[nn.Parameter]:
        """The clipping parameters of the quantizers (never ``weight``/``bias``)."""
        return [p for q in self._quantizers() for p in q.learnable_parameters()]

    def forward(self, x: Tensor) -> Tensor:
        if self.state is QuantState.CALIBRATE and self.in_smooth is not None:
            self.in_smooth.observe(x * self.in_smooth.consumer_scale().to(x.dtype))  # the unsmoothed input
        if self.state in (QuantState.FLOAT, QuantState.CALIBRATE):
            if self.input_quantizer is not None:
                x = self.input_quantizer(x)
            if self.state is QuantState.FLOAT or not self.smoothed:
                return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
            bias = self.effective_bias()
            return F.linear(x.float(), self.effective_weight(), bias).to(x.dtype)
        x32 = x.float()
        if self.input_quantizer is not None:
            x32 = self.input_quantizer(x32)
        bias = self.effective_bias()
        if self.state in FIXED_STATES:
            weight = self.weight_quantizer.dequantize_weight(self._frozen_codes, self._frozen_scale)
            bias = None if bias is None else bias.detach()
        elif torch.is_grad_enabled():
            # chain and matmul checkpointed together: the fp32 fake-quant weight the matmul's backward reads
            # (4 bytes per weight, for every linear of the block until the backward reaches it) is recomputed
            # there, one linear at a time, with the same values and gradients, instead of kept from the forward;
            # a block's training memory is then its weights and the learned tensors with their optimizer state
            return checkpoint(self._fake_quant_linear, x32, bias, use_reentrant=False).to(x.dtype)
        else:
            weight = self.fake_quant_weight()
        return F.linear(x32, weight, bias).to(x.dtype)

    def _fake_quant_linear(self, x32: Tensor, bias: Tensor | None) -> Tensor:
        """``FAKE_QUANT`` matmul of a (quantized) fp32 input, for the checkpoint of :meth:`forward`."""
        return F.linear(x32, self.fake_quant_weight(), bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, state={self.state.value}"
        )


def quantize_linears(
    module: nn.Module,
    scheme: QuantScheme,
    ignore: Sequence[str] = DEFAULT_IGNORE,
    *,
    lwc: bool = True,
    lac: bool = True,
    rounding: bool = False,
    scope: str = "",
    targets: TargetSchemes | None = None,
    prefix: str = "",
) -> dict[str, QuantLinear]:
    """Replace, in place, every ``nn.Linear`` below ``module`` not matched by ``ignore``.

    Args:
        module: Root module (e.g. one decoder block); it is not replaced itself.
        scheme: Quantization settings.
        ignore: Patterns (``re:`` regex or fnmatch glob, see :func:`~cores.quantization.schemes.matches`) on
            module-relative names and, when ``prefix`` is given, on full names too: a compressed-tensors
            ``ignore`` entry (``model.layers.3.mlp.down_proj``) keeps that one layer in high precision.
        lwc: Learn weight clipping.
        lac: Learn activation clipping for static activations.
        rounding: Learn a rounding offset per weight.
        scope: Only layers whose relative name starts with this prefix (e.g.
            ``"self_attn."``); names are still matched against ``ignore`` in full.
        targets: Per-target schemes, matched on ``prefix + name`` (the full module name); ``scheme`` is then
            only the default of ``targets`` (None: ``scheme`` for every layer).
        prefix: ``module``'s full name followed by a dot (``model.layers.3.``), for ``targets`` and ``ignore``.

    Returns:
        The new layers by module-relative name, in ``FLOAT`` state.

    Raises:
        ValueError: When a layer cannot take the scheme (e.g. the group size does
            not divide its input dim); the message names the layer.
    """
    found = [
        (name, child)
        for name, child in module.named_modules()
        if name.startswith(scope) and isinstance(child, nn.Linear)
        and not (matches(name, ignore) or (prefix and matches(prefix + name, ignore)))
    ]
    replaced: dict[str, QuantLinear] = {}
    for name, linear in found:
        own = scheme if targets is None else targets.scheme_for(prefix + name)
        if own is None:  # an override keeps it in high precision
            continue
        try:
            qlinear = QuantLinear.from_scheme(linear, own, lwc=lwc, lac=lac, rounding=rounding)
        except ValueError as err:
            raise ValueError(f"cannot quantize {name!r} with {own.name}: {err}") from err
        qlinear.scheme = own
        parent_name, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(parent_name), leaf, qlinear)
        replaced[name] = qlinear
    return replaced


@torch.no_grad()
def cast_for_compute(module: nn.Module, dtype: torch.dtype, keep_fp32: tuple[str, ...] = ()) -> nn.Module:
    """Cast the float parameters and buffers below ``module`` to the compute ``dtype``, except those whose
    precision is set elsewhere; returns ``module``.

    Kept as they are: the weights of its :class:`QuantLinear` layers (their narrower storage dtype, read in
    fp32 by every forward, which is exact: half the memory of an fp32 copy, the same results), the tensors of
    its quantizers and smoothers (the learned state, fp32), and the tensors whose names end with
    ``keep_fp32`` (a model family's fp32 router tensors). A block loaded in its stored bf16, quantized and
    cast to fp32 this way computes exactly as one loaded in fp32.
    """
    keep = {id(m.weight) for m in module.modules() if isinstance(m, QuantLinear)}
    for child in module.modules():
        if isinstance(child, (Quantizer, Smoother)):
            keep.update(id(t) for t in (*child.parameters(), *child.buffers()))
    if keep_fp32:
        keep.update(id(t) for name, t in (*module.named_parameters(), *module.named_buffers())
                    if name.endswith(keep_fp32))
    for child in module.modules():
        for name, tensor in [*child.named_parameters(recurse=False), *child.named_buffers(recurse=False)]:
            if tensor is None or id(tensor) in keep or not tensor.is_floating_point() or tensor.dtype == dtype:
                continue
            if isinstance(tensor, nn.Parameter):
                setattr(child, name, nn.Parameter(tensor.to(dtype), requires_grad=tensor.requires_grad))
            else:
                child._buffers[name] = tensor.to(dtype)
    return module


@torch.no_grad()
def set_quant_state(module: nn.Module, state: QuantState) -> None:
    """Move every :class:`QuantLinear` and :class:`Quantizer` below ``module`` to ``state``.

    Args:
        module: Root module.
        state: The new state.
    """
    for child in module.modules():
        if isinstance(child, (QuantLinear, Quantizer, Smoother)):
            child.set_state(state)
