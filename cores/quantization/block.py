"""Turn a float decoder block into its quantized twin, and move its learned state.

One function builds the quantized block for training, evaluation and deploy (so it
lives here, below all three), so the forward that is trained is the forward that is
shipped:

- every ``nn.Linear`` not ignored becomes a :class:`QuantLinear`;
- linears that read the same tensor (a layer's ``shared_input_groups``: q/k/v,
  gate/up) share one input quantizer, as a serving engine fuses them under one
  ``input_scale``;
- with a C8 scheme, every ``*_cache_quant`` hook of an attention module gets a
  :class:`KVQuantizer` (the tensors the engine caches);
- with ``smooth``, every smoothing pair the block declares (``smooth_norms``: a norm
  and the linears that alone read it; ``smooth_pairs``: a linear and the linear that
  reads it) gets a :class:`Smoother`, when all of its linears are quantized.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .qlinear import QuantLinear, quantize_linears, set_quant_state
from .quantizers import ROUND_OFFSET_DTYPE, KVQuantizer, QuantState
from .schemes import DEFAULT_IGNORE, QuantScheme, TargetSchemes
from .smoothing import Smoother

CACHE_HOOKS = ("k_cache_quant", "v_cache_quant", "kv_cache_quant")  # GQA keys / values, MLA latent + rope key
_STATE_MARKERS = ("_quantizer.", "cache_quant.", "smooth.")


def quantize_block(
    block: nn.Module,
    scheme: QuantScheme,
    ignore: Sequence[str] = DEFAULT_IGNORE,
    lwc: bool = True,
    lac: bool = True,
    scope: str = "",
    rounding: bool = False,
    smooth: bool = False,
    smooth_dtype: torch.dtype = torch.bfloat16,
    targets: TargetSchemes | None = None,
    prefix: str = "",
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
        rounding: learn a rounding offset per weight (SignRound-style).
        smooth: add learned smoothing scales (:mod:`~cores.quantization.smoothing`).
        smooth_dtype: the dtype the checkpoint stores the norm weights (and biases) smoothing rewrites in.
        targets: per-target schemes on full module names (``scheme`` is their default; its KV cache is the
            block's); None: ``scheme`` for every linear.
        prefix: the block's full name and a dot (``model.layers.3.``), which ``targets`` match under.

    Raises:
        ValueError: when linears that read one input (q/k/v, gate/up: one fused layer when served) get
            different schemes.
    """
    quantize_linears(block, scheme, ignore, lwc=lwc, lac=lac, rounding=rounding, scope=scope, targets=targets,
                     prefix=prefix)
    if smooth:
        add_smoothers(block, scope, smooth_dtype)
    for path, module in block.named_modules():
        if not f"{path}.".startswith(scope):
            continue
        for group in getattr(module, "shared_input_groups", ()):
            linears = [getattr(module, name) for name in group if isinstance(getattr(module, name), QuantLinear)]
            if targets is not None:
                _check_fused(prefix + (f"{path}." if path else ""), module, group)
            for linear in linears[1:]:
                linear.input_quantizer = linears[0].input_quantizer
        if scheme.kv_bits is not None:
            for hook in CACHE_HOOKS:
                if hasattr(module, hook):
                    device = next(module.parameters()).device
                    setattr(module, hook, KVQuantizer(scheme.kv_format, lac=lac, device=device))
    return block


def _check_fused(base: str, module: nn.Module, group: Sequence[str]) -> None:
    """Refuse a shared-input group whose linears got different schemes (or only some of them quantized)."""
    kinds = {name: getattr(module, name).scheme if isinstance(getattr(module, name), QuantLinear) else None
             for name in group}
    if len(set(kinds.values())) > 1:
        got = ", ".join(f"{base}{n}: {s.name + ' ' + s.act_mode if s else 'high precision'}" for n, s in kinds.items())
        raise ValueError(f"{', '.join(base + n for n in group)} read one input and are one fused layer in vLLM, "
                         f"so they need one scheme; the overrides give {got}: target all of them or none")


def add_smoothers(block: nn.Module, scope: str = "", dtype: torch.dtype = torch.bfloat16
                  ) -> list[tuple[Smoother, list[QuantLinear]]]:
    """Put a :class:`Smoother` on every declared pair of ``block`` whose linears are all quantized (and in scope).

    Returns:
        ``(smoother, consumers)`` for each pair, for :func:`init_smoothers`.
    """
    pairs = []
    for path, module in block.named_modules():
        base = f"{path}." if path else ""
        for norm_name, readers in getattr(module, "smooth_norms", ()):
            linears = [module.get_submodule(r) for r in readers]
            if readers and all(isinstance(m, QuantLinear) and f"{base}{r}.".startswith(scope)
                               for m, r in zip(linears, readers)):
                norm = module.get_submodule(norm_name)
                norm.smooth = Smoother(norm.weight.shape[0], device=norm.weight.device, dtype=dtype)
                for linear in linears:
                    object.__setattr__(linear, "in_smooth", norm.smooth)
                pairs.append((norm.smooth, linears))
        for producer, consumer, repeat, head_dim in getattr(module, "smooth_pairs", ()):
            p, c = getattr(module, producer), getattr(module, consumer)
            if isinstance(p, QuantLinear) and isinstance(c, QuantLinear) and f"{base}{producer}.".startswith(scope):
                p.out_smooth = Smoother(p.out_features, repeat, head_dim, device=p.weight.device, dtype=dtype)
                object.__setattr__(c, "in_smooth", p.out_smooth)
                pairs.append((p.out_smooth, [c]))
    return pairs


def smoothers(block: nn.Module) -> list[tuple[Smoother, list[QuantLinear]]]:
    """Every smoother of a quantized block with the linears that read through it."""
    consumers: dict[int, list[QuantLinear]] = {}
    for module in block.modules():
        if isinstance(module, QuantLinear) and module.in_smooth is not None:
            consumers.setdefault(id(module.in_smooth), []).append(module)
    return [(m, consumers.get(id(m), [])) for m in block.modules() if isinstance(m, Smoother)]


def init_smoothers(block: nn.Module, alpha: float | None) -> None:
    """SmoothQuant scales ``act ** alpha / weight ** (1 - alpha)`` from the first calibration pass (None: identity)."""
    for smoother, linears in smoothers(block):
        smoother.init_scale(alpha, [linear.weight for linear in linears])


def quant_state_dict(block: nn.Module, prefix: str = "") -> dict[str, Tensor]:
    """The learned and calibrated quantizer tensors of ``block`` (no weights), on CPU.

    Rounding offsets are stored as :data:`ROUND_OFFSET_DTYPE`, the values every forward
    outside training uses.

    Args:
        block: a quantized block or sub-module.
        prefix: prepended to every name (a sub-module's name in its block).
    """
    return {
        prefix + k: v.detach().to("cpu", ROUND_OFFSET_DTYPE if k.endswith(".round_offset") else v.dtype).clone()
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
