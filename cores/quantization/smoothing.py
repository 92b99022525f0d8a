"""Learned equivalent transformations: per-channel smoothing scales folded into the checkpoint.

A :class:`Smoother` holds one scale ``s`` per channel between a *producer* and the
linears that read it (its *consumers*): the producer's output is divided by ``s`` and
every consumer's weight columns are multiplied by ``s``, so the float function is
unchanged while activation outliers move into the weights (SmoothQuant), where
per-channel weight scales absorb them. Two kinds of producer:

- an RMSNorm (``input_layernorm`` -> q/k/v, ``post_attention_layernorm`` -> gate/up):
  the norm weight becomes ``w / s`` rounded to the checkpoint's norm dtype (bf16
  mostly), the value the deployed checkpoint stores, rounded the same way in every
  forward (straight-through), so what trains is what ships;
- a linear (``v_proj`` -> ``o_proj`` per KV channel, ``up_proj`` -> ``down_proj``): the
  producer's weight rows (and bias) are divided by ``s``; a per-row weight scale makes
  that free for the producer's own quantization.

``s = exp(log_scale)`` keeps the scale positive; ``log_scale`` starts at 0 (identity)
and is set by :meth:`Smoother.init_scale` from the calibration statistics, then
learned with the clips. ``repeat`` serves grouped-query attention: the consumer
``o_proj`` reads ``repeat`` query heads per KV head, so its columns take each KV
channel's scale ``repeat`` times.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cores.quantization.primitives import SCALE_EPS
from cores.quantization.quantizers import QuantState

SMOOTH_RANGE = 1e4
"""Initial scales are clamped to ``[1 / SMOOTH_RANGE, SMOOTH_RANGE]``."""


def round_to_dtype_ste(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` rounded to ``dtype`` and back (fp32), with an identity gradient."""
    rounded = x.to(dtype).float()
    if not (torch.is_grad_enabled() and x.requires_grad):
        return rounded
    return (rounded - x).detach() + x


class Smoother(nn.Module):
    """One learned smoothing scale per channel of a producer.

    Args:
        channels: Producer output channels.
        repeat: How many consecutive blocks of ``head_dim`` consumer columns share each
            block of ``head_dim`` producer channels (GQA: query heads per KV head); 1 otherwise.
        head_dim: Channels per head when ``repeat > 1``.
        device: Device of the scale and the statistics.
        dtype: Dtype the rewritten float tensors (norm weight, producer bias) are stored in.
    """

    def __init__(self, channels: int, repeat: int = 1, head_dim: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        if repeat > 1 and (head_dim is None or channels % head_dim):
            raise ValueError(f"repeat {repeat} needs a head_dim dividing {channels} channels, got {head_dim}")
        self.channels, self.repeat, self.head_dim, self.dtype = channels, repeat, head_dim, dtype
        self.log_scale = nn.Parameter(torch.zeros(channels, device=device))
        self.register_buffer("act_absmax", torch.zeros(channels, device=device), persistent=False)
        self.state = QuantState.FLOAT
        self.observing = True  # the first calibration pass records the unsmoothed input statistics

    def set_state(self, state: QuantState) -> None:
        self.state = state

    def divide(self, tensor: Tensor) -> Tensor:
        """``tensor / s`` rounded to :attr:`dtype` (fp32 values, straight-through): a rewritten norm weight or bias."""
        return round_to_dtype_ste(tensor.float() / self.scale(), self.dtype)

    @property
    def active(self) -> bool:
        """Whether the forward applies the scale (every state but ``FLOAT``)."""
        return self.state is not QuantState.FLOAT

    def scale(self) -> Tensor:
        """``s``, fp32 ``[channels]`` (detached while frozen)."""
        log_scale = self.log_scale.float()
        return (log_scale.detach() if self.state is QuantState.FROZEN else log_scale).exp()

    def consumer_scale(self) -> Tensor:
        """``s`` over the consumer's input columns (each KV channel repeated for its query heads)."""
        s = self.scale()
        if self.repeat == 1:
            return s
        return s.view(-1, 1, self.head_dim).expand(-1, self.repeat, self.head_dim).reshape(-1)

    def _reduce(self, x: Tensor) -> Tensor:
        """Consumer columns ``[..., channels * repeat]`` -> producer channels ``[..., channels]`` by max."""
        if self.repeat == 1:
            return x
        return x.view(*x.shape[:-1], -1, self.repeat, self.head_dim).amax(dim=-2).flatten(-2)

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        """Fold the per-channel absmax of a consumer's (unsmoothed) input into the statistics."""
        if self.observing and x.numel():
            absmax = self._reduce(x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).float())
            self.act_absmax.copy_(torch.maximum(self.act_absmax, absmax))

    @torch.no_grad()
    def weight_absmax(self, weights: list[Tensor]) -> Tensor:
        """Per producer channel, the largest ``|w|`` of the consumers' columns."""
        cols = torch.stack([w.detach().abs().float().amax(dim=0) for w in weights]).amax(dim=0)
        return self._reduce(cols)

    @torch.no_grad()
    def init_scale(self, alpha: float | None, weights: list[Tensor]) -> None:
        """Set ``s = act_absmax ** alpha / weight_absmax ** (1 - alpha)`` (SmoothQuant); None: identity.

        Channels with no observed activation or an all-zero weight column keep ``s = 1``.
        """
        self.observing = False
        if alpha is None:
            self.log_scale.zero_()
            return
        act, wmax = self.act_absmax.float(), self.weight_absmax(weights)
        valid = (act > 0) & (wmax > 0)
        s = act.clamp(min=SCALE_EPS).pow(alpha) / wmax.clamp(min=SCALE_EPS).pow(1 - alpha)
        s = torch.where(valid, s.clamp(1 / SMOOTH_RANGE, SMOOTH_RANGE), torch.ones_like(s))
        self.log_scale.copy_(s.log())

    def extra_repr(self) -> str:
        return f"channels={self.channels}, repeat={self.repeat}, state={self.state.value}"
