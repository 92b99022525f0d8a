"""``--train_mode mla`` / ``moe`` on a tiny DeepSeek-V3: one param dir from two jobs, records, refusals."""

import math

import pytest
import torch

import eval_ppl
import main as main_cli
from blockptq_assets.tiny import make_tiny_checkpoint, save_tiny_tokenizer
from cores.calibrator.extract import ExtractConfig, extract_calibration
from cores.calibrator.params import ParamDir, ParamDirError, ParamSet
from cores.calibrator.trainer import TrainConfig, run_training
from cores.eval.perplexity import PplConfig, evaluate_ppl
from cores.models.streaming import StreamingModel
from cores.quantization import STATIC_EXPERTS_UNSERVED, KVQuantizer, QuantState, get_scheme, set_quant_state
from cores.quantization.block import quantize_block

TEXT = " ".join(f"The {a} {b} of the {c} was {d}." for a in ("old", "young", "quiet", "bright")
                for b in ("king", "river", "city", "song") for c in ("north", "sea", "hill") for d in ("seen", "kept"))
N, SEQ = 4, 32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 3-block DeepSeek-V3 (block 0 dense, 1-2 MoE with 8 experts, top-2) and its dump."""
    root = tmp_path_factory.mktemp("modes")
    model = make_tiny_checkpoint(root / "model", "deepseek_v3", num_hidden_layers=3, vocab_size=300,
                                 initializer_range=0.2)
    save_tiny_tokenizer(model, TEXT, 300)
    text = root / "train.txt"
    text.write_text(TEXT)
    dump = root / "dump"
    extract_calibration(ExtractConfig(model=str(model), output_dir=str(dump), dataset=str(text), n_samples=N,
                                      seq_len=SEQ, batch_size=2))
    return model, text, dump


def _train(tiny, out, mode, *extra):
    model, _, dump = tiny
    args = ["--model", str(model), "--data_dir", str(dump), "--output_dir", str(out), "--train_mode", mode,
            "--epochs", "2", "--lr", "1e-2", "--w_bits", "8", *extra]
    assert main_cli.main(args) == 0


def _ppl(tiny, tmp_path, *params):
    model, text, _ = tiny
    out = tmp_path / "ppl.json"
    assert eval_ppl.main(["--model", str(model), "--dataset", str(text), "--split", "train", "--seq_len", str(SEQ),
                          "--output_json", str(out), *params]) == 0
    import json
    return json.loads(out.read_text())["ppl"]


def test_seed_flow_mla_c8_and_moe_bf16_on_block_ranges_into_one_dir(tiny, tmp_path):
    params = tmp_path / "p"
    _train(tiny, params, "mla", "--cls", "c8")
    _train(tiny, params, "moe", "--cls", "bf16", "--end_block_idx", "2")
    with pytest.raises(ParamDirError, match=r"moe params for blocks 2"):
        ParamDir(params).block_transform(3)
    _train(tiny, params, "moe", "--cls", "bf16", "--start_block_idx", "2")

    pdir = ParamDir(params)
    assert pdir.scheme().name == "w8a8c8"  # the KV cache comes from the mla job
    for idx in range(3):
        mla, moe = pdir.load_block(idx, "mla"), pdir.load_block(idx, "moe")
        assert mla and all(k.startswith("self_attn.") for k in mla)
        assert any(k.startswith("self_attn.kv_cache_quant.") for k in mla)
        assert moe and all(k.startswith("mlp.") for k in moe)
    one_dir = _ppl(tiny, tmp_path, "--param_dir", str(params))
    assert math.isfinite(one_dir)

    # the seed's two paths: the same params in two dirs evaluate the same
    apart = tmp_path / "apart"
    _train(tiny, apart / "mla", "mla", "--cls", "c8")
    _train(tiny, apart / "moe", "moe", "--cls", "bf16")
    assert _ppl(tiny, tmp_path, "--mla_param_path", str(apart / "mla"),
                "--moe_param_path", str(apart / "moe")) == pytest.approx(one_dir, rel=1e-6)


def test_moe_record_counts_tokens_and_rtn_experts(tiny, tmp_path, caplog):
    model, _, dump = tiny
    cfg = TrainConfig(model=str(model), data_dir=str(dump), output_dir=str(tmp_path / "p"), scheme="w8a8c16",
                      act="static", train_mode="moe", epochs=1, min_expert_tokens=40)
    params = run_training(cfg)
    assert STATIC_EXPERTS_UNSERVED in caplog.text  # vLLM refuses static input scales on experts
    dense, *moe_blocks = params.records("moe")
    assert list(dense["units"]) == ["mlp"] and dense["expert_tokens"] == []
    assert dense["units"]["mlp"]["tokens"] == N * SEQ
    config = StreamingModel(model).config
    for record in moe_blocks:
        counts = record["expert_tokens"]
        assert len(counts) == config.n_routed_experts
        assert sum(counts) == N * SEQ * config.num_experts_per_tok  # every token's top-k, each once
        assert record["rtn_experts"] == [e for e, c in enumerate(counts) if c < 40]
        assert record["units"]["mlp.shared_experts"]["tokens"] == N * SEQ
        for e, c in enumerate(counts):
            unit = record["units"][f"mlp.experts.{e}"]
            assert unit["tokens"] == c and unit["rtn_too_few_tokens"] == (c < 40)
            if c >= 40:
                assert unit["loss_learned"] <= unit["loss_rtn"]
    # an expert kept at RTN still has a static input scale, observed on all tokens of the layer
    state = params.load_block(1, "moe")
    rtn = record["rtn_experts"] or pytest.skip("every expert got enough tokens")
    assert float(state[f"mlp.experts.{rtn[0]}.gate_proj.input_quantizer.absmax"]) > 0


def test_moe_holds_one_expert_at_a_time(tiny, tmp_path, monkeypatch, caplog):
    model, _, dump = tiny
    real = StreamingModel.load_submodule
    loaded = []

    def spy(self, idx, block, name):
        experts = block.mlp.experts
        loaded.append(sum(not e.gate_proj.weight.is_meta for e in experts))
        return real(self, idx, block, name)

    monkeypatch.setattr(StreamingModel, "load_submodule", spy)
    run_training(TrainConfig(model=str(model), data_dir=str(dump), output_dir=str(tmp_path / "p"), scheme="w8a8c16",
                             act="dynamic", train_mode="moe", epochs=1, start_block_idx=1))
    assert len(loaded) == 2 * 8 and max(loaded) == 0  # no other expert in memory when the next one is read
    assert STATIC_EXPERTS_UNSERVED not in caplog.text  # dynamic activations serve


def test_mla_kv_quantizer_sees_latent_plus_rotary_key(tiny):
    model_dir, _, _ = tiny
    model = StreamingModel(model_dir, dtype=torch.float32)
    block = quantize_block(model.load_block(1, skip=("mlp.",)),
                           get_scheme("w8a8c8", act_mode="static", kv_format="int8"), scope="self_attn.")
    kv = block.self_attn.kv_cache_quant
    assert isinstance(kv, KVQuantizer)
    widths = []
    kv.register_forward_hook(lambda mod, args, out: widths.append(args[0].shape))
    set_quant_state(block, QuantState.CALIBRATE)
    cos, sin = model.rotary(SEQ)
    x = torch.randn(2, SEQ, model.hidden_size)
    block.self_attn(block.input_layernorm(x), cos, sin)
    config = model.config
    assert widths == [(2, SEQ, config.kv_lora_rank + config.qk_rope_head_dim)]
    assert all(p.is_meta == name.startswith("mlp.") for name, p in block.named_parameters())  # MLP never read


def test_mode_mixing_and_mismatches_are_refused(tiny, tmp_path):
    model, _, dump = tiny
    base = dict(model=str(model), data_dir=str(dump), epochs=0, act="static")
    run_training(TrainConfig(**base, output_dir=str(tmp_path / "p"), scheme="w8a8c8", train_mode="mla"))
    with pytest.raises(ParamDirError, match="cannot be mixed"):
        run_training(TrainConfig(**base, output_dir=str(tmp_path / "p"), scheme="w8a8c8"))
    with pytest.raises(ParamDirError, match="w_bits"):
        run_training(TrainConfig(**base, output_dir=str(tmp_path / "p"), scheme="w4a8c16", group_size=32,
                                 train_mode="moe"))
    with pytest.raises(ParamDirError, match="no moe params for blocks 0-2"):
        ParamDir(tmp_path / "p").block_transform(3)
    run_training(TrainConfig(**base, output_dir=str(tmp_path / "b"), scheme="w8a8c8"))
    with pytest.raises(ParamDirError, match="mix block params"):
        ParamSet([tmp_path / "p", tmp_path / "b"])
    with pytest.raises(ValueError, match="needs --train_mode block"):
        TrainConfig(**base, output_dir=str(tmp_path / "s"), scheme="w8a8c8", train_mode="mla", sequential=True)


def test_block_mode_eval_equals_mla_plus_moe_at_rtn(tiny, tmp_path):
    """RTN params are a function of the calibration data alone: the halves add up to the whole block."""
    model, text, dump = tiny
    base = dict(model=str(model), data_dir=str(dump), rtn=True, act="dynamic", scheme="w8a8c8")  # KV scales calibrated
    run_training(TrainConfig(**base, output_dir=str(tmp_path / "block")))
    run_training(TrainConfig(**base, output_dir=str(tmp_path / "halves"), train_mode="mla"))
    run_training(TrainConfig(**base, output_dir=str(tmp_path / "halves"), train_mode="moe"))
    ppl = [evaluate_ppl(PplConfig(model=str(model), dataset=str(text), split="train", seq_len=SEQ,
                                  param_dir=str(tmp_path / d))).ppl for d in ("block", "halves")]
    assert ppl[0] == pytest.approx(ppl[1], rel=1e-6)
