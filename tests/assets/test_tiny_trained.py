"""The tiny DeepSeek-V3 trained on the corpus (blockptq_assets/tiny_trained.py), a real MoE for quality work.

Its folder reads the same in our streaming runtime and in ``transformers``, its FP8 twin evaluates
like it, every routed expert gets tokens, and it predicts the eval text far better than chance.
The cache logic (built once, rebuilt when stale, clear message without the sources) is checked
with a stand-in trainer.
"""

import json
import math

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from blockptq_assets import tiny_trained
from blockptq_assets.assets import AssetError
from blockptq_assets.tiny import make_tiny_checkpoint
from blockptq_assets.tiny_trained import TinyDeepseekSettings, ensure_tiny_deepseek
from cores.models.moe import RoutingCounter
from cores.models.run import sequence_nll
from cores.models.streaming import StreamingModel
from cores.utils.data import load_text, ppl_windows

SEQ, WINDOWS = 256, 4
# Measured on these windows (settings of FORMAT_VERSION 1): ppl 528.5 (the record's 16 x 512 eval: 392.8;
# an untrained model is near uniform, ~49152); FP8 twin / bf16 - 1 = 6e-5 (3e-4 on 64 x 512);
# fewest tokens of a routed expert / mean = 0.23 (0.43 on 64 x 512).
MAX_PPL = 1000.0
FP8_PPL_TOLERANCE = 2e-3
MIN_EXPERT_SHARE = 0.1


@pytest.fixture(scope="module")
def windows(tiny_deepseek, assets) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(tiny_deepseek.model_dir)
    return ppl_windows(tokenizer, load_text(assets.eval_text), SEQ, max_windows=WINDOWS)


def streaming_eval(model_dir, windows) -> tuple[float, dict[int, torch.Tensor]]:
    """Perplexity through our streaming runtime, and the tokens each routed expert received."""
    counter = RoutingCounter()
    nll, count = sequence_nll(StreamingModel(model_dir, dtype="float32"), windows, batch_size=2,
                                                                        block_transform=counter.attach)
    return math.exp(nll / count), counter.counts


@pytest.fixture(scope="module")
def bf16_eval(tiny_deepseek, windows):
    return streaming_eval(tiny_deepseek.model_dir, windows)


@pytest.mark.slow  # trains the tiny DeepSeek-V3 on first use (3-4 minutes)
def test_folders_use_deepseek_v3_layout(tiny_deepseek):
    config = json.loads((tiny_deepseek.model_dir / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["vocab_size"] == 49152
    with safe_open(tiny_deepseek.model_dir / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias").dtype == torch.float32
        assert f.get_tensor("model.layers.1.self_attn.q_b_proj.weight").dtype == torch.bfloat16
    assert "model.layers.0.mlp.gate_proj.weight" in keys  # first_k_dense_replace = 1
    for name in ("self_attn.q_a_proj", "self_attn.q_a_layernorm", "self_attn.q_b_proj", "self_attn.kv_a_proj_with_mqa",
                 "self_attn.kv_a_layernorm", "self_attn.kv_b_proj", "self_attn.o_proj", "mlp.gate",
                 f"mlp.experts.{config['n_routed_experts'] - 1}.down_proj", "mlp.shared_experts.up_proj"):
        assert f"model.layers.1.{name}.weight" in keys, name
    fp8_config = json.loads((tiny_deepseek.fp8_dir / "config.json").read_text())
    assert fp8_config["quantization_config"]["weight_block_size"] == [128, 128]
    with safe_open(tiny_deepseek.fp8_dir / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.2.mlp.experts.3.up_proj.weight").dtype == torch.float8_e4m3fn
        assert f.get_tensor("model.layers.2.mlp.experts.3.up_proj.weight_scale_inv").dtype == torch.float32
        assert f.get_tensor("model.layers.2.mlp.gate.weight").dtype == torch.bfloat16  # routers stay bf16
    assert (tiny_deepseek.fp8_dir / "tokenizer.json").is_file()


@pytest.mark.slow  # trains the tiny DeepSeek-V3 on first use (3-4 minutes)
def test_streaming_ppl_equals_transformers(tiny_deepseek, windows, bf16_eval):
    model = AutoModelForCausalLM.from_pretrained(tiny_deepseek.model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref_nll = sum(float(model(w[None], labels=w[None]).loss) for w in windows) / len(windows)
    ppl, _ = bf16_eval
    assert abs(ppl / math.exp(ref_nll) - 1) < 1e-3


@pytest.mark.slow  # trains the tiny DeepSeek-V3 on first use (3-4 minutes)
def test_fp8_twin_evaluates_like_bf16(tiny_deepseek, windows, bf16_eval):
    ppl_fp8, _ = streaming_eval(tiny_deepseek.fp8_dir, windows)
    assert abs(ppl_fp8 / bf16_eval[0] - 1) < FP8_PPL_TOLERANCE


@pytest.mark.slow  # trains the tiny DeepSeek-V3 on first use (3-4 minutes)
def test_every_routed_expert_gets_tokens(tiny_deepseek, bf16_eval):
    settings = tiny_deepseek.record["settings"]
    _, counts = bf16_eval
    assert sorted(counts) == list(range(settings["first_k_dense_replace"], settings["num_hidden_layers"]))
    for idx, per_expert in counts.items():
        assert len(per_expert) == settings["n_routed_experts"]
        assert int(per_expert.sum()) == WINDOWS * SEQ * settings["num_experts_per_tok"]
        assert int(per_expert.min()) >= MIN_EXPERT_SHARE * float(per_expert.float().mean()), (idx, per_expert)


@pytest.mark.slow  # trains the tiny DeepSeek-V3 on first use (3-4 minutes)
def test_ppl_far_below_untrained(tiny_deepseek, bf16_eval):
    # an untrained model is near uniform over the vocabulary: ppl ~ 49152
    assert bf16_eval[0] < MAX_PPL
    assert tiny_deepseek.record["eval"]["ppl"] < MAX_PPL


@pytest.fixture
def fake_sources(tmp_path, assets, monkeypatch):
    """An assets root holding links to the real sources, and a stand-in trainer that records its calls."""
    for source in (assets.model_dir, assets.eval_text.parent):
        (tmp_path / source.name).symlink_to(source)
    calls = []

    def fake_train(out_dir, smollm2_dir, corpus_dir, settings, fingerprint):
        calls.append(settings)
        (out_dir / "config.json").write_text("{}")
        (out_dir / tiny_trained.RECORD_NAME).write_text(json.dumps({"fingerprint": fingerprint}))

    def fake_fp8(model_dir, out_dir):
        (out_dir / tiny_trained.RECORD_NAME).write_text((model_dir / tiny_trained.RECORD_NAME).read_text())

    monkeypatch.setattr(tiny_trained, "train_tiny_deepseek", fake_train)
    monkeypatch.setattr(tiny_trained, "write_fp8_twin", fake_fp8)
    return tmp_path, calls


def test_cache_is_reused_and_rebuilt_when_stale(fake_sources):
    root, calls = fake_sources
    tiny = ensure_tiny_deepseek(root)
    assert tiny.model_dir == root / "tiny-deepseek-v3" and tiny.fp8_dir.is_dir() and len(calls) == 1
    assert not list(root.glob(".*.partial"))
    ensure_tiny_deepseek(root)
    assert len(calls) == 1  # cached
    ensure_tiny_deepseek(root, TinyDeepseekSettings(steps=7))
    assert len(calls) == 2 and calls[-1].steps == 7  # other settings: stale, rebuilt
    (tiny.model_dir / tiny_trained.RECORD_NAME).unlink()
    ensure_tiny_deepseek(root, TinyDeepseekSettings(steps=7))
    assert len(calls) == 3  # no record: an unfinished or foreign folder, rebuilt


def test_missing_sources_are_named(tmp_path):
    with pytest.raises(AssetError, match="prepare_assets.py"):
        ensure_tiny_deepseek(tmp_path)


@pytest.mark.parametrize("q_lora_rank", [None, 64])
def test_planted_outlier_channels_keep_the_function(tmp_path, q_lora_rank):
    """The planted channels change what quantizers see, not what the blocks compute."""
    folder = make_tiny_checkpoint(tmp_path, "deepseek_v3", q_lora_rank=q_lora_rank, first_k_dense_replace=1)
    model = StreamingModel(folder, dtype="float32")
    layers = torch.nn.ModuleList(model.load_block(idx) for idx in range(model.num_blocks))
    cos, sin = model.rotary(16)
    x = torch.randn(2, 16, model.config.hidden_size)

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        seen = []
        hook = layers[1].self_attn.kv_a_proj_with_mqa.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        out = x
        with torch.no_grad():
            for layer in layers:
                out = layer(out, cos, sin)
        hook.remove()
        return out, seen[0].abs().mean((0, 1))

    before, magnitude_before = run()
    chosen = tiny_trained.plant_outlier_channels(layers, count=3, scale=16.0, seed=0)
    after, magnitude_after = run()
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
    channels = chosen[model.config.hidden_size]
    assert len(channels) == 3
    ratio = magnitude_after / magnitude_before
    torch.testing.assert_close(ratio[channels], torch.full((3,), 16.0))
    torch.testing.assert_close(ratio[[c for c in range(len(ratio)) if c not in channels]], torch.ones(len(ratio) - 3))


@pytest.mark.slow  # trains the tiny DeepSeek-V3 on first use (3-4 minutes)
def test_trained_model_has_outlier_channels(tiny_deepseek):
    settings, planted = tiny_deepseek.record["settings"], tiny_deepseek.record["outlier_channels"]
    channels = planted["channels_by_width"][str(settings["hidden_size"])]
    assert len(channels) == settings["outlier_channels"] and planted["scale"] == settings["outlier_scale"]
    with safe_open(tiny_deepseek.model_dir / "model.safetensors", "pt") as f:
        norm = f.get_tensor("model.layers.2.input_layernorm.weight").float().abs()
    others = norm[[c for c in range(len(norm)) if c not in channels]]
    assert float(norm[channels].min()) > 4 * float(others.median())
