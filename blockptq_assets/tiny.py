"""Tiny random checkpoints of each family, written with ``transformers`` itself.

Used by the tests (reference equality, FP8 and corrupt-file handling) and by the
benchmarks (memory at L vs 4L layers). The checkpoints are real Hugging Face
folders: ``transformers`` builds the model and writes it, we only read it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from cores.quantization.fp8_block import Fp8BlockConfig, quantize_fp8_block

TINY_BASE = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)

TINY_FAMILY_OVERRIDES: dict[str, dict] = {
    "llama": dict(attention_bias=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "qwen2": dict(rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "qwen3": dict(head_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "deepseek_v3": dict(
        num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=32,
        n_group=4, topk_group=2, first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5,
        rope_interleave=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    "deepseek_v32": dict(
        num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=32,
        n_group=4, topk_group=2, first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5,
        index_n_heads=8, index_head_dim=16, index_topk=16,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    "qwen3_moe": dict(
        head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    ),
}


def tiny_config(model_type: str, **overrides):
    """A ``transformers`` config of ``model_type`` with tiny dimensions."""
    kwargs = {**TINY_BASE, **TINY_FAMILY_OVERRIDES.get(model_type, {}), **overrides}
    return AutoConfig.for_model(model_type, **kwargs)


def _perturb_constant_inits(model: torch.nn.Module, suffixes: tuple[str, ...] = ()) -> None:
    """Add noise to the parameters transformers initialises to constants (norms: all ones; and those ending in
    ``suffixes``), so that tests see them."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith(suffixes):
                param.add_(0.1 * torch.randn_like(param))


def make_tiny_checkpoint(
    out_dir: str | Path,
    model_type: str = "llama",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    **overrides,
) -> Path:
    """Write a randomly initialised model of ``model_type`` as a Hugging Face folder.

    Args:
        out_dir: destination folder.
        model_type: a ``transformers`` model type (``llama``, ``qwen2``, ``qwen3`` ...).
        seed: initialisation seed.
        dtype: stored dtype.
        max_shard_size: shard the safetensors (e.g. ``"200KB"``) to exercise the index path.
        overrides: config fields to change (e.g. ``num_hidden_layers``).

    Returns:
        ``out_dir``.
    """
    torch.manual_seed(seed)
    config = tiny_config(model_type, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    _perturb_constant_inits(model)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    return Path(out_dir)


def make_tiny_vl_checkpoint(out_dir: str | Path, model_type: str, text_config: dict, vision_config: dict,
                            seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Write a randomly initialised vision-language model (``qwen3_vl``, ``qwen3_5``, ...) as a Hugging Face
    folder, as transformers writes it; norms, ``A_log`` and ``dt_bias`` perturbed (they init to constants)."""
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, text_config=text_config, vision_config=vision_config,
                                  tie_word_embeddings=False)
    model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    _perturb_constant_inits(model, suffixes=("A_log", "dt_bias"))
    model.save_pretrained(out_dir)
    return Path(out_dir)


def quantize_fp8_blockwise(weight: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Cast ``weight`` to e4m3 with one inverse scale per ``block x block`` tile (DeepSeek layout, absmax scales:
    :func:`cores.quantization.fp8_block.quantize_fp8_block` in mode ``max``)."""
    return quantize_fp8_block(weight, Fp8BlockConfig(block=(block, block)))


def fp8_twins(
    src_dir: str | Path, fp8_dir: str | Path, bf16_dir: str | Path | None = None
) -> tuple[Path, Path | None]:
    """From a checkpoint, write an FP8 copy (2-D block weights in e4m3 + ``weight_scale_inv``)
    and, unless ``bf16_dir`` is None, its dequantized bf16 twin, which holds exactly the same values.

    Other tensors become bf16, except router correction biases, which stay fp32 as DeepSeek ships them.
    Only ``config.json`` and the weights are written.
    """
    from cores.utils.checkpoint import dequantize_fp8_blockwise

    src_dir, fp8_dir = Path(src_dir), Path(fp8_dir)
    config = json.loads((src_dir / "config.json").read_text())
    tensors = {}
    for f in sorted(src_dir.glob("*.safetensors")):
        tensors.update(load_file(f))
    fp8, bf16 = {}, {}
    for name, tensor in tensors.items():
        if tensor.dim() == 2 and ".layers." in name and name.endswith(("proj.weight", "proj_with_mqa.weight")):
            q, scale_inv = quantize_fp8_blockwise(tensor)
            fp8[name], fp8[name + "_scale_inv"] = q, scale_inv
            bf16[name] = dequantize_fp8_blockwise(q, scale_inv)
        else:
            keep_fp32 = name.endswith("e_score_correction_bias")
            fp8[name] = bf16[name] = tensor.to(torch.float32 if keep_fp32 else torch.bfloat16)
    fp8_config = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    for out, state, qcfg in ((fp8_dir, fp8, fp8_config), (bf16_dir, bf16, None)):
        if out is None:
            continue
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        cfg = {**config, "torch_dtype": "bfloat16"}
        cfg.pop("dtype", None)
        if qcfg:
            cfg["quantization_config"] = qcfg
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return fp8_dir, None if bf16_dir is None else Path(bf16_dir)


def save_tiny_tokenizer(model_dir: str | Path, text: str, vocab_size: int) -> None:
    """Train a byte-level BPE tokenizer of ``vocab_size`` on ``text`` and save it beside the model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator([text], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", model_max_length=1 << 20)
    fast.save_pretrained(model_dir)
