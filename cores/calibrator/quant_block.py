"""Turn a float decoder block into its quantized twin, and move its learned state.

One function builds the quantized block for training, evaluation and deploy, so
the forward that is trained is the forward that is shipped:

- every ``nn.Linear`` not ignored becomes a :class:`QuantLinear`;
- linears that read the same tensor (a layer's ``shared_input_groups``: q/k/v,
  gate/up) share one input quantizer, as a serving engine fuses them under one
  ``input_scale``;
- with a C8 scheme, every ``*_cache_quant`` hook of an attention module gets a
  :class:`KVQuantizer` (the tensors the engine caches).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..quantization import (
    DEFAULT_IGNORE,
    KVQuantizer,
    QuantLinear,
    QuantScheme,
    QuantState,
    quantize_linears,
    set_quant_state,
)

CACHE_HOOKS = ("k_cache_quant", "v_cache_quant", "kv_cache_quant")  # GQA keys / values, MLA latent + rope key
_STATE_MARKERS = ("_quantizer.", "cache_quant.")


def quantize_block(
    block: nn.Module,
    scheme: QuantScheme,
    ignore: Sequence[str] = DEFAULT_IGNORE,
    lwc: bool = True,
    lac: bool = True,
    scope: str = "",
) -> nn.Module:
    """Swap quantizers into ``block`` in place; it is returned in ``FLOAT`` state.

    Args:
        block: a materialised decoder block.
        scheme: weights, activations and KV cache settings.
        ignore: module-name patterns to keep in high precision.
        lwc: learn weight clipping.
        lac: learn clipping of static activation and KV scales.
        scope: quantize only below this relative name prefix (``"self_attn."``,
            ``"mlp.experts.3."``): one sub-block of a train mode; the rest stays float.
    """
    quantize_linears(block, scheme, ignore, lwc=lwc, lac=lac, scope=scope)
    for path, module in block.named_modules():
        if not f"{path}.".startswith(scope):
            continue
        for group in getattr(module, "shared_input_groups", ()):
            linears = [getattr(module, name) for name in group if isinstance(getattr(module, name), QuantLinear)]
            for linear in linears[1:]:
                linear.input_quantizer = linears[0].input_quantizer
        if scheme.kv_bits is not None:
            for hook in CACHE_HOOKS:
                if hasattr(module, hook):
                    device = next(module.parameters()).device
                    setattr(module, hook, KVQuantizer(scheme.kv_format, lac=lac, device=device))
    return block


def quant_state_dict(block: nn.Module, prefix: str = "") -> dict[str, Tensor]:
    """The learned and calibrated quantizer tensors of ``block`` (no weights), on CPU.

    Args:
        block: a quantized block or sub-module.
        prefix: prepended to every name (a sub-module's name in its block).
    """
    return {
        prefix + k: v.detach().cpu().clone()
        for k, v in block.state_dict().items() if any(m in k for m in _STATE_MARKERS)
    }


def load_quant_state(block: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load tensors from :func:`quant_state_dict` into a block built the same way.

    Raises:
        ValueError: when the names or shapes differ (params from another scheme,
            ignore list or model), naming ``source``.
    """
    expected = quant_state_dict(block)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    bad_shape = [k for k in set(expected) & set(state) if expected[k].shape != state[k].shape]
    if missing or unexpected or bad_shape:
        raise ValueError(
            f"{source} does not fit this block: missing {missing[:4]}, unexpected {unexpected[:4]}, "
            f"wrong shape {bad_shape[:4]}. It was made with another scheme, ignore list or model."
        )
    with torch.no_grad():
        params = dict(block.named_parameters(remove_duplicate=False)) | dict(block.named_buffers(remove_duplicate=False))
        for name, tensor in state.items():
            params[name].copy_(tensor)


def learnable_parameters(block: nn.Module) -> list[nn.Parameter]:
    """Every clipping parameter of ``block``, each once."""
    seen: dict[int, nn.Parameter] = {}
    for name, param in block.named_parameters():
        if any(m in name for m in _STATE_MARKERS):
            seen[id(param)] = param
    return list(seen.values())


def freeze(block: nn.Module) -> nn.Module:
    """Quantizers to ``FROZEN``: weights quantized once, nothing trainable."""
    set_quant_state(block, QuantState.FROZEN)
    return block
