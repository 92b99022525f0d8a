"""Deployed checkpoints: layout, our loader == the fake-quant eval, transformers + compressed-tensors, eval_ppl."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from compressed_tensors.quantization import QuantizationConfig
from transformers import AutoModelForCausalLM
from vllm_reference import vllm_w4a8_fp8_scales

import eval_ppl
from deploy_helpers import GROUP, TEXT, logits
from cores.quantization.block import freeze, quantize_block
from cores.deploy import DeployConfig, deploy
from cores.formats.compressed_tensors import DeployedFormat
from cores.models.run import sequence_nll
from cores.models.streaming import StreamingModel
from cores.quantization import DEFAULT_IGNORE, get_scheme
from cores.utils.checkpoint import INDEX_NAME, CheckpointReader, model_fingerprint

CASES = [("w8a8c16", "static", "fp8"), ("w8a8c16", "dynamic", "fp8"), ("w8a8c8", "static", "fp8"),
         ("w8a8c8", "static", "int8"), ("w8a8c8", "dynamic", "fp8"), ("w4a8c16", "static", "fp8"),
         ("w4a8c16", "dynamic", "fp8"), ("w4a8c8", "static", "fp8"), ("w4a8c8", "dynamic", "int8"),
         ("w4a8c16", "dynamic", "fp8", "fp8"), ("w4a8c8", "dynamic", "fp8", "fp8"),
         # learned rounding offsets and smoothing scales (norm weights rewritten, folded into the linears)
         ("w8a8c8", "dynamic", "fp8", "int8", "rounding"), ("w8a8c8", "dynamic", "fp8", "int8", "smooth"),
         ("w8a8c8", "static", "int8", "int8", "rounding+smooth"), ("w4a8c8", "dynamic", "fp8", "int8", "rounding+smooth"),
         ("w4a8c16", "dynamic", "fp8", "fp8", "rounding+smooth"),
         # asymmetric static activations: input_scale + input_zero_point
         ("w8a8c16", "static", "fp8", "int8", "zp"), ("w8a8c8", "static", "int8", "int8", "zp+rounding+smooth"),
         ("w4a8c8", "static", "fp8", "int8", "zp")]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(c))
def test_loader_equals_fake_quant_eval(deployed, tiny_llama, ids, case):
    params, out = deployed(*case)
    fake, _ = sequence_nll(StreamingModel(tiny_llama), ids, block_transform=params.block_transform(2))
    ours, _ = sequence_nll(StreamingModel(out), ids)
    plain, _ = sequence_nll(StreamingModel(tiny_llama), ids)
    assert abs(ours - fake) <= 1e-6 * abs(fake) and ours != plain


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_dtype_casts_only_what_deploy_writes_unquantized(deployed, tiny_llama, ids, tmp_path, dtype):
    """``--dtype``: embeddings, norms (smoothed ones too), lm_head in that dtype; codes and scales as before."""
    params, auto = deployed("w8a8c8", "static", "int8", "int8", "smooth")
    out = tmp_path / dtype
    deploy(DeployConfig(str(tiny_llama), str(out), "w8a8c8", param_dir=str(params.path), max_shard_size="60KB",
                        dtype=dtype))
    src, before, after = CheckpointReader(tiny_llama), CheckpointReader(auto), CheckpointReader(out)
    assert sorted(before.keys) == sorted(after.keys)
    want, cast = getattr(torch, dtype), 0
    for key in before.keys:
        x, y = before.read([key])[key], after.read([key])[key]
        if src.has(key) and x.is_floating_point():
            assert y.dtype == want and torch.equal(y, x.to(want)), key
            cast += 1
        else:
            assert y.dtype == x.dtype and torch.equal(y, x), key
    assert cast >= 7 and any(key.endswith("input_scale") for key in before.keys)
    config = json.loads((out / "config.json").read_text())
    assert {config.get(k) for k in ("torch_dtype", "dtype")} - {None} == {dtype}
    if dtype == "float32":  # widening is exact, and our loader computes in fp32 either way
        assert sequence_nll(StreamingModel(out), ids) == sequence_nll(StreamingModel(auto), ids)


def test_dtype_keeps_scales_and_a_family_s_fp32_tensors():
    from cores.deploy.export import Passthrough

    rule = Passthrough(torch.float16, ("_scale_inv", "e_score_correction_bias"))
    assert rule.dtype_of("model.norm.weight", torch.float32) == torch.float16
    assert rule.dtype_of("model.layers.0.mlp.gate.e_score_correction_bias", torch.float32) == torch.float32
    assert rule.dtype_of("a.weight_scale_inv", torch.float32) == torch.float32
    assert rule.dtype_of("a.weight", torch.float8_e4m3fn) == torch.float8_e4m3fn
    assert rule.dtype_of("a.weight", torch.int8) == torch.int8


def test_layout(deployed, tiny_llama):
    _, out = deployed("w4a8c8", "static", "int8")
    src, dst = CheckpointReader(tiny_llama), CheckpointReader(out)
    q = "model.layers.0.self_attn.q_proj."
    t = dst.read([q + "weight_packed", q + "weight_scale", q + "weight_shape", q + "input_scale",
                  "model.layers.0.self_attn.k_scale", "model.layers.1.self_attn.v_scale"])
    assert t[q + "weight_packed"].dtype == torch.int32 and t[q + "weight_packed"].shape == (64, 8)
    assert t[q + "weight_scale"].dtype == torch.float32 and t[q + "weight_scale"].shape == (64, 64 // GROUP)
    assert t[q + "weight_shape"].tolist() == [64, 64] and t[q + "input_scale"].shape == (1,)
    assert all(v.dtype == torch.float32 for k, v in t.items() if k.endswith("scale"))
    assert not dst.has(q + "weight")
    kept = [k for k in src.keys if "norm" in k or "embed" in k or k == "lm_head.weight"]
    assert all(torch.equal(src.read([k])[k], dst.read([k])[k]) for k in kept)
    index = json.loads((out / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards and len(shards) > 2
    for shard in shards:  # at most 60KB, or a single tensor larger than that
        with safe_open(str(out / shard), "pt") as f:
            assert (out / shard).stat().st_size <= 61_000 or len(list(f.keys())) == 1
    config, source_config = (json.loads((d / "config.json").read_text()) for d in (out, tiny_llama))
    assert config.pop("quantization_config")["ignore"] == ["lm_head"] and config == source_config
    for side in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / side).read_bytes() == (tiny_llama / side).read_bytes()
    report = json.loads((out / "deploy_report.json").read_text())
    assert report["summary"]["checked"] == 14 and report["summary"]["GOOD"] == 14
    assert report["output_fingerprint"] == report["source_fingerprint"] == model_fingerprint(src)
    assert not list(out.glob("*.tmp")) and not (out / "deploy_progress.json").exists()
    umask = os.umask(0)
    os.umask(umask)
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~umask for p in out.iterdir())  # readable by a serving user


def test_smoothing_rewrites_the_norm_weights_as_trained(deployed, tiny_llama):
    params, out = deployed("w8a8c8", "dynamic", "fp8", "int8", "smooth")
    src, dst = CheckpointReader(tiny_llama), CheckpointReader(out)
    state = params.load_block(1)
    for norm in ("input_layernorm", "post_attention_layernorm"):
        key = f"model.layers.1.{norm}.weight"
        scale = state[f"{norm}.smooth.log_scale"].float().exp()
        expected = (src.read([key])[key].float() / scale).to(torch.bfloat16)
        assert torch.equal(dst.read([key])[key], expected) and not torch.equal(expected, src.read([key])[key])
    kept = [k for k in src.keys if "norm" in k and "layernorm" not in k or "embed" in k]
    assert all(torch.equal(src.read([k])[k], dst.read([k])[k]) for k in kept)


def test_rtn_deploy_equals_rtn_fake_quant(tiny_llama, ids, tmp_path):
    scheme = get_scheme("w4a8c16", act_mode="dynamic", group_size=GROUP)
    deploy(DeployConfig(str(tiny_llama), str(tmp_path / "rtn"), "w4a8c16", group_size=GROUP))
    config = json.loads((tmp_path / "rtn" / "config.json").read_text())["quantization_config"]
    assert config["config_groups"]["group_0"]["input_activations"]["dynamic"] is True

    def rtn(idx, block):
        return freeze(quantize_block(block, scheme, DEFAULT_IGNORE, lwc=False, lac=False))

    fake, _ = sequence_nll(StreamingModel(tiny_llama), ids, block_transform=rtn)
    assert sequence_nll(StreamingModel(tmp_path / "rtn"), ids)[0] == pytest.approx(fake, rel=1e-6)


def test_output_does_not_depend_on_where_shards_are_written(tiny_llama, tmp_path):
    """On one torch thread the shards are written by a thread of their own, on several by the caller:
    the same bytes either way, and the same verification (its sums up to the order of torch's reductions)."""
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            deploy(DeployConfig(str(tiny_llama), str(tmp_path / f"t{n}"), "w4a8c16", group_size=GROUP,
                                max_shard_size="20KB"))
    finally:
        torch.set_num_threads(threads)
    files = sorted(p.name for p in (tmp_path / "t1").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "t2").iterdir()) and len(files) > 8
    for name in files:
        one, two = (tmp_path / "t1" / name).read_bytes(), (tmp_path / "t2" / name).read_bytes()
        if name == "deploy_report.json":
            one, two = (json.loads(x)["tensors"] for x in (one, two))
            assert [(c["name"], c["band"]) for c in one] == [(c["name"], c["band"]) for c in two]
            one, two = ([c[k] for c in checks for k in ("cosine", "rel_err", "mean_abs_err", "max_abs_err")]
                        for checks in (one, two))
            assert one == pytest.approx(two, rel=1e-6)
        else:
            assert one == two, name


@pytest.mark.parametrize("name,act,kv,parts", [("w8a8c8", "static", "fp8", ""), ("w4a8c8", "static", "int8", ""),
                                               ("w8a8c8", "static", "int8", "rounding+smooth"),
                                               ("w8a8c8", "static", "int8", "zp+rounding+smooth")])
def test_transformers_static_is_exactly_our_forward(deployed, tiny_llama, ids, name, act, kv, parts):
    """transformers + compressed-tensors run static input quant, weight dequant and KV fake quant as we do
    (learned rounding and smoothing included: folded into plain tensors)."""
    params, out = deployed(name, act, kv, "int8", parts)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(ids).logits
    assert model.model.layers[0].self_attn.k_scale.dtype == torch.float32
    assert torch.equal(theirs, logits(tiny_llama, ids, params.block_transform(2)))


def test_asymmetric_static_inputs_ship_a_zero_point(deployed):
    """``symmetric: false`` on the input activations, and one int8 ``input_zero_point`` beside each
    ``input_scale``: the learned ends of the range, not a symmetric range in disguise."""
    _, out = deployed("w8a8c16", "static", "fp8", "int8", "zp")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["config_groups"]["group_0"]["input_activations"]["symmetric"] is False
    QuantizationConfig.model_validate(config)
    reader = CheckpointReader(out)
    scales = [k for k in reader.keys if k.endswith(".input_scale")]
    zero_points = reader.read([k.replace("input_scale", "input_zero_point") for k in scales])
    assert len(zero_points) == len(scales) > 0
    assert all(z.dtype == torch.int8 and z.shape == (1,) for z in zero_points.values())
    assert any(int(z) != 0 for z in zero_points.values())
    assert DeployedFormat.from_config(reader.config).scheme.act_symmetric is False


def test_transformers_dynamic_differs_only_by_the_token_scale(deployed, tiny_llama, ids, monkeypatch):
    """compressed-tensors' reference takes per-token scales absmax / 127.5; vLLM and we take absmax / 127."""
    import compressed_tensors.quantization.utils.helpers as ct_helpers

    params, out = deployed("w4a8c16", "dynamic", "fp8")
    ours, plain = logits(tiny_llama, ids, params.block_transform(2)), logits(tiny_llama, ids)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(ids).logits
    assert 0 < (theirs - ours).abs().max() < 0.25 * (plain - ours).abs().max()
    original = ct_helpers.calculate_qparams

    def per_127(min_vals, max_vals, args, global_scale=None):
        scale, zero_point = original(min_vals, max_vals, args, global_scale)
        return (scale * 127.5 / 127 if args.dynamic else scale), zero_point

    monkeypatch.setattr(ct_helpers, "calculate_qparams", per_127)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ours)


def test_eval_ppl_on_deployed_equals_fake_quant(deployed, tiny_llama, tmp_path):
    params, out = deployed("w8a8c8", "static", "fp8")
    text = tmp_path / "eval.txt"
    text.write_text(TEXT)
    args = ["--dataset", str(text), "--seq_len", "16", "--max_windows", "4"]
    assert eval_ppl.main(["--model", str(out), *args, "--output_json", str(tmp_path / "d.json")]) == 0
    assert eval_ppl.main(["--model", str(tiny_llama), "--param_dir", str(params.path), *args,
                          "--output_json", str(tmp_path / "f.json")]) == 0
    ppl = [json.loads((tmp_path / f).read_text())["ppl"] for f in ("d.json", "f.json")]
    assert ppl[0] == pytest.approx(ppl[1], rel=1e-6)
    # a deployed folder already carries its quantization: params on top of it are refused
    assert eval_ppl.main(["--model", str(out), "--param_dir", str(params.path), *args]) == 2


def test_w4a8_fp8_layout_is_what_vllm_loads(deployed, tiny_llama, ids):
    """int4 weights + fp8 per-token activations: the config group vLLM maps to CompressedTensorsW4A8Fp8, the
    packed int4 weights, group scales already on the fp8 grid its kernels keep (they load unchanged), no
    input scales; compressed-tensors parses it back to the same scheme."""
    params, out = deployed("w4a8c8", "dynamic", "fp8", "fp8")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    group = config["config_groups"]["group_0"]
    assert group["format"] == "pack-quantized" and group["weights"]["strategy"] == "group"
    assert group["input_activations"] == {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": True,
                                          "strategy": "token", "group_size": None}
    parsed = QuantizationConfig.model_validate(config).config_groups["group_0"].input_activations
    assert parsed.type == "float" and parsed.dynamic is True
    assert DeployedFormat.from_config({"quantization_config": config}).scheme == params.scheme()
    reader = CheckpointReader(out)
    scales = [k for k in reader.keys if k.endswith("weight_scale")]
    assert scales and not any(k.endswith("input_scale") for k in reader.keys)
    for key in scales:
        scale = reader.read([key])[key]
        assert torch.equal(vllm_w4a8_fp8_scales(scale), scale), key
