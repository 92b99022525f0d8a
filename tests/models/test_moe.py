"""DeepSeek-V3 / V3.2 and Qwen3-MoE blocks and whole models equal the transformers reference (fp32).

Also: routers choose what the reference routers choose, MLA's cache hook sees the
latent + rotary key, FP8 sources evaluate like their bf16 twins, and the MTP layer
that DeepSeek checkpoints append is not run.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

from blockptq_assets.tiny import fp8_twins, make_tiny_checkpoint
from cores.models.mla import MLAAttention
from cores.models.moe import MoE
from cores.models.run import sequence_nll
from cores.models.streaming import StreamingModel

RTOL = 1e-5
SEQ = 48  # > the tiny deepseek_v32 index_topk (16): the indexer really drops keys

VARIANTS = {
    "deepseek_v3": {},  # q_lora, first block dense, 4 groups / 2 kept, normalised top-k, interleaved rope
    "deepseek_v3-noqlora-yarn-halfsplit-nonorm-bias": dict(
        q_lora_rank=None, first_k_dense_replace=0, n_group=1, topk_group=1, norm_topk_prob=False,
        rope_interleave=False, attention_bias=True,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 64, "mscale": 1.0, "mscale_all_dim": 0.8},
    ),
    "deepseek_v32": {},
    "qwen3_moe": {},
    "qwen3_moe-nonorm-mlponly-sliding": dict(norm_topk_prob=False, mlp_only_layers=[0], use_sliding_window=True,
                                             sliding_window=16),
    "qwen3_moe-sparsestep": dict(decoder_sparse_step=2),
}


def max_rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


def _tiny_moe_checkpoint(root, model_type: str, **overrides):
    """A tiny checkpoint with non-zero router correction biases and attention biases (zero at init)."""
    src = make_tiny_checkpoint(root / "init", model_type, seed=1, **overrides)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("e_score_correction_bias") or (name.endswith(".bias") and "norm" not in name):
                tensor.add_(0.05 * torch.randn(tensor.shape, generator=gen))
    model.save_pretrained(root / "model")
    return root / "model"


def _reference(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def tiny(request, tmp_path_factory):
    name = request.param
    path = _tiny_moe_checkpoint(tmp_path_factory.mktemp(name), name.split("-")[0], **VARIANTS[name])
    return path, _reference(path)


def _layer_mask(layer) -> torch.Tensor | None:
    """The 4-D mask a reference layer needs: causal for V3.2 (its indexer reads it), sliding where set."""
    i = torch.arange(SEQ)
    allowed = i[:, None] >= i[None, :]
    window = getattr(layer.self_attn, "sliding_window", None)
    if window:
        allowed &= i[:, None] - i[None, :] < window
        return torch.zeros(SEQ, SEQ).masked_fill(~allowed, float("-inf"))[None, None]
    return allowed[None, None] if hasattr(layer.self_attn, "indexer") else None


def block_errors(path, ref) -> list[float]:
    ours = StreamingModel(path, dtype="float32")
    torch.manual_seed(0)
    hidden = torch.randn(2, SEQ, ours.hidden_size)
    cos, sin = ours.rotary(SEQ)
    position_ids = torch.arange(SEQ)[None]
    ref_cos, ref_sin = ref.model.rotary_emb(hidden, position_ids)
    assert max_rel_err(cos, ref_cos[0]) <= RTOL and max_rel_err(sin, ref_sin[0]) <= RTOL
    errors = []
    for idx in range(ours.num_blocks):
        layer = ref.model.layers[idx]
        with torch.no_grad():
            expected = layer(hidden, attention_mask=_layer_mask(layer), position_embeddings=(ref_cos, ref_sin),
                             position_ids=position_ids)
            errors.append(max_rel_err(ours.load_block(idx)(hidden, cos, sin), expected))
    return errors


def reference_nll(ref, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = ref(ids).logits
    return float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                   ids[:, 1:].reshape(-1), reduction="sum"))


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (3, SEQ), generator=torch.Generator().manual_seed(0))


def test_every_block_equals_reference(tiny):
    path, ref = tiny
    errors = block_errors(path, ref)
    assert max(errors) <= RTOL, errors


def test_whole_model_nll_equals_reference(tiny):
    path, ref = tiny
    ids = _ids(ref.config.vocab_size)
    nll, count = sequence_nll(StreamingModel(path, dtype="float32"), ids, batch_size=2)
    assert count == 3 * (SEQ - 1)
    ref_nll = reference_nll(ref, ids)
    assert abs(nll - ref_nll) / ref_nll <= RTOL


def test_block_kinds_follow_config(tiny):
    path, ref = tiny
    ours = StreamingModel(path, dtype="float32")
    for idx in range(ours.num_blocks):
        is_moe = isinstance(ours.load_block(idx).mlp, MoE)
        assert is_moe == hasattr(ref.model.layers[idx].mlp, "experts"), f"block {idx}"


def test_route_returns_reference_selection(tiny):
    path, ref = tiny
    ours = StreamingModel(path, dtype="float32")
    x = torch.randn(64, ours.hidden_size, generator=torch.Generator().manual_seed(3))
    checked = 0
    for idx in range(ours.num_blocks):
        mlp = ours.load_block(idx).mlp
        if not isinstance(mlp, MoE):
            continue
        weights, ids = mlp.route(x.view(4, 16, -1))
        _, ref_weights, ref_ids = ref.model.layers[idx].mlp.gate(x)
        order, ref_order = ids.argsort(-1), ref_ids.argsort(-1)
        assert torch.equal(ids.gather(1, order), ref_ids.gather(1, ref_order))
        assert torch.allclose(weights.gather(1, order), ref_weights.gather(1, ref_order), rtol=RTOL, atol=0)
        checked += 1
    assert checked


class _Record(nn.Module):
    def __init__(self):
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x)
        return x


class _Halve(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / 2


@pytest.mark.parametrize("model_type", ["deepseek_v3", "deepseek_v32"])
def test_mla_cache_hook_sees_latent_and_rotary_key(model_type, tmp_path):
    ours = StreamingModel(make_tiny_checkpoint(tmp_path, model_type), dtype="float32")
    config = ours.config
    block = ours.load_block(0)
    attn = block.self_attn
    assert isinstance(attn, MLAAttention)
    hidden = torch.randn(2, SEQ, ours.hidden_size)
    cos, sin = ours.rotary(SEQ)
    plain = block(hidden, cos, sin)
    attn.kv_cache_quant = _Record()
    assert torch.equal(block(hidden, cos, sin), plain)
    (cached,) = attn.kv_cache_quant.seen
    assert cached.shape == (2, SEQ, config.kv_lora_rank + config.qk_rope_head_dim)
    latent = attn.kv_a_layernorm(attn.kv_a_proj_with_mqa(block.input_layernorm(hidden))[..., :config.kv_lora_rank])
    assert torch.equal(cached[..., :config.kv_lora_rank], latent)
    attn.kv_cache_quant = _Halve()  # what the hook returns is what attention uses
    assert not torch.allclose(block(hidden, cos, sin), plain)


def test_v32_indexer_drops_keys_when_longer_than_topk(tmp_path):
    ours = StreamingModel(make_tiny_checkpoint(tmp_path, "deepseek_v32"), dtype="float32")
    block = ours.load_block(0)
    hidden = torch.randn(1, SEQ, ours.hidden_size)
    cos, sin = ours.rotary(SEQ)
    attn, x = block.self_attn, block.input_layernorm(hidden)
    indexer = attn.indexer
    mask = indexer(x, attn.q_a_layernorm(attn.q_a_proj(x)), cos, sin)
    assert mask.shape == (1, 1, SEQ, SEQ)
    assert mask.sum(-1).max() == indexer.topk < SEQ
    sparse = block(hidden, cos, sin)
    indexer.topk = SEQ
    assert not torch.allclose(block(hidden, cos, sin), sparse)


@pytest.mark.parametrize("model_type", ["deepseek_v3", "deepseek_v32"])
def test_fp8_source_evaluates_like_bf16_twin_and_reference(model_type, tmp_path):
    src = _tiny_moe_checkpoint(tmp_path, model_type)
    fp8_dir, bf16_dir = fp8_twins(src, tmp_path / "fp8", tmp_path / "bf16")
    assert any(k.endswith("experts.1.down_proj.weight_scale_inv") for k in load_file(fp8_dir / "model.safetensors"))
    ids = _ids(512)
    fp8 = sequence_nll(StreamingModel(fp8_dir, dtype="float32"), ids)
    assert fp8 == sequence_nll(StreamingModel(bf16_dir, dtype="float32"), ids)
    ref_nll = reference_nll(_reference(bf16_dir), ids)
    assert abs(fp8[0] - ref_nll) / ref_nll <= RTOL


def test_mtp_layer_is_not_run(tmp_path):
    src = _tiny_moe_checkpoint(tmp_path, "deepseek_v3")
    config = json.loads((src / "config.json").read_text())
    n = config["num_hidden_layers"]
    assert config["num_nextn_predict_layers"] == 1
    tensors = load_file(src / "model.safetensors")
    mtp = {k.replace(f"layers.{n - 1}.", f"layers.{n}."): v.clone() for k, v in tensors.items()
           if k.startswith(f"model.layers.{n - 1}.")}
    hidden = config["hidden_size"]
    mtp |= {f"model.layers.{n}.enorm.weight": torch.ones(hidden), f"model.layers.{n}.hnorm.weight": torch.ones(hidden),
            f"model.layers.{n}.eh_proj.weight": torch.zeros(hidden, 2 * hidden),
            f"model.layers.{n}.embed_tokens.weight": tensors["model.embed_tokens.weight"].clone(),
            f"model.layers.{n}.shared_head.norm.weight": torch.ones(hidden),
            f"model.layers.{n}.shared_head.head.weight": tensors["lm_head.weight"].clone()}
    with_mtp = tmp_path / "with_mtp"
    with_mtp.mkdir()
    (with_mtp / "config.json").write_text(json.dumps(config))
    save_file(tensors | mtp, str(with_mtp / "model.safetensors"), metadata={"format": "pt"})
    ids = _ids(config["vocab_size"])
    assert sequence_nll(StreamingModel(with_mtp, dtype="float32"), ids) == sequence_nll(StreamingModel(
        src, dtype="float32"), ids)
