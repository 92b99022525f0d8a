"""Quantization schemes: typed, validated configs registered by name.

| name      | weights                      | activations | KV cache     |
|-----------|------------------------------|-------------|--------------|
| w8a8c16   | int8 per output channel      | int8        | bf16         |
| w8a8c8    | int8 per output channel      | int8        | int8 or fp8  |
| w4a8c16   | int4, groups of 128 (input)  | int8        | bf16         |
| w4a8c8    | int4, groups of 128 (input)  | int8        | int8 or fp8  |

Weights and the KV cache are symmetric. Activations are int8, static per-tensor
(symmetric, or asymmetric with an ``input_zero_point``: what vLLM's int8 kernels run
as ``azp`` and NPU engines as an input offset) or dynamic per-token, or
float8-e4m3 dynamic per-token with int4 weights (what vLLM's W4A8-FP8 kernels run
on GPU).

Each registered scheme is complete, with the defaults the commands use: int8 dynamic
per-token symmetric activations, groups of 128 for W4, an fp8 KV cache for C8.
:func:`get_scheme` applies a run's choices (``act_mode``, ``act_format``,
``act_symmetric``, ``kv_format``, ``group_size``) as one ``dataclasses.replace``,
validated like any scheme; :func:`scheme_name` is the one map from weight bits and
KV cache to a name.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from cores.quantization.primitives import Granularity, per_channel, per_group, per_tensor, per_token
from cores.quantization.quantizers import ActFormat, ActMode, KVFormat

DEFAULT_IGNORE: tuple[str, ...] = (
    "lm_head",
    r"re:.*embed_tokens$",
    r"re:.*norm$",
    r"re:.*mlp\.gate$",
    r"re:.*self_attn\.kv_b_proj$",
    r"re:.*self_attn\.indexer\.",
)
"""Modules left in high precision by default: embeddings, ``lm_head``, norms, MoE router gates, and
the DeepSeek recipe's MLA up-projection ``kv_b_proj`` and V3.2 sparse-attention indexer."""

DEFAULT_GROUP_SIZE = 128

STATIC_EXPERTS_UNSERVED = (
    "the routed experts get static input scales; vLLM's int8 fused-MoE kernels take dynamic per-token "
    "activations only and refuse them: to serve this MoE model there, train and deploy with --act dynamic"
)
"""What training or deploying a MoE model with static activations warns (our loader reads it either way)."""

W8_STATIC_AMX_DYNAMIC = (
    "vLLM 0.32 on an x86 CPU with AMX runs int8 linears through a kernel that ignores static input scales "
    "(_apply_weights_sgl in vllm/model_executor/kernels/linear/scaled_mm/cpu.py quantizes per token): there it "
    "serves this checkpoint as dynamic, not as trained; GPUs and CPUs without AMX apply the scales "
    "(scripts/check_serving.py --int8_kernel onednn forces them on CPU)"
)
W4_STATIC_INT8_UNSERVED = (
    "vLLM has no kernel for int4 weights with static int8 activations and refuses this checkpoint "
    "('No compressed-tensors compatible scheme was found'): for vLLM use --act dynamic (int8 per token), "
    "or --act dynamic --act_format fp8 on Hopper GPUs"
)
W4A8_FP8_HOPPER_ONLY = (
    "int4 weights with fp8 activations run in vLLM's W4A8-FP8 kernels on Hopper GPUs (compute capability 9.0) "
    "only; vLLM refuses the checkpoint elsewhere, its CPU build included"
)
MLA_KV_NOT_VLLM = (
    "vLLM 0.32 loads no KV-cache scale for MLA attention from a compressed-tensors checkpoint (its MLAAttention "
    "gets no KV-cache method; it warns 'k_scale is not loaded' and runs an fp8 cache at scale 1.0): the learned "
    "latent-cache scale (self_attn.attn_mqa.k_scale) serves in SGLang; for vLLM deploy the attention with a bf16 "
    "cache (--cls bf16 / a c16 scheme)"
)
KV_INT8_NOT_VLLM = (
    "an int8 KV cache is the NPU engines' C8; vLLM caches fp8 and would apply these int8 scales to an fp8 cache, "
    "which is not the forward trained here: deploy with --kv_format fp8 for vLLM"
)


@dataclass(frozen=True)
class QuantScheme:
    """What a deployed checkpoint quantizes, and how.

    Attributes:
        name: Registry name.
        w_bits: Weight code width (4 or 8).
        w_granularity: ``"channel"`` (one scale per output row) or ``"group"``.
        group_size: Input-dim group length for ``"group"``; ``None`` otherwise.
        a_bits: Activation code width (8).
        act_mode: ``"static"`` per-tensor input scale or ``"dynamic"`` per-token.
        kv_bits: KV-cache width (8), or ``None`` to keep the cache in bf16.
        kv_format: ``"int8"`` or ``"fp8"`` when ``kv_bits`` is set; ``None`` otherwise.
        act_format: ``"int8"`` activation codes, or ``"fp8"`` (float8-e4m3, dynamic per-token,
            int4 weights only: the W4A8 that vLLM runs on GPU).
        act_symmetric: False: static int8 activations with a zero point (``input_scale`` and
            ``input_zero_point``, the range ``[min, max]`` mapped onto -128..127).
    """

    name: str
    w_bits: int
    w_granularity: Literal["channel", "group"]
    group_size: int | None
    a_bits: int
    act_mode: ActMode
    kv_bits: int | None
    kv_format: KVFormat | None
    act_format: ActFormat = "int8"
    act_symmetric: bool = True

    def __post_init__(self) -> None:
        if self.w_bits not in (4, 8):
            raise ValueError(f"{self.name}: w_bits must be 4 or 8, got {self.w_bits}")
        if self.w_granularity == "channel":
            if self.group_size is not None:
                raise ValueError(f"{self.name} quantizes weights per output channel; group_size={self.group_size} "
                                 "does not apply")
        elif self.w_granularity == "group":
            if self.group_size is None or self.group_size <= 0 or self.group_size % 8 != 0:
                raise ValueError(
                    f"{self.name}: group weights need a positive group_size divisible by 8, got {self.group_size}"
                )
        else:
            raise ValueError(f"{self.name}: w_granularity must be 'channel' or 'group', got {self.w_granularity!r}")
        if self.a_bits != 8:
            raise ValueError(f"{self.name}: a_bits must be 8, got {self.a_bits}")
        if self.act_mode not in ("static", "dynamic"):
            raise ValueError(f"{self.name}: act_mode must be 'static' or 'dynamic', got {self.act_mode!r}")
        if self.act_format not in ("int8", "fp8"):
            raise ValueError(f"{self.name}: act_format must be 'int8' or 'fp8', got {self.act_format!r}")
        if self.act_format == "fp8" and (self.act_mode != "dynamic" or self.w_bits != 4):
            raise ValueError(
                f"{self.name}: fp8 activations are dynamic per-token with int4 weights (vLLM's W4A8-FP8 kernels); "
                f"got {self.act_mode} activations with {self.w_bits}-bit weights: use --act dynamic with a w4 "
                "scheme, or int8 activations"
            )
        if not self.act_symmetric and (self.act_mode != "static" or self.act_format != "int8"):
            raise ValueError(
                f"{self.name}: a zero point is for static int8 activations (one range per tensor); got "
                f"{self.act_mode} {self.act_format} activations: use --act static, or drop --act_zero_point"
            )
        if self.kv_bits is None:
            if self.kv_format is not None:
                raise ValueError(f"{self.name}: kv_format {self.kv_format!r} given without kv_bits")
        elif self.kv_bits != 8 or self.kv_format not in ("int8", "fp8"):
            raise ValueError(
                f"{self.name}: the KV cache takes kv_bits=8 with kv_format 'int8' or 'fp8', "
                f"got kv_bits={self.kv_bits}, kv_format={self.kv_format!r}"
            )

    @property
    def weight_granularity(self) -> Granularity:
        """Scale granularity of the weights."""
        return per_channel() if self.group_size is None else per_group(self.group_size)

    @property
    def act_granularity(self) -> Granularity:
        """Scale granularity of the activations."""
        return per_tensor() if self.act_mode == "static" else per_token()


def scheme_identity(scheme: QuantScheme) -> dict:
    """``scheme``'s fields for a run identity: ``act_symmetric`` only when False, so the identity of a
    symmetric run is the one it had before asymmetric activations existed (and old param dirs still match)."""
    out = asdict(scheme)
    if out["act_symmetric"]:
        del out["act_symmetric"]
    return out


_SCHEMES: dict[str, QuantScheme] = {}


def register_scheme(scheme: QuantScheme) -> QuantScheme:
    """Add ``scheme`` to the registry under ``scheme.name``.

    Raises:
        ValueError: When the name is taken.
    """
    if scheme.name in _SCHEMES:
        raise ValueError(f"scheme {scheme.name!r} is already registered")
    _SCHEMES[scheme.name] = scheme
    return scheme


def scheme_names() -> list[str]:
    """Registered scheme names, sorted."""
    return sorted(_SCHEMES)


SCHEME_CHOICES: tuple[str, ...] = ("act_mode", "act_format", "act_symmetric", "kv_format", "group_size")
"""The :class:`QuantScheme` fields a run chooses (:func:`get_scheme`'s overrides); the others are the name's."""


def get_scheme(name: str, **overrides: Any) -> QuantScheme:
    """The registered scheme ``name`` with a run's choices: ``dataclasses.replace(registered, **overrides)``.

    An override of None keeps the registered value (an unset flag). ``kv_format`` is dropped by a scheme with a
    bf16 KV cache, which has no format to choose.

    Args:
        name: Registered scheme name, e.g. ``"w4a8c8"``.
        **overrides: Fields of :data:`SCHEME_CHOICES`, by name: ``act_mode`` (``"static"`` per-tensor or
            ``"dynamic"`` per-token), ``act_format`` (``"int8"``, or ``"fp8"`` for dynamic activations with int4
            weights), ``act_symmetric`` (False: static int8 activations with a zero point), ``kv_format``
            (``"int8"`` or ``"fp8"``), ``group_size`` (of a group scheme).

    Returns:
        The validated scheme.

    Raises:
        ValueError: On an unknown name (the message lists the valid ones), a ``group_size`` for a per-channel
            scheme, or an invalid choice.
        TypeError: On an override that is not one of :data:`SCHEME_CHOICES`.
    """
    if name not in _SCHEMES:
        raise ValueError(f"unknown quantization scheme {name!r}; valid schemes: {', '.join(scheme_names())}")
    unknown = sorted(set(overrides) - set(SCHEME_CHOICES))
    if unknown:
        raise TypeError(f"get_scheme({name!r}): {', '.join(unknown)} cannot be chosen per run; the choices are "
                        f"{', '.join(SCHEME_CHOICES)}")
    base = _SCHEMES[name]
    chosen = {k: v for k, v in overrides.items() if v is not None and not (k == "kv_format" and base.kv_bits is None)}
    return replace(base, **chosen)


def scheme_name(w_bits: int, kv: bool) -> str:
    """The name of the registered scheme with ``w_bits`` weights and an 8-bit KV cache (``kv``) or a bf16 one.

    Raises:
        ValueError: When no registered scheme has them (the message lists the valid ones).
    """
    for scheme in _SCHEMES.values():
        if scheme.w_bits == w_bits and (scheme.kv_bits is not None) == kv:
            return scheme.name
    raise ValueError(f"no quantization scheme has {w_bits}-bit weights and a {'8-bit' if kv else 'bf16'} KV cache; "
                     f"valid schemes: {', '.join(scheme_names())}")


def matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether a module name matches any pattern.

    A pattern starting with ``re:`` is a regular expression applied with
    ``re.match`` (as compressed-tensors' ``ignore`` does); any other pattern is an
    ``fnmatch`` glob on the whole name (a plain name matches only itself).

    Args:
        name: Dotted module name, relative to the module being quantized.
        patterns: Patterns to test.

    Returns:
        True on the first match.
    """
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.match(pattern[3:], name):
                return True
        elif fnmatch.fnmatchcase(name, pattern):
            return True
    return False


def serving_notes(scheme: QuantScheme, moe: bool = False, mla: bool = False) -> list[str]:
    """What vLLM (0.32, from its compressed-tensors scheme selection) refuses or runs otherwise for ``scheme``.

    Args:
        scheme: The scheme of a checkpoint.
        moe: Whether the model has routed experts that the scheme quantizes.
        mla: Whether the model's attention is MLA (its KV cache is the latent).

    Returns:
        One message per problem, each naming the alternative; empty when vLLM runs the scheme as trained.
    """
    notes = []
    if moe and scheme.act_mode == "static":
        notes.append(STATIC_EXPERTS_UNSERVED)
    if scheme.w_bits == 4 and scheme.act_mode == "static":
        notes.append(W4_STATIC_INT8_UNSERVED)
    if scheme.w_bits == 8 and scheme.act_mode == "static":
        notes.append(W8_STATIC_AMX_DYNAMIC)
    if scheme.act_format == "fp8":
        notes.append(W4A8_FP8_HOPPER_ONLY)
        if scheme.group_size != 128:
            notes.append(f"vLLM's W4A8-FP8 kernels take groups of 128 only and refuse groups of {scheme.group_size}: "
                         "use --group_size 128 where the model's dims allow it, or int8 activations")
    if scheme.kv_format == "int8":
        notes.append(KV_INT8_NOT_VLLM)
    if mla and scheme.kv_bits is not None:
        notes.append(MLA_KV_NOT_VLLM)
    return notes


_W8 = {"w_bits": 8, "w_granularity": "channel", "group_size": None}
_W4 = {"w_bits": 4, "w_granularity": "group", "group_size": DEFAULT_GROUP_SIZE}
_A8 = {"a_bits": 8, "act_mode": "dynamic", "act_format": "int8", "act_symmetric": True}
_C16 = {"kv_bits": None, "kv_format": None}
_C8 = {"kv_bits": 8, "kv_format": "fp8"}
register_scheme(QuantScheme(name="w8a8c16", **_W8, **_A8, **_C16))
register_scheme(QuantScheme(name="w8a8c8", **_W8, **_A8, **_C8))
register_scheme(QuantScheme(name="w4a8c16", **_W4, **_A8, **_C16))
register_scheme(QuantScheme(name="w4a8c8", **_W4, **_A8, **_C8))


# ---- per-target schemes ----------------------------------------------------------------------------------------

def target_match_rank(name: str, class_name: str, target: str) -> int | None:
    """How specifically ``target`` matches the module ``name`` of class ``class_name`` (compressed-tensors order).

    Returns:
        0 for an exact name, 1 for a ``re:`` regex (``re.match`` on the full name), 2 for a class name; None when
        it does not match.
    """
    if target.startswith("re:"):
        return 1 if re.match(target[3:], name) else None
    if target == name:
        return 0
    return 2 if target == class_name else None


@dataclass(frozen=True)
class SchemeOverride:
    """Linears quantized with another scheme than the model's (one ``config_groups`` entry when deployed).

    Attributes:
        targets: Full module names, ``re:<regex>`` (``re.match`` on the full name) or class names.
        scheme: The scheme of those linears; None keeps them in high precision.
    """

    targets: tuple[str, ...]
    scheme: QuantScheme | None

    def to_dict(self) -> dict:
        """JSON-ready form (a param dir's ``run.json``)."""
        return {"targets": list(self.targets), "scheme": None if self.scheme is None else scheme_identity(self.scheme)}

    @classmethod
    def from_dict(cls, data: dict) -> SchemeOverride:
        return cls(tuple(data["targets"]), None if data["scheme"] is None else QuantScheme(**data["scheme"]))


@dataclass(frozen=True)
class TargetSchemes:
    """The scheme of every linear of a model: a default and per-target overrides.

    A linear takes the scheme of the override whose target matches it most specifically, as compressed-tensors
    picks among config groups: an exact name before a regex before a class name, then the first override in
    order; a linear no override matches takes ``default``.

    The KV cache is one scheme for the model (``kv_cache_scheme``): overrides must keep the default's.

    Attributes:
        default: The model's scheme.
        overrides: Per-target schemes, in order.

    Raises:
        ValueError: When an override's KV cache differs from the default's.
    """

    default: QuantScheme
    overrides: tuple[SchemeOverride, ...] = ()

    def __post_init__(self) -> None:
        for o in self.overrides:
            if o.scheme is not None and (o.scheme.kv_bits, o.scheme.kv_format) != (self.default.kv_bits,
                                                                                   self.default.kv_format):
                raise ValueError(f"override {list(o.targets)}: {o.scheme.name} caches KV as "
                                 f"{o.scheme.kv_format or 'bf16'} but the model's scheme {self.default.name} as "
                                 f"{self.default.kv_format or 'bf16'}: the KV cache is one scheme for the model")

    def scheme_for(self, name: str, class_name: str = "Linear") -> QuantScheme | None:
        """The scheme of the linear with full name ``name`` (None: kept in high precision by an override)."""
        best: tuple[int, int] | None = None
        for i, o in enumerate(self.overrides):
            ranks = [r for t in o.targets if (r := target_match_rank(name, class_name, t)) is not None]
            if ranks and (best is None or (min(ranks), i) < best):
                best = (min(ranks), i)
        return self.default if best is None else self.overrides[best[1]].scheme

    def schemes(self) -> list[QuantScheme]:
        """The distinct schemes, the default first."""
        out = [self.default]
        out += [o.scheme for o in self.overrides if o.scheme is not None and o.scheme not in out]
        return out
