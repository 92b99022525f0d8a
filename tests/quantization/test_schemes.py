"""Scheme registry, validation and ignore-pattern matching."""

from __future__ import annotations

from dataclasses import asdict, replace

import pytest

from cores.quantization import (
    DEFAULT_GROUP_SIZE,
    DEFAULT_IGNORE,
    SCHEME_CHOICES,
    QuantScheme,
    get_scheme,
    matches,
    per_channel,
    per_group,
    per_tensor,
    per_token,
    serving_notes,
    register_scheme,
    scheme_name,
    scheme_names,
)


def test_registered_schemes() -> None:
    assert scheme_names() == ["w4a8c16", "w4a8c8", "w8a8c16", "w8a8c8"]
    w8 = get_scheme("w8a8c16")
    assert (w8.w_bits, w8.weight_granularity, w8.a_bits, w8.kv_bits, w8.kv_format) == (8, per_channel(), 8, None, None)
    w4 = get_scheme("w4a8c8", act_mode="static", kv_format="int8")
    assert (w4.w_bits, w4.weight_granularity, w4.kv_bits, w4.kv_format) == (4, per_group(128), 8, "int8")
    assert w4.act_granularity == per_tensor() and get_scheme("w4a8c8").act_granularity == per_token()
    assert get_scheme("w4a8c16", group_size=64).weight_granularity == per_group(64)
    assert get_scheme("w8a8c16", kv_format="int8").kv_format is None


@pytest.mark.parametrize("name", ["w4a8c16", "w4a8c8", "w8a8c16", "w8a8c8"])
def test_registered_schemes_are_complete_with_the_command_defaults(name: str) -> None:
    from cores.calibrator.trainer import TrainConfig
    from cores.recipes.schema import Recipe

    scheme = get_scheme(name)
    assert QuantScheme(**asdict(scheme)) == scheme  # every field given, and valid on its own
    group, kv = scheme.w_granularity == "group", name.endswith("c8")
    assert (scheme.group_size, scheme.kv_bits, scheme.kv_format) == (
        DEFAULT_GROUP_SIZE if group else None, 8 if kv else None, "fp8" if kv else None)
    assert (scheme.a_bits, scheme.act_mode, scheme.act_format, scheme.act_symmetric) == (8, "dynamic", "int8", True)
    # what main.py and a recipe resolve when no option is given
    assert TrainConfig(model="m", data_dir="d", output_dir="o", scheme=name).quant_scheme == scheme
    assert Recipe(path="<string>", scheme=name).quant_scheme() == scheme


def test_get_scheme_is_one_replace_of_the_registered_scheme() -> None:
    choices = {"act_mode": "static", "act_format": "int8", "act_symmetric": False, "kv_format": "int8",
               "group_size": 64}
    assert set(choices) == set(SCHEME_CHOICES)
    assert get_scheme("w4a8c8", **choices) == replace(get_scheme("w4a8c8"), **choices)
    assert get_scheme("w4a8c8", act_mode=None, kv_format=None, group_size=None) == get_scheme("w4a8c8")  # None keeps
    c16 = get_scheme("w8a8c16", act_mode="static", kv_format="fp8")  # a bf16 cache drops kv_format
    assert c16 == replace(get_scheme("w8a8c16"), act_mode="static")
    with pytest.raises(TypeError, match=r"w_bits cannot be chosen per run; the choices are act_mode, act_format"):
        get_scheme("w8a8c8", w_bits=4)
    with pytest.raises(TypeError, match="act cannot be chosen per run"):
        get_scheme("w8a8c8", act="static")
    with pytest.raises(TypeError):
        get_scheme("w8a8c8", "static")  # choices by field name only


def test_scheme_name_maps_weight_bits_and_kv_cache_to_the_registry() -> None:
    for name in scheme_names():
        scheme = get_scheme(name)
        assert scheme_name(scheme.w_bits, kv=scheme.kv_bits is not None) == name
    assert (scheme_name(8, kv=True), scheme_name(4, kv=False)) == ("w8a8c8", "w4a8c16")
    with pytest.raises(ValueError, match=r"no quantization scheme has 3-bit weights.*valid schemes: w4a8c16, w4a8c8"):
        scheme_name(3, kv=True)


def test_seed_flags_and_the_sensitivity_twin_use_the_name_map() -> None:
    from cores.cli import UsageError
    from cores.cli.train import scheme_from_bits
    from cores.recipes.sensitivity import _measured_scheme

    got = [scheme_from_bits(w, 8, cls) for w, cls in ((8, "c8"), (None, "bf16"), (4, "c8"), (4, None))]
    assert got == ["w8a8c8", "w8a8c16", "w4a8c8", "w4a8c16"] and scheme_from_bits(None, None, None) is None
    with pytest.raises(UsageError, match="--w_bits 3: no quantization scheme has 3-bit weights"):
        scheme_from_bits(3, 8, "c8")
    assert _measured_scheme("w4a8c8") == get_scheme("w4a8c16", act_mode="dynamic")
    assert _measured_scheme("w8a8c16") == get_scheme("w8a8c16", act_mode="dynamic")


def test_unknown_scheme_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"unknown quantization scheme 'w3a8'.*w4a8c16, w4a8c8, w8a8c16, w8a8c8"):
        get_scheme("w3a8")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "w8a8c8", "group_size": 64}, "w8a8c8 quantizes weights per output channel; group_size=64 does not"),
        ({"name": "w8a8c8", "act_mode": "per_token"}, "act_mode"),
        ({"name": "w8a8c8", "kv_format": "int4"}, "kv_format"),
        ({"name": "w4a8c8", "group_size": 12}, "divisible by 8"),
        ({"name": "w4a8c8", "act_format": "fp4"}, "act_format"),
        ({"name": "w4a8c8", "act_mode": "static", "act_format": "fp8"},
         "fp8 activations are dynamic per-token with int4 weights"),
        ({"name": "w8a8c8", "act_mode": "dynamic", "act_format": "fp8"}, "with 8-bit weights"),
        ({"name": "w8a8c8", "act_mode": "dynamic", "act_symmetric": False}, "zero point is for static int8"),
    ],
)
def test_get_scheme_validates_choices(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        get_scheme(**kwargs)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ((3, "channel", None, 8, "static", None, None), "w_bits"),
        ((8, "channel", 128, 8, "static", None, None), "group_size=128 does not apply"),
        ((4, "group", None, 8, "static", None, None), "group_size"),
        ((4, "block", None, 8, "static", None, None), "w_granularity"),
        ((8, "channel", None, 4, "static", None, None), "a_bits"),
        ((8, "channel", None, 8, "static", None, "fp8"), "without kv_bits"),
        ((8, "channel", None, 8, "static", 4, "int8"), "kv_bits=8"),
    ],
)
def test_scheme_is_validated_on_creation(fields: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        QuantScheme("custom", *fields)


def test_register_refuses_duplicates() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_scheme(QuantScheme("w8a8c8", 8, "channel", None, 8, "static", 8, "fp8"))


@pytest.mark.parametrize(
    "name",
    [
        "lm_head",
        "model.embed_tokens",
        "input_layernorm",
        "self_attn.kv_a_layernorm",
        "self_attn.q_norm",
        "mlp.gate",
        "model.layers.3.mlp.gate",
        "self_attn.kv_b_proj",
        "self_attn.indexer.wq_b",
        "self_attn.indexer.weights_proj",
    ],
)
def test_default_ignore_keeps_high_precision_modules(name: str) -> None:
    assert matches(name, DEFAULT_IGNORE)


@pytest.mark.parametrize(
    "name",
    [
        "mlp.gate_proj",
        "mlp.experts.3.gate_proj",
        "mlp.shared_experts.gate_proj",
        "self_attn.q_a_proj",
        "self_attn.kv_a_proj_with_mqa",
        "model.layers.0.mlp.gate.weight_proj",
    ],
)
def test_default_ignore_keeps_projections_quantized(name: str) -> None:
    assert not matches(name, DEFAULT_IGNORE)


def test_matches_regex_and_glob() -> None:
    assert matches("model.layers.0.self_attn.kv_b_proj", [r"re:.*kv_b_proj$"])
    assert matches("mlp.experts.7.up_proj", ["mlp.experts.*"])
    assert not matches("mlp.experts.7.up_proj", ["up_proj"])
    assert not matches("xmlp.gate", [r"re:mlp\.gate$"])


@pytest.mark.parametrize(
    ("kwargs", "moe", "expected"),
    [
        ({"name": "w8a8c8", "act_mode": "static"}, False, ["ignores static input scales"]),
        ({"name": "w8a8c8", "act_mode": "dynamic"}, True, []),
        ({"name": "w4a8c8", "act_mode": "dynamic"}, True, []),
        ({"name": "w8a8c8", "act_mode": "static"}, True, ["--act dynamic", "ignores static input scales"]),
        ({"name": "w4a8c16", "act_mode": "static"}, False, ["static int8 activations"]),
        ({"name": "w4a8c16", "act_mode": "dynamic", "act_format": "fp8"}, False, ["Hopper"]),
        ({"name": "w4a8c16", "act_mode": "dynamic", "act_format": "fp8", "group_size": 64}, False,
         ["Hopper", "refuse groups of 64"]),
        ({"name": "w8a8c8", "act_mode": "dynamic", "kv_format": "int8"}, False, ["--kv_format fp8"]),
    ],
)
def test_serving_notes_name_what_vllm_refuses(kwargs: dict, moe: bool, expected: list[str]) -> None:
    notes = serving_notes(get_scheme(**kwargs), moe=moe)
    assert len(notes) == len(expected) and all(e in n for e, n in zip(expected, notes, strict=True))
