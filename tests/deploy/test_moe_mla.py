"""Deploying the MoE / MLA families: DeepSeek-V3 (bf16 and FP8 sources), DeepSeek-V3.2 and Qwen3-MoE.

Each is deployed from round-to-nearest params made by the trainer (``TrainConfig(rtn=True)``,
static activation scales and an 8-bit KV cache) and checked three ways: our loader runs the
deployed folder exactly as the fake-quant evaluation runs the params; compressed-tensors'
own decompressors turn the stored expert tensors into our dequantized weights; and the
layout is the one the engines read (per-expert tensors named as on disk, the MLA latent
cache's scale as ``self_attn.attn_mqa.k_scale`` = ``.v_scale`` (SGLang's names), router gates, ``kv_b_proj``
and the V3.2 indexer in bf16 and in ``ignore``, the MTP layer passed through).

``transformers`` itself is not a consumer here: v5 fuses the experts of these families into
3-D tensors and cannot load a per-expert quantized MoE checkpoint (vLLM and SGLang can).
"""

import json
from pathlib import Path

import pytest
import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationScheme
from deploy_helpers import GROUP, SEQ, TEXT, editable_copy
from safetensors.torch import load_file, save_file

from blockptq_assets.tiny import fp8_twins, make_tiny_checkpoint, save_tiny_tokenizer
from cores.calibrator.extract import ExtractConfig, extract_calibration
from cores.calibrator.params import ParamDir
from cores.calibrator.trainer import TrainConfig, run_training
from cores.deploy import DeployConfig, deploy
from cores.deploy.run import serving_warnings
from cores.formats.compressed_tensors import dequantize_codes, weight_codes
from cores.models.run import sequence_nll
from cores.models.streaming import StreamingModel
from cores.quantization import MLA_KV_NOT_VLLM, get_scheme
from cores.quantization.schemes import W8_STATIC_AMX_DYNAMIC
from cores.utils.checkpoint import INDEX_NAME, CheckpointError, CheckpointReader

FAMILIES = ["deepseek_v3", "deepseek_v3_fp8", "deepseek_v32", "qwen3_moe"]
SCHEMES = ["w8a8c8", "w4a8c8"]
BLOCKS = 3  # block 0 dense in DeepSeek, blocks 1-2 MoE with 8 experts, top-2


def _add_mtp_layer(model_dir: Path, layers: int) -> None:
    """Append a DeepSeek-style multi-token-prediction layer (``model.layers.<layers>``) to a one-file checkpoint."""
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    last = f"model.layers.{layers - 1}."
    mtp = f"model.layers.{layers}."
    extra = {mtp + k[len(last):]: v.clone() for k, v in tensors.items() if k.startswith(last)}
    embed = tensors["model.embed_tokens.weight"]
    hidden = embed.shape[1]
    extra[mtp + "eh_proj.weight"] = torch.randn(hidden, 2 * hidden, generator=torch.Generator().manual_seed(3))
    extra[mtp + "enorm.weight"], extra[mtp + "hnorm.weight"] = torch.ones(hidden), torch.ones(hidden)
    extra = {k: v.to(embed.dtype) for k, v in extra.items()}
    save_file({**tensors, **extra}, str(path), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """Tiny checkpoints of every family (DeepSeek-V3 with an MTP layer, also as an FP8 copy), with tokenizers."""
    root = tmp_path_factory.mktemp("moe_src")
    out = {}
    for family in ("deepseek_v3", "deepseek_v32", "qwen3_moe"):
        path = make_tiny_checkpoint(root / family, family, num_hidden_layers=BLOCKS, initializer_range=0.2)
        if family == "deepseek_v3":
            _add_mtp_layer(path, BLOCKS)
        save_tiny_tokenizer(path, TEXT, 512)
        out[family] = path
    fp8, _ = fp8_twins(out["deepseek_v3"], root / "deepseek_v3_fp8", root / "deepseek_v3_fp8_twin")
    for side in out["deepseek_v3"].iterdir():
        if side.name.startswith(("tokenizer", "special_tokens", "generation")):
            (fp8 / side.name).write_bytes(side.read_bytes())
    out["deepseek_v3_fp8"] = fp8
    return out


@pytest.fixture(scope="module")
def params(sources, tmp_path_factory):
    """``(family, scheme) -> ParamDir`` of round-to-nearest params with static activation and KV scales."""
    root = tmp_path_factory.mktemp("moe_params")
    text = root / "train.txt"
    text.write_text(TEXT * 4)
    cache: dict[tuple[str, str], ParamDir] = {}

    def make(family: str, scheme: str) -> ParamDir:
        if (family, scheme) not in cache:
            dump = root / f"dump_{family}"
            if not dump.exists():
                extract_calibration(ExtractConfig(model=str(sources[family]), output_dir=str(dump), dataset=str(text),
                                                  n_samples=4, seq_len=SEQ, batch_size=2))
            cfg = TrainConfig(model=str(sources[family]), data_dir=str(dump), rtn=True, scheme=scheme, act="static",
                              output_dir=str(root / f"{family}_{scheme}"),
                              group_size=GROUP if scheme.startswith("w4") else None)
            cache[family, scheme] = run_training(cfg)
        return cache[family, scheme]

    return make


@pytest.fixture(scope="module")
def deployed(sources, params, tmp_path_factory):
    """``(family, scheme) -> deployed folder``."""
    root = tmp_path_factory.mktemp("moe_deployed")
    cache: dict[tuple[str, str], Path] = {}

    def make(family: str, scheme: str) -> Path:
        if (family, scheme) not in cache:
            out = root / f"{family}_{scheme}"
            deploy(DeployConfig(str(sources[family]), str(out), scheme, param_dir=str(params(family, scheme).path),
                                max_shard_size="200KB"))
            cache[family, scheme] = out
        return cache[family, scheme]

    return make


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 512, (2, SEQ), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("family", FAMILIES)
def test_loader_equals_fake_quant_eval(sources, params, deployed, ids, family, scheme):
    transform = params(family, scheme).block_transform(BLOCKS)
    fake, _ = sequence_nll(StreamingModel(sources[family]), ids, block_transform=transform)
    ours, _ = sequence_nll(StreamingModel(deployed(family, scheme)), ids)
    plain, _ = sequence_nll(StreamingModel(sources[family]), ids)
    assert abs(ours - fake) <= 1e-6 * abs(fake) and ours != plain
    report = json.loads((deployed(family, scheme) / "deploy_report.json").read_text())
    assert report["summary"]["FAIL"] == 0 and report["summary"]["checked"] > 3 * 8 * 2


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("family", FAMILIES)
def test_compressed_tensors_decompresses_the_experts_to_the_fake_quant_weights(sources, params, deployed, family,
                                                                                scheme):
    out = deployed(family, scheme)
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    group = qcfg["config_groups"]["group_0"]
    ct_scheme = QuantizationScheme.model_validate(group)
    compressor = BaseCompressor.get_value_from_registry(group["format"])
    model = StreamingModel(sources[family])
    block = params(family, scheme).block_transform(BLOCKS, frozen=False)(2, model.load_block(2))
    written = CheckpointReader(out)
    bits = int(scheme[1])
    names = [f"mlp.experts.{e}.{proj}" for e in (0, 5, 7) for proj in ("gate_proj", "up_proj", "down_proj")]
    shared = ["mlp.shared_experts.down_proj"] if family.startswith("deepseek") else []  # Qwen3-MoE has none
    for name in [*names, *shared, "self_attn.o_proj"]:
        full = f"model.layers.2.{name}"
        keys = [k for k in written.keys if k.startswith(full + ".")]
        tensors = {k[len(full) + 1:]: v for k, v in written.read(keys).items()}
        theirs = compressor.decompress(dict(tensors), ct_scheme)["weight"]
        ours = dequantize_codes(*weight_codes(tensors, "", bits))
        linear = block.get_submodule(name)
        assert torch.equal(theirs, ours)
        assert torch.equal(ours, linear.weight_quantizer.fake_quant(linear.weight.float()))


@pytest.mark.parametrize("family", FAMILIES)
def test_layout_the_engines_read(sources, params, deployed, family):
    out = deployed(family, "w4a8c8")
    src, dst = CheckpointReader(sources[family]), CheckpointReader(out)
    config = json.loads((out / "config.json").read_text())
    ignore = set(config["quantization_config"]["ignore"])
    for idx in (1, 2):  # MoE blocks: per-expert tensors as on disk, the router in bf16 and in ignore
        expert = f"model.layers.{idx}.mlp.experts.7.down_proj."
        assert dst.read([expert + "weight_packed"])[expert + "weight_packed"].dtype == torch.int32
        assert not dst.has(expert + "weight") and dst.has(expert + "input_scale")
        gate = f"model.layers.{idx}.mlp.gate"
        assert gate in ignore and torch.equal(dst.read([gate + ".weight"])[gate + ".weight"],
                                              src.read([gate + ".weight"])[gate + ".weight"])
    for idx in range(BLOCKS):
        attn = f"model.layers.{idx}.self_attn."
        if family.startswith("deepseek"):  # MLA: one scale for the latent cache, under both of SGLang's names
            k_scale, v_scale = (dst.read([attn + n])[attn + n] for n in ("attn_mqa.k_scale", "attn_mqa.v_scale"))
            assert not dst.has(attn + "k_scale")
            stored = params(family, "w4a8c8").load_block(idx)["self_attn.kv_cache_quant.absmax"]
            assert torch.equal(k_scale, v_scale) and k_scale.dtype == torch.float32 and k_scale.shape == (1,)
            assert k_scale == pytest.approx(float(stored) / 448, rel=1e-6)  # fp8 KV at RTN: absmax / 448
            kv_b = attn + "kv_b_proj.weight"
            assert attn + "kv_b_proj" in ignore and torch.equal(dst.read([kv_b])[kv_b], src.read([kv_b])[kv_b])
        else:
            assert dst.has(attn + "k_scale") and dst.has(attn + "v_scale")
    indexer = [k for k in src.keys if ".indexer." in k and not k.endswith("_scale_inv")]
    assert bool(indexer) == (family == "deepseek_v32")
    assert all(torch.equal(dst.read([k])[k], src.read([k])[k]) for k in indexer)
    assert {k.removesuffix(".weight") for k in indexer if src.read([k])[k].dim() == 2} <= ignore
    mtp = [k for k in src.keys if k.startswith(f"model.layers.{BLOCKS}.") and not k.endswith("_scale_inv")]
    assert bool(mtp) == (family in ("deepseek_v3", "deepseek_v3_fp8"))
    for key in mtp:  # the MTP layer passes through as read (FP8 dequantized to bf16), its linears ignored
        assert torch.equal(dst.read([key])[key], src.read([key])[key])
    assert {k.removesuffix(".weight") for k in mtp if k.endswith("proj.weight")} <= ignore


def test_fp8_source_deploys_like_its_bf16_twin(sources, params, tmp_path):
    fp8 = sources["deepseek_v3_fp8"]
    twin = fp8.with_name("deepseek_v3_fp8_twin")
    for src in (fp8, twin):  # one param dir: an FP8 checkpoint and its dequantization are one model
        deploy(DeployConfig(str(src), str(tmp_path / src.name), "w8a8c8",
                            param_dir=str(params("deepseek_v3_fp8", "w8a8c8").path)))
    ours, ref = (CheckpointReader(tmp_path / s.name) for s in (fp8, twin))
    assert sorted(ours.keys) == sorted(ref.keys)
    assert all(torch.equal(ours.read([k])[k], ref.read([k])[k]) for k in ref.keys)


def test_loader_refuses_an_mla_cache_with_two_scales(deployed, tmp_path):
    out = deployed("deepseek_v32", "w8a8c8")
    broken = editable_copy(out, tmp_path / "broken")
    key = "model.layers.1.self_attn.attn_mqa.v_scale"
    shard = broken / json.loads((broken / INDEX_NAME).read_text())["weight_map"][key]
    tensors = load_file(shard)
    tensors[key] = tensors[key] * 2
    save_file(tensors, str(shard))
    model = StreamingModel(broken)
    model.load_block(0)
    with pytest.raises(CheckpointError, match=r"attn_mqa.k_scale, attn_mqa.v_scale of self_attn differ"):
        model.load_block(1)


def test_static_experts_are_flagged_for_serving(sources, deployed):
    """vLLM's int8 fused-MoE kernels take dynamic per-token activations only: a static MoE deploy says so."""
    report = json.loads((deployed("deepseek_v3", "w8a8c8") / "deploy_report.json").read_text())
    warnings = report["serving_warnings"]  # and, a C8 MLA model, that vLLM loads no MLA cache scale
    assert len(warnings) == 3 and "--act dynamic" in warnings[0] and "attn_mqa.k_scale" in warnings[2]
    assert warnings[1] == W8_STATIC_AMX_DYNAMIC
    experts = ["model.layers.1.mlp.experts.0.up_proj"]
    dense = ["model.layers.0.mlp.up_proj", "model.layers.0.self_attn.q_a_proj"]
    assert serving_warnings(get_scheme("w8a8c8", act_mode="dynamic"), experts) == []
    assert serving_warnings(get_scheme("w8a8c8", act_mode="static"), dense) == [W8_STATIC_AMX_DYNAMIC]
    assert serving_warnings(None, experts) == []
    mla = ["model.layers.0.self_attn.kv_a_proj_with_mqa"]
    assert serving_warnings(get_scheme("w8a8c8", act_mode="dynamic"), mla) == [MLA_KV_NOT_VLLM]
    assert serving_warnings(get_scheme("w8a8c16", act_mode="dynamic"), mla) == []
