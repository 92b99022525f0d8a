"""Scheme registry, validation and ignore-pattern matching."""

from __future__ import annotations

import pytest

from cores.quantization import (
    DEFAULT_IGNORE,
    QuantScheme,
    get_scheme,
    matches,
    per_channel,
    per_group,
    per_tensor,
    per_token,
    serving_notes,
    register_scheme,
    scheme_names,
)


def test_registered_schemes() -> None:
    assert scheme_names() == ["w4a8c16", "w4a8c8", "w8a8c16", "w8a8c8"]
    w8 = get_scheme("w8a8c16")
    assert (w8.w_bits, w8.weight_granularity, w8.a_bits, w8.kv_bits, w8.kv_format) == (8, per_channel(), 8, None, None)
    w4 = get_scheme("w4a8c8", act="dynamic", kv_format="int8")
    assert (w4.w_bits, w4.weight_granularity, w4.kv_bits, w4.kv_format) == (4, per_group(128), 8, "int8")
    assert w4.act_granularity == per_token() and get_scheme("w4a8c8").act_granularity == per_tensor()
    assert get_scheme("w4a8c16", group_size=64).weight_granularity == per_group(64)
    assert get_scheme("w8a8c16", kv_format="int8").kv_format is None


def test_unknown_scheme_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"unknown quantization scheme 'w3a8'.*w4a8c16, w4a8c8, w8a8c16, w8a8c8"):
        get_scheme("w3a8")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "w8a8c8", "group_size": 64}, "per output channel"),
        ({"name": "w8a8c8", "act": "per_token"}, "act_mode"),
        ({"name": "w8a8c8", "kv_format": "int4"}, "kv_format"),
        ({"name": "w4a8c8", "group_size": 12}, "divisible by 8"),
        ({"name": "w4a8c8", "act_format": "fp4"}, "act_format"),
        ({"name": "w4a8c8", "act_format": "fp8"}, "fp8 activations are dynamic per-token with int4 weights"),
        ({"name": "w8a8c8", "act": "dynamic", "act_format": "fp8"}, "with 8-bit weights"),
        ({"name": "w8a8c8", "act": "dynamic", "act_symmetric": False}, "zero point is for static int8"),
    ],
)
def test_get_scheme_validates_choices(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        get_scheme(**kwargs)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ((3, "channel", None, 8, "static", None, None), "w_bits"),
        ((8, "channel", 128, 8, "static", None, None), "no group_size"),
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
        ({"name": "w8a8c8", "act": "static"}, False, ["ignores static input scales"]),
        ({"name": "w8a8c8", "act": "dynamic"}, True, []),
        ({"name": "w4a8c8", "act": "dynamic"}, True, []),
        ({"name": "w8a8c8", "act": "static"}, True, ["--act dynamic", "ignores static input scales"]),
        ({"name": "w4a8c16", "act": "static"}, False, ["static int8 activations"]),
        ({"name": "w4a8c16", "act": "dynamic", "act_format": "fp8"}, False, ["Hopper"]),
        ({"name": "w4a8c16", "act": "dynamic", "act_format": "fp8", "group_size": 64}, False,
         ["Hopper", "refuse groups of 64"]),
        ({"name": "w8a8c8", "act": "dynamic", "kv_format": "int8"}, False, ["--kv_format fp8"]),
    ],
)
def test_serving_notes_name_what_vllm_refuses(kwargs: dict, moe: bool, expected: list[str]) -> None:
    notes = serving_notes(get_scheme(**kwargs), moe=moe)
    assert len(notes) == len(expected) and all(e in n for e, n in zip(expected, notes, strict=True))
