"""Qwen3-Next: blocks and whole model equal the transformers reference (fp32) on a tiny random config.

Both token mixers (gated DeltaNet, gated full attention with partial rotary), MoE blocks with
the gated shared expert and a dense block; then the pipeline end to end on the tiny model.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from blockptq_assets.tiny import make_tiny_checkpoint
from cores.models.moe import MoE
from cores.models.qwen3_next import GatedAttention, GatedDeltaNet, GatedSharedExpertMoE, OffsetRMSNorm
from cores.models.run import sequence_nll
from cores.models.streaming import StreamingModel

RTOL = 1e-5
SEQ = 80  # > the delta rule's chunk of 64: the recurrence crosses a chunk boundary

QWEN3_NEXT_TINY = dict(
    head_dim=16, num_hidden_layers=4,
    layer_types=["linear_attention", "linear_attention", "full_attention", "linear_attention"],
    linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
    linear_conv_kernel_dim=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
    shared_expert_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[1], norm_topk_prob=True,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
)


def max_rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


def tiny_qwen3_next(root, **overrides):
    """A tiny Qwen3-Next folder with non-trivial A_log / dt_bias (transformers inits them to fixed values)."""
    src = make_tiny_checkpoint(root / "init", "qwen3_next", seed=1, **{**QWEN3_NEXT_TINY, **overrides})
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith(("A_log", "dt_bias")):
                tensor.add_(0.5 * torch.randn(tensor.shape, generator=gen))
    model.save_pretrained(root / "model")
    return root / "model"


def reference(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tiny_qwen3_next(tmp_path_factory.mktemp("qwen3_next"))
    return path, reference(path)


def test_block_kinds_follow_config(tiny):
    path, ref = tiny
    ours = StreamingModel(path, dtype="float32")
    for idx in range(ours.num_blocks):
        block, layer = ours.load_block(idx), ref.model.layers[idx]
        mixer = GatedDeltaNet if layer.block_type == "linear_attention" else GatedAttention
        assert isinstance(getattr(block, block.mixer_name), mixer)
        assert isinstance(block.mlp, MoE) == hasattr(layer.mlp, "experts"), f"block {idx}"
        assert isinstance(block.input_layernorm, OffsetRMSNorm)


def test_every_block_equals_reference(tiny):
    path, ref = tiny
    ours = StreamingModel(path, dtype="float32")
    hidden = torch.randn(2, SEQ, ours.hidden_size, generator=torch.Generator().manual_seed(0))
    cos, sin = ours.rotary(SEQ)
    position_ids = torch.arange(SEQ)[None]
    ref_cos, ref_sin = ref.model.rotary_emb(hidden, position_ids)
    assert cos.shape[-1] == 4  # head_dim 16 * partial_rotary_factor 0.25
    assert max_rel_err(cos, ref_cos[0]) <= RTOL and max_rel_err(sin, ref_sin[0]) <= RTOL
    errors = []  # of the block's update (output - input): the residual would hide a wrong mixer
    for idx in range(ours.num_blocks):
        with torch.no_grad():
            expected = ref.model.layers[idx](hidden, position_embeddings=(ref_cos, ref_sin), attention_mask=None,
                                             position_ids=position_ids)
            errors.append(max_rel_err(ours.load_block(idx)(hidden, cos, sin) - hidden, expected - hidden))
    assert max(errors) <= RTOL, errors


def reference_nll(ref, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = ref(ids).logits
    return float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                   ids[:, 1:].reshape(-1), reduction="sum"))


def test_whole_model_nll_equals_reference(tiny):
    path, ref = tiny
    ids = torch.randint(0, ref.config.vocab_size, (3, SEQ), generator=torch.Generator().manual_seed(0))
    nll, count = sequence_nll(StreamingModel(path, dtype="float32"), ids, batch_size=2)
    assert count == 3 * (SEQ - 1)
    ref_nll = reference_nll(ref, ids)
    assert abs(nll - ref_nll) / ref_nll <= RTOL


def test_shared_expert_gate_and_router_stay_unquantized(tiny):
    from cores.quantization.block import quantize_block
    from cores.quantization import QuantLinear, get_scheme

    path, _ = tiny
    block = quantize_block(StreamingModel(path, dtype="float32").load_block(0),
                           get_scheme("w8a8c16", act_mode="static"))
    quantized = {n for n, m in block.named_modules() if isinstance(m, QuantLinear)}
    assert {"linear_attn.in_proj_qkvz", "linear_attn.in_proj_ba", "linear_attn.out_proj",
            "mlp.shared_expert.down_proj", "mlp.experts.0.gate_proj"} <= quantized
    assert not any(n.startswith(("mlp.gate", "mlp.shared_expert_gate", "linear_attn.conv1d")) for n in quantized)
    assert isinstance(block.mlp, GatedSharedExpertMoE)


E2E_TEXT = " ".join(f"The {a} {b} of the {c} was {d}." for a in ("old", "young", "quiet", "bright")
                    for b in ("king", "river", "city", "song") for c in ("north", "sea", "hill")
                    for d in ("seen", "kept"))
E2E_N, E2E_SEQ = 4, 32


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    """The tiny Qwen3-Next with a tokenizer of its vocabulary, and its calibration dump."""
    from cores.calibrator.extract import ExtractConfig, extract_calibration
    from blockptq_assets.tiny import save_tiny_tokenizer

    root = tmp_path_factory.mktemp("qwen3_next_e2e")
    model = tiny_qwen3_next(root, vocab_size=300, initializer_range=0.2)
    save_tiny_tokenizer(model, E2E_TEXT, 300)
    text = root / "train.txt"
    text.write_text(E2E_TEXT)
    dump = root / "dump"
    extract_calibration(ExtractConfig(model=str(model), output_dir=str(dump), dataset=str(text), n_samples=E2E_N,
                                      seq_len=E2E_SEQ, batch_size=2))
    return model, text, dump, root


def e2e_ppl(model, text, out, *params) -> float:
    import json

    import eval_ppl

    assert eval_ppl.main(["--model", str(model), "--dataset", str(text), "--split", "train", "--seq_len",
                          str(E2E_SEQ), "--output_json", str(out), *params]) == 0
    return json.loads(out.read_text())["ppl"]


def train_block_mode(model, dump, out, *extra) -> None:
    import main as main_cli

    assert main_cli.main(["--model", str(model), "--data_dir", str(dump), "--output_dir", str(out), "--scheme",
                          "w8a8c16", "--train_mode", "block", "--epochs", "2", "--lr", "1e-2", *extra]) == 0


def deploy_w8a8c16(model, out, *extra) -> dict:
    import json

    import deploy as deploy_cli

    assert deploy_cli.main(["--input_weight_path", str(model), "--output_weight_path", str(out), "--quant_type",
                            "w8a8c16", *extra]) == 0
    return json.loads((out / "config.json").read_text())["quantization_config"]


@pytest.mark.slow
def test_rtn_and_learned_w8a8_end_to_end(flow):
    from cores.calibrator.params import ParamDir

    model, text, dump, root = flow
    fp = e2e_ppl(model, text, root / "fp.json")

    learned, rtn = root / "learned", root / "rtn"
    train_block_mode(model, dump, learned)
    train_block_mode(model, dump, rtn, "--rtn")
    records = ParamDir(learned).records("block")
    assert len(records) == 4 and all(r["loss_learned"] <= r["loss_rtn"] for r in records)
    ppl_learned = e2e_ppl(model, text, root / "l.json", "--param_dir", str(learned))
    ppl_rtn = e2e_ppl(model, text, root / "r.json", "--param_dir", str(rtn))
    assert abs(ppl_learned / fp - 1) < 0.05 and abs(ppl_rtn / fp - 1) < 0.05

    qcfg = deploy_w8a8c16(model, root / "deployed_learned", "--param_dir", str(learned))
    for kept in ("model.layers.0.mlp.gate", "model.layers.0.mlp.shared_expert_gate", "lm_head"):
        assert kept in qcfg["ignore"]
    deployed = StreamingModel(root / "deployed_learned", dtype="float32")
    assert deployed.deployed and isinstance(deployed.load_block(0).linear_attn, GatedDeltaNet)
    assert e2e_ppl(root / "deployed_learned", text, root / "dl.json") == pytest.approx(ppl_learned, rel=1e-4)

    deploy_w8a8c16(model, root / "deployed_rtn")  # no params: round-to-nearest, dynamic activations
    assert e2e_ppl(root / "deployed_rtn", text, root / "dr.json") == pytest.approx(ppl_rtn, rel=1e-4)


def test_offset_norm_smoothing_forward_is_the_deployed_one():
    """A smoothed (1 + w) norm runs with the weight deploy stores in bf16, and divides the scale ``1 + w``."""
    from cores.quantization import QuantState
    from cores.quantization.smoothing import Smoother

    gen = torch.Generator().manual_seed(0)
    norm = OffsetRMSNorm(64)
    norm.weight.data = 0.1 * torch.randn(64, generator=gen)
    norm.smooth = Smoother(64, dtype=torch.bfloat16)
    norm.smooth.log_scale.data = 0.3 * torch.randn(64, generator=gen)
    norm.smooth.set_state(QuantState.FROZEN)
    x = torch.randn(2, 5, 64, generator=gen)
    deployed = OffsetRMSNorm(64)
    deployed.weight.data = norm.smoothed_weight(export=True).to(torch.bfloat16).float()
    assert torch.equal(norm(x), deployed(x))
    plain = OffsetRMSNorm(64)
    plain.weight.data = norm.weight.data
    assert torch.allclose(norm(x), plain(x) / norm.smooth.scale(), rtol=2e-2, atol=1e-3)


FP8_TINY = dict(hidden_size=128, moe_intermediate_size=128, shared_expert_intermediate_size=128, head_dim=32,
                linear_key_head_dim=32, linear_value_head_dim=32, num_attention_heads=4, num_key_value_heads=2)
"""128-row linears, so that the 128x128 FP8 tiles cover the DeltaNet, attention output and expert weights."""


@pytest.mark.parametrize("mode,act", [("max", False), ("mse", True)])
def test_fp8_block_deploy_keeps_the_ssm_parts_and_stays_close(tmp_path, mode, act):
    """``--quant_type fp8`` on a Qwen3-Next: DeltaNet / expert / o_proj weights in e4m3 tiles; A_log, dt_bias,
    conv1d, in_proj_ba, router and shared-expert gates as stored; our loader's NLL within 2 % of the source."""
    import json

    from cores.calibrator.extract import ExtractConfig, extract_calibration
    from cores.deploy import DeployConfig, deploy
    from cores.utils.checkpoint import CheckpointReader

    model = tiny_qwen3_next(tmp_path / "src", initializer_range=0.05, **FP8_TINY)
    calib = None
    if act:
        from blockptq_assets.tiny import save_tiny_tokenizer

        save_tiny_tokenizer(model, E2E_TEXT, 512)
        text = tmp_path / "calib.txt"
        text.write_text(E2E_TEXT)
        calib = tmp_path / "dump"
        extract_calibration(ExtractConfig(model=str(model), output_dir=str(calib), dataset=str(text), n_samples=2,
                                          seq_len=E2E_SEQ))
    out = tmp_path / "fp8"
    deploy(DeployConfig(str(model), str(out), "fp8", fp8_mode=mode, calib_dir=None if calib is None else str(calib)))
    src, dst = CheckpointReader(model), CheckpointReader(out)
    converted = {k.removesuffix("_scale_inv") for k in dst.keys if k.endswith(".weight_scale_inv")}
    for part in ("linear_attn.in_proj_qkvz", "linear_attn.out_proj", "self_attn.o_proj", "experts.0.down_proj",
                 "shared_expert.up_proj"):
        assert any(part in k for k in converted), part
    assert all(dst.read([k], dequantize=False)[k].dtype == torch.float8_e4m3fn for k in converted)
    kept = [k for k in src.keys if k.endswith(("A_log", "dt_bias", "conv1d.weight", "in_proj_ba.weight",
                                               "mlp.gate.weight", "shared_expert_gate.weight"))]
    assert len(kept) == 3 * 4 + 3 * 2 and all(torch.equal(src.read([k])[k], dst.read([k])[k]) for k in kept)
    not_converted = json.loads((out / "config.json").read_text())["quantization_config"]["modules_to_not_convert"]
    assert {"model.layers.0.linear_attn.in_proj_ba", "model.layers.0.mlp.shared_expert_gate"} <= set(not_converted)
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    ours, _ = sequence_nll(StreamingModel(out), ids)
    fp, _ = sequence_nll(StreamingModel(model), ids)
    assert ours != fp and abs(ours - fp) <= 0.02 * abs(fp)
