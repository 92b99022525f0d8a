"""The compressed-tensors format: config fields, and our tensors read back by compressed-tensors itself."""

import pytest
import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

from cores.deploy.pack import weight_qparams
from cores.formats.compressed_tensors import DeployedFormat, dequantize_codes, ignore_match, quantization_config, weight_codes
from cores.quantization import WeightQuantizer, get_scheme
from cores.utils.checkpoint import CheckpointError

SCHEMES = [("w8a8c16", "static", "fp8"), ("w8a8c8", "static", "fp8"), ("w8a8c8", "dynamic", "int8"),
           ("w4a8c16", "dynamic", "fp8"), ("w4a8c8", "static", "int8")]


@pytest.mark.parametrize("name,act,kv", SCHEMES)
def test_config_fields_and_round_trip(name, act, kv):
    scheme = get_scheme(name, act_mode=act, kv_format=kv)
    qcfg = quantization_config(scheme, ["lm_head"])
    group = qcfg["config_groups"]["group_0"]
    assert qcfg["quant_method"] == "compressed-tensors" and qcfg["quantization_status"] == "compressed"
    assert qcfg["format"] == group["format"] == ("int-quantized" if name.startswith("w8") else "pack-quantized")
    assert group["targets"] == ["Linear"] and qcfg["ignore"] == ["lm_head"]
    w = group["weights"]
    assert (w["num_bits"], w["type"], w["symmetric"], w["dynamic"]) == (scheme.w_bits, "int", True, False)
    assert (w["strategy"], w["group_size"]) == (("channel", None) if name.startswith("w8") else ("group", 128))
    a = group["input_activations"]
    assert (a["num_bits"], a["type"], a["symmetric"]) == (8, "int", True)
    assert (a["strategy"], a["dynamic"]) == (("tensor", False) if act == "static" else ("token", True))
    if name.endswith("c8"):
        assert qcfg["kv_cache_scheme"] == {"num_bits": 8, "type": "float" if kv == "fp8" else "int", "symmetric": True,
                                           "dynamic": False, "strategy": "tensor", "group_size": None}
    else:
        assert qcfg["kv_cache_scheme"] is None
    parsed = QuantizationConfig.model_validate(qcfg)  # compressed-tensors accepts every field
    assert parsed.config_groups["group_0"].format == qcfg["format"]
    assert DeployedFormat.from_config({"quantization_config": qcfg}) == DeployedFormat(scheme, ("lm_head",))


def test_parse_refuses_what_we_do_not_run():
    qcfg = quantization_config(get_scheme("w8a8c8", act_mode="static"), [])
    qcfg["config_groups"]["group_0"]["weights"]["symmetric"] = False
    with pytest.raises(CheckpointError, match="weights.symmetric: False, expected True"):
        DeployedFormat.from_config({"quantization_config": qcfg})
    with pytest.raises(CheckpointError, match="quant_method is 'fp8'"):
        DeployedFormat.from_config({"quantization_config": {"quant_method": "fp8"}})


def test_ignore_matching_is_compressed_tensors_semantics():
    ignore = ["lm_head", r"re:.*mlp\.gate$"]
    assert ignore_match("lm_head", ignore) and ignore_match("model.layers.3.mlp.gate", ignore)
    assert not ignore_match("model.layers.3.mlp.gate_proj", ignore) and not ignore_match("model.lm_head", ignore)


@pytest.mark.parametrize("name", ["w8a8c16", "w4a8c16"])
def test_compressed_tensors_decompresses_our_tensors_to_our_weights(name):
    scheme = get_scheme(name, act_mode="static", group_size=32 if name.startswith("w4") else None)
    weight = torch.randn(48, 96, generator=torch.Generator().manual_seed(0))
    quantizer = WeightQuantizer(weight.shape, scheme.w_bits, scheme.weight_granularity, lwc=True)
    with torch.no_grad():
        quantizer.upbound_factor.add_(torch.randn(quantizer.upbound_factor.shape))  # learned clipping
    qparams = weight_qparams(quantizer, weight)
    group = quantization_config(scheme, [])["config_groups"]["group_0"]
    ct_scheme = QuantizationScheme.model_validate(group)
    theirs = BaseCompressor.get_value_from_registry(group["format"]).decompress(dict(qparams), ct_scheme)["weight"]
    ours = dequantize_codes(*weight_codes(qparams, "", scheme.w_bits))
    assert theirs.dtype == torch.float32 and torch.equal(theirs, ours)
    assert torch.equal(ours, quantizer.fake_quant(weight))  # and that is the fake-quant weight


def test_per_target_groups_round_trip():
    """Linears with another scheme than the model's become a group of their own, listing their full names."""
    base = get_scheme("w8a8c8", act_mode="dynamic")
    static = get_scheme("w8a8c8", act_mode="static")
    w4 = get_scheme("w4a8c8", act_mode="dynamic", group_size=64)
    names = {"model.layers.0.mlp.down_proj": static, "model.layers.1.mlp.down_proj": static,
             "model.layers.0.mlp.up_proj": base, "model.layers.1.mlp.up_proj": w4, "model.layers.1.mlp.gate_proj": w4}
    qcfg = quantization_config(base, ["lm_head"], names)
    groups = qcfg["config_groups"]
    assert list(groups) == ["group_0", "group_1", "group_2"] and qcfg["format"] == "mixed-precision"
    assert groups["group_0"]["targets"] == ["Linear"]
    assert groups["group_1"]["targets"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert groups["group_2"]["targets"] == ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
    assert groups["group_2"]["format"] == "pack-quantized"
    parsed = QuantizationConfig.model_validate(qcfg)  # compressed-tensors accepts the groups
    assert set(parsed.config_groups) == set(groups)
    fmt = DeployedFormat.from_config({"quantization_config": qcfg})
    assert fmt.scheme == base
    for name, scheme in names.items():
        assert fmt.targets.scheme_for(name) == scheme
    assert fmt.targets.scheme_for("model.layers.5.self_attn.q_proj") == base
    assert quantization_config(base, [], {n: base for n in names}) == quantization_config(base, [])  # one group


def test_per_target_groups_keep_one_kv_cache():
    from cores.quantization import SchemeOverride, TargetSchemes

    with pytest.raises(ValueError, match="the KV cache is one scheme"):
        TargetSchemes(get_scheme("w8a8c8", act_mode="static"),
                      (SchemeOverride(("x",), get_scheme("w8a8c16", act_mode="static")),))
    targets = TargetSchemes(get_scheme("w8a8c8", act_mode="dynamic"), (
        SchemeOverride((r"re:.*\.mlp\..*",), get_scheme("w8a8c8", act_mode="static")),
        SchemeOverride(("model.layers.1.mlp.down_proj",), None)))
    # compressed-tensors' order: an exact name before a regex, whatever the order of the overrides
    assert targets.scheme_for("model.layers.1.mlp.down_proj") is None
    assert targets.scheme_for("model.layers.0.mlp.down_proj").act_mode == "static"
    assert targets.scheme_for("model.layers.0.self_attn.o_proj").act_mode == "dynamic"
