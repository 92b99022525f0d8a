"""The compressed-tensors checkpoint format, as vLLM and ``transformers`` read it.

One config group (``group_0``) targets every ``Linear`` with the model's scheme; when
per-target overrides give some linears another scheme (a recipe's ``overrides``), each
other scheme is one more group (``group_1``, ...) that lists the full names of its
linears, which both compressed-tensors and vLLM match before a class name. The modules
left in high precision are listed by their full names in ``ignore`` (``re:`` regexes
are understood when reading, as compressed-tensors matches them: ``re.match`` on the
full name, any other entry an exact name). Per quantized linear ``N``:

- W8 (``int-quantized``): ``N.weight`` int8 ``[out, in]`` and ``N.weight_scale``
  fp32 ``[out, 1]``;
- W4 (``pack-quantized``): ``N.weight_packed`` int32 ``[out, in / 8]``,
  ``N.weight_scale`` fp32 ``[out, in / g]`` and ``N.weight_shape`` int64 ``[2]``;
- static activations: ``N.input_scale`` fp32 ``[1]`` (and ``N.input_zero_point`` int8 ``[1]`` when
  asymmetric: ``symmetric: false``);

and with an 8-bit KV cache ``<attn>.k_scale`` / ``<attn>.v_scale`` fp32 ``[1]``
beside ``kv_cache_scheme`` (for MLA ``<attn>.attn_mqa.k_scale`` / ``.v_scale``, both the
scale of the latent cache, see :data:`KV_SCALE_NAMES`). Scales are stored in fp32, the dtype the fake-quant
forward computes them in, so the stored values are exactly the trained ones.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ..quantization import QuantScheme, SchemeOverride, TargetSchemes, get_scheme, scheme_name, unpack_int4
from ..utils.checkpoint import CheckpointError

QUANT_METHOD = "compressed-tensors"
DEPLOY_REPORT = "deploy_report.json"
"""Written by ``deploy.py`` into its output, with a record of every file (checked when the folder is read)."""
KV_SCALE_NAMES: dict[str, tuple[str, ...]] = {
    "k_cache_quant": ("k_scale",),
    "v_cache_quant": ("v_scale",),
    "kv_cache_quant": ("attn_mqa.k_scale", "attn_mqa.v_scale"),
}
"""Cache hook of an attention module -> names of its deployed scale (each holds the same value).

GQA attention caches keys and values, each with its own scale, under the attention's
``k_scale`` / ``v_scale`` (what compressed-tensors writes and vLLM maps to its
``attn.k_scale``). MLA caches one tensor, the normed latent with the rotary key
(``kv_lora_rank + qk_rope_head_dim`` wide), under one scale, written under the names
SGLang's DeepSeek loader reads as they are: its MLA cache is the ``self_attn.attn_mqa``
module, whose ``k_scale`` / ``v_scale`` it loads (``deepseek_weight_loader.py``; a
``self_attn.k_scale`` is logged as not found and skipped). vLLM 0.32 loads no
compressed-tensors cache scale for MLA under any name (its ``MLAAttention`` gets no
KV-cache method), see :data:`~cores.quantization.schemes.MLA_KV_NOT_VLLM`."""

FORMAT_BY_BITS = {8: "int-quantized", 4: "pack-quantized"}
WEIGHT_NAMES = {8: ("weight", "weight_scale"), 4: ("weight_packed", "weight_scale", "weight_shape")}
"""Tensor names of a quantized linear's weight, by code width."""
_ARG_DEFAULTS = {"type": "int", "symmetric": True, "dynamic": False, "group_size": None}
"""compressed-tensors' defaults for fields a config may leave out."""


def _weight_args(scheme: QuantScheme) -> dict:
    group = scheme.w_granularity == "group"
    return {"num_bits": scheme.w_bits, "type": "int", "symmetric": True, "dynamic": False,
            "strategy": "group" if group else "channel", "group_size": scheme.group_size if group else None}


def _input_args(scheme: QuantScheme) -> dict:
    static = scheme.act_mode == "static"
    return {"num_bits": scheme.a_bits, "type": "float" if scheme.act_format == "fp8" else "int",
            "symmetric": scheme.act_symmetric, "dynamic": not static,
            "strategy": "tensor" if static else "token", "group_size": None}


def _kv_args(scheme: QuantScheme) -> dict | None:
    if scheme.kv_bits is None:
        return None
    return {"num_bits": scheme.kv_bits, "type": "float" if scheme.kv_format == "fp8" else "int",
            "symmetric": True, "dynamic": False, "strategy": "tensor", "group_size": None}


def _group(scheme: QuantScheme, targets: list[str]) -> dict:
    return {"targets": targets, "weights": _weight_args(scheme), "input_activations": _input_args(scheme),
            "output_activations": None, "format": FORMAT_BY_BITS[scheme.w_bits]}


def quantization_config(scheme: QuantScheme, ignore: Iterable[str],
                        linear_schemes: Mapping[str, QuantScheme] | None = None) -> dict:
    """The ``quantization_config`` entry of ``config.json`` for ``scheme``.

    The format is also set on each config group: compressed-tensors would
    otherwise infer ``int-quantized`` for W4A8 and expect unpacked int8 weights.
    The top-level ``format`` is ``mixed-precision`` when the groups' formats differ.

    Args:
        scheme: What was quantized (group_0, targeting ``Linear``; its KV cache is the model's).
        ignore: Full names of the linear modules kept in high precision.
        linear_schemes: The scheme of each quantized linear by full name, when some differ from ``scheme``:
            each other scheme becomes a group listing its linears.

    Returns:
        A JSON-ready dict.
    """
    groups = {"group_0": _group(scheme, ["Linear"])}
    others: dict[QuantScheme, list[str]] = {}
    for name, own in sorted((linear_schemes or {}).items()):
        if own != scheme:
            others.setdefault(own, []).append(name)
    for i, (own, names) in enumerate(others.items(), start=1):
        if (own.kv_bits, own.kv_format) != (scheme.kv_bits, scheme.kv_format):
            raise ValueError(f"{names[0]}: {own.name} has another KV cache than {scheme.name}; the KV cache is one "
                             "scheme for the model")
        groups[f"group_{i}"] = _group(own, names)
    formats = {g["format"] for g in groups.values()}
    return {
        "quant_method": QUANT_METHOD,
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": groups,
        "kv_cache_scheme": _kv_args(scheme),
        "ignore": sorted(ignore),
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
    }


def ignore_match(name: str, ignore: Iterable[str]) -> bool:
    """Whether a full module name is in a compressed-tensors ``ignore`` list."""
    return any(re.match(p[3:], name) is not None if p.startswith("re:") else p == name for p in ignore)


def _group_scheme(group: Mapping, kv: Mapping | None, where: str) -> QuantScheme:
    """The scheme of one config group (the KV cache is the config's ``kv_cache_scheme``).

    Raises:
        CheckpointError: When the group is not one we deploy (naming the field that differs).
    """
    weights, acts = group.get("weights") or {}, group.get("input_activations") or {}
    w_bits = weights.get("num_bits")
    if w_bits not in FORMAT_BY_BITS:
        raise CheckpointError(f"{where}: weights of {w_bits} bits are not supported; use 4 or 8")
    act = "dynamic" if acts.get("dynamic") else "static"
    try:
        scheme = get_scheme(scheme_name(w_bits, kv=kv is not None), act_mode=act,
                            kv_format="fp8" if kv is None or kv.get("type") == "float" else "int8",
                            group_size=weights.get("group_size") if weights.get("strategy") == "group" else None,
                            act_format="fp8" if acts.get("type") == "float" else "int8",
                            act_symmetric=bool(acts.get("symmetric", True)) or act != "static")
    except ValueError as err:
        raise CheckpointError(f"{where}: unsupported quantization_config: {err}") from err
    want_group, want_kv = _group(scheme, []), _kv_args(scheme)
    diff = [] if group.get("format") == want_group["format"] else [
        f"format: {group.get('format')!r}, expected {want_group['format']!r}"]
    for part, expected, got in (("weights", want_group["weights"], weights),
                                ("input_activations", want_group["input_activations"], acts),
                                ("kv_cache_scheme", want_kv or {}, kv or {})):
        diff += [f"{part}.{k}: {got.get(k, _ARG_DEFAULTS.get(k))!r}, expected {v!r}"
                 for k, v in expected.items() if got.get(k, _ARG_DEFAULTS.get(k)) != v]
    if diff:
        raise CheckpointError(f"{where} differs from {scheme.name} as deployed here: {'; '.join(diff)}")
    return scheme


@dataclass(frozen=True)
class DeployedFormat:
    """What a compressed-tensors checkpoint of ours holds, parsed from ``config.json``.

    Attributes:
        scheme: The quantization scheme of the group that targets ``Linear`` (the model's; its KV cache is the
            checkpoint's ``kv_cache_scheme``).
        ignore: The ``ignore`` list (full module names or ``re:`` regexes).
        overrides: The other config groups, in order: their targets and scheme.
    """

    scheme: QuantScheme
    ignore: tuple[str, ...]
    overrides: tuple[SchemeOverride, ...] = ()

    @classmethod
    def from_config(cls, config: Mapping) -> DeployedFormat:
        """Parse the ``quantization_config`` of a ``config.json`` dict.

        Raises:
            CheckpointError: When it is not a compressed-tensors config this
                project can run (the message says which field differs).
        """
        qcfg = config.get("quantization_config") or {}
        if qcfg.get("quant_method") != QUANT_METHOD:
            raise CheckpointError(f"quant_method is {qcfg.get('quant_method')!r}, not {QUANT_METHOD!r}")
        groups = dict(qcfg.get("config_groups") or {})
        default = [k for k, g in groups.items() if g.get("targets") == ["Linear"]]
        if len(default) != 1 or any("Linear" in g.get("targets", ()) for k, g in groups.items() if k != default[0]):
            raise CheckpointError(f"expected one config group targeting ['Linear'] (and others naming their "
                                  f"linears), got {qcfg.get('config_groups')}")
        kv = qcfg.get("kv_cache_scheme")
        schemes = {}
        for key, group in groups.items():
            if not group.get("format"):  # compressed-tensors: a group without one takes the config's
                group = {**group, "format": qcfg.get("format")}
            schemes[key] = _group_scheme(group, kv, f"config_groups.{key}")
        overrides = tuple(SchemeOverride(tuple(groups[k]["targets"]), schemes[k]) for k in groups if k != default[0])
        try:
            TargetSchemes(schemes[default[0]], overrides)
        except ValueError as err:
            raise CheckpointError(str(err)) from err
        return cls(schemes[default[0]], tuple(qcfg.get("ignore") or ()), overrides)

    @property
    def targets(self) -> TargetSchemes:
        """The scheme of every linear (compressed-tensors' matching: exact name, regex, class name)."""
        return TargetSchemes(self.scheme, self.overrides)

    def is_ignored(self, name: str) -> bool:
        """Whether the linear with full name ``name`` was left in high precision."""
        return ignore_match(name, self.ignore)


def weight_codes(tensors: Mapping[str, Tensor], prefix: str, bits: int, where: str = "") -> tuple[Tensor, Tensor]:
    """Integer codes and scale of one deployed linear.

    Args:
        tensors: Tensors by name.
        prefix: The linear's name (as keyed in ``tensors``) followed by a dot.
        bits: 8 or 4.
        where: Where the tensors come from, for error messages.

    Returns:
        ``(codes, scale)``: int8 codes ``[out, in]`` and the fp32 scale.

    Raises:
        CheckpointError: When a tensor is missing or has the wrong dtype.
    """
    missing = [prefix + n for n in WEIGHT_NAMES[bits] if prefix + n not in tensors]
    if missing:
        raise CheckpointError(f"{where} has no tensors {missing}; the checkpoint does not match its quantization_config")
    scale = tensors[prefix + "weight_scale"].float()
    if bits == 8:
        codes = tensors[prefix + "weight"]
        if codes.dtype != torch.int8:
            raise CheckpointError(f"{where}: {prefix}weight is {codes.dtype}, expected int8 codes")
        return codes, scale
    return unpack_int4(tensors[prefix + "weight_packed"], tensors[prefix + "weight_shape"].tolist()), scale


def dequantize_codes(codes: Tensor, scale: Tensor, out: Tensor | None = None) -> Tensor:
    """fp32 weight ``codes * scale``, one scale per row (``[out, 1]``) or per group (``[out, in / g]``).

    Args:
        codes: Integer codes.
        scale: Scales; each covers ``codes.numel() / scale.numel()`` consecutive codes.
        out: fp32 tensor shaped like ``codes`` to write into (and return).
    """
    out = torch.empty(codes.shape, device=codes.device) if out is None else out
    out.copy_(codes).view(*scale.shape, -1).mul_(scale.float().unsqueeze(-1))
    return out
