"""Every family's block and whole model equal the transformers reference (fp32, rel. error <= 1e-5)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from blockptq_assets.tiny import make_tiny_checkpoint
from cores.models import UnsupportedModelError, get_family
from cores.models.run import sequence_nll
from cores.models.streaming import StreamingModel

RTOL = 1e-5

VARIANTS = {
    "llama": {},
    "llama-bias-llama3rope-tied": dict(
        attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    ),
    "llama-linear-rope-mha": dict(num_key_value_heads=4, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0,
                                                                         "factor": 2.0}),
    "qwen2": {},
    "qwen2-yarn": dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
                                        "original_max_position_embeddings": 64}),
    "qwen3": {},
    "qwen3-bias-sliding": dict(attention_bias=True, use_sliding_window=True, sliding_window=16, max_window_layers=1,
                               layer_types=["full_attention", "sliding_attention"]),
}


def max_rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def tiny(request, tmp_path_factory):
    name = request.param
    model_type = name.split("-")[0]
    path = make_tiny_checkpoint(tmp_path_factory.mktemp(name), model_type, seed=1, **VARIANTS[name])
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    return path, ref


def test_every_block_equals_reference(tiny):
    path, ref = tiny
    ours = StreamingModel(path, dtype="float32")
    torch.manual_seed(0)
    hidden = torch.randn(2, 48, ours.hidden_size)
    cos, sin = ours.rotary(48)
    position_ids = torch.arange(48)[None]
    ref_cos, ref_sin = ref.model.rotary_emb(hidden, position_ids)
    assert max_rel_err(cos, ref_cos[0]) <= RTOL and max_rel_err(sin, ref_sin[0]) <= RTOL
    for idx in range(ours.num_blocks):
        block = ours.load_block(idx)
        layer = ref.model.layers[idx]
        mask = None
        if getattr(layer.self_attn, "sliding_window", None):
            i = torch.arange(48)
            allowed = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < layer.self_attn.sliding_window)
            mask = torch.zeros(48, 48).masked_fill(~allowed, float("-inf"))[None, None]
        with torch.no_grad():
            expected = layer(hidden, attention_mask=mask, position_embeddings=(ref_cos, ref_sin),
                             position_ids=position_ids)
            expected = expected[0] if isinstance(expected, tuple) else expected
            got = block(hidden, cos, sin)
        assert max_rel_err(got, expected) <= RTOL, f"block {idx}"


def test_whole_model_nll_equals_reference(tiny):
    path, ref = tiny
    torch.manual_seed(0)
    ids = torch.randint(0, ref.config.vocab_size, (3, 40))
    with torch.no_grad():
        logits = ref(ids).logits
    ref_nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                reduction="sum")
    nll, count = sequence_nll(StreamingModel(path, dtype="float32"), ids, batch_size=2)
    assert count == 3 * 39
    assert abs(nll - float(ref_nll)) / float(ref_nll) <= RTOL


def test_unknown_family_is_refused():
    with pytest.raises(UnsupportedModelError, match=r"unsupported model_type .gpt2.; supported: .*llama"):
        get_family("gpt2")
