"""Vision-language checkpoints on text: Qwen3-VL, Qwen3.5 and Qwen3.5-MoE decoders equal the transformers
reference (fp32), block by block and as a whole model.

The decoder sits under ``model.language_model.*`` with a vision tower beside it; then the
pipeline end to end on each tiny model, the vision tower copied through deploy as stored.
"""

import pytest
import torch
from safetensors import safe_open
from test_qwen3_next import (E2E_N, E2E_SEQ, E2E_TEXT, deploy_w8a8c16, e2e_ppl, max_rel_err, reference_nll,
                                    train_block_mode)
from transformers import AutoModelForImageTextToText

from blockptq_assets.tiny import make_tiny_vl_checkpoint
from cores.models.run import sequence_nll
from cores.models.streaming import StreamingModel

RTOL = 1e-5
SEQ = 48

TEXT_TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6,
                 initializer_range=0.2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                         "mrope_section": [2, 3, 3], "mrope_interleaved": True})
LINEAR_ATTN = dict(
    layer_types=["linear_attention", "full_attention", "linear_attention"], linear_num_value_heads=4,
    linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                     "mrope_section": [1, 1, 0], "mrope_interleaved": True},
)
TEXT_CONFIGS = {
    "qwen3_vl": TEXT_TINY,
    "qwen3_5": {**TEXT_TINY, **LINEAR_ATTN},
    "qwen3_5_moe": {**{k: v for k, v in TEXT_TINY.items() if k != "intermediate_size"}, **LINEAR_ATTN,
                    "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                    "shared_expert_intermediate_size": 32},
}
VISION_TINY = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
                   spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16)


def tiny_vl(out, model_type: str = "qwen3_vl", seed: int = 0):
    """A tiny vision-language folder written by transformers (norms, ``A_log``, ``dt_bias`` perturbed)."""
    vision = {**VISION_TINY, "deepstack_visual_indexes": [0]} if model_type == "qwen3_vl" else VISION_TINY
    return make_tiny_vl_checkpoint(out, model_type, TEXT_CONFIGS[model_type], vision, seed=seed)


def reference(path):
    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()


@pytest.fixture(scope="module", params=sorted(TEXT_CONFIGS))
def tiny(request, tmp_path_factory):
    path = tiny_vl(tmp_path_factory.mktemp(request.param) / "model", request.param)
    return path, reference(path)


def test_decoder_config_and_names(tiny):
    path, ref = tiny
    ours = StreamingModel(path, dtype="float32")
    assert ours.num_blocks == 3 and ours.hidden_size == 64 and ours.config.vocab_size == 300
    assert ours.family.block_prefix(2) == "model.language_model.layers.2."
    assert ours.embed_weight().shape == (300, 64)


def test_every_block_equals_reference(tiny):
    path, ref = tiny
    ours = StreamingModel(path, dtype="float32")
    text = ref.model.language_model
    hidden = torch.randn(2, SEQ, ours.hidden_size, generator=torch.Generator().manual_seed(0))
    cos, sin = ours.rotary(SEQ)
    position_ids = torch.arange(SEQ)[None].expand(3, 1, -1)  # text: the same position on the t, h, w axes
    ref_cos, ref_sin = text.rotary_emb(hidden, position_ids)
    assert max_rel_err(cos, ref_cos[0]) <= RTOL and max_rel_err(sin, ref_sin[0]) <= RTOL
    errors = []  # of the block's update (output - input): the residual would hide a wrong mixer
    for idx in range(ours.num_blocks):
        with torch.no_grad():
            expected = text.layers[idx](hidden, position_embeddings=(ref_cos, ref_sin), attention_mask=None)
            errors.append(max_rel_err(ours.load_block(idx)(hidden, cos, sin) - hidden, expected - hidden))
    assert max(errors) <= RTOL, errors


def test_whole_model_nll_equals_reference(tiny):
    path, ref = tiny
    ids = torch.randint(0, 300, (3, SEQ), generator=torch.Generator().manual_seed(0))
    nll, count = sequence_nll(StreamingModel(path, dtype="float32"), ids, batch_size=2)
    assert count == 3 * (SEQ - 1)
    ref_nll = reference_nll(ref, ids)
    assert abs(nll - ref_nll) / ref_nll <= RTOL


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(TEXT_CONFIGS))
def test_rtn_and_learned_w8a8_end_to_end(model_type, tmp_path):
    from cores.calibrator.extract import ExtractConfig, extract_calibration
    from blockptq_assets.tiny import save_tiny_tokenizer

    model = tiny_vl(tmp_path / "model", model_type)
    save_tiny_tokenizer(model, E2E_TEXT, 300)
    text = tmp_path / "train.txt"
    text.write_text(E2E_TEXT)
    dump = tmp_path / "dump"
    extract_calibration(ExtractConfig(model=str(model), output_dir=str(dump), dataset=str(text), n_samples=E2E_N,
                                      seq_len=E2E_SEQ, batch_size=2))
    fp = e2e_ppl(model, text, tmp_path / "fp.json")
    learned, rtn = tmp_path / "learned", tmp_path / "rtn"
    train_block_mode(model, dump, learned)
    train_block_mode(model, dump, rtn, "--rtn")
    ppl_learned = e2e_ppl(model, text, tmp_path / "l.json", "--param_dir", str(learned))
    ppl_rtn = e2e_ppl(model, text, tmp_path / "r.json", "--param_dir", str(rtn))
    assert abs(ppl_learned / fp - 1) < 0.05 and abs(ppl_rtn / fp - 1) < 0.05

    qcfg = deploy_w8a8c16(model, tmp_path / "deployed", "--param_dir", str(learned))
    assert r"re:model\.visual\..*" in qcfg["ignore"]
    assert "model.language_model.layers.0.self_attn.q_proj" not in qcfg["ignore"]
    with safe_open(str(model / "model.safetensors"), "pt") as src:
        visual = {k: src.get_tensor(k) for k in src.keys() if k.startswith("model.visual.")}
    deployed = StreamingModel(tmp_path / "deployed", dtype="float32")
    assert deployed.deployed
    out = deployed.reader.read(sorted(visual))
    assert all(torch.equal(out[k], v) for k, v in visual.items())  # the vision tower as stored
    assert e2e_ppl(tmp_path / "deployed", text, tmp_path / "dl.json") == pytest.approx(ppl_learned, rel=1e-4)

    deploy_w8a8c16(model, tmp_path / "deployed_rtn")
    assert e2e_ppl(tmp_path / "deployed_rtn", text, tmp_path / "dr.json") == pytest.approx(ppl_rtn, rel=1e-4)
