#!/usr/bin/env python
"""llm-compressor baseline for ``bench/bench_quality.py``; runs in its own venv.

Quantizes the model with one llm-compressor recipe (``oneshot``), calibrated on the
exact token windows of one of our dumps (``tokens.safetensors``, key ``input_ids``),
then evaluates perplexity with a plain ``transformers`` forward of the model that
``oneshot`` leaves in memory (its fake-quant modules are active in that forward) on
the windows of ``cores.utils.data.ppl_windows``. Writes a JSON result. ``*_kv8`` recipes add
FP8 KV-cache fake-quant (hooked into attention by compressed-tensors); their JSON also holds
``kv_check``, the first window's NLL with that quantization on and off.

Usage:
    python bench/baselines/llmcompressor_gptq.py --recipe gptq_w8a8 --model M --tokens T \
        --eval_text E --seq_len 2048 --max_windows 8 --output_json F
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from cores.utils.data import load_text, ppl_windows  # noqa: E402

log = logging.getLogger("llmcompressor_baseline")
RECIPES = ("bf16", "gptq_w8a8", "gptq_w4a8_g64", "gptq_w4a8_g128", "gptq_w4a16_g64", "sq_gptq_w8a8",
           "gptq_w8a8_static", "sq_gptq_w8a8_static", "gptq_w8a8_kv8", "sq_gptq_w8a8_kv8")


def int4_group(group_size: int, act_bits: int | None, ignore: list[str]):
    """A GPTQ modifier for symmetric int4 group weights, optionally int8 dynamic per-token inputs."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.gptq import GPTQModifier

    acts = None if act_bits is None else QuantizationArgs(num_bits=act_bits, type="int", strategy="token",
                                                          symmetric=True, dynamic=True)
    weights = QuantizationArgs(num_bits=4, type="int", strategy="group", group_size=group_size, symmetric=True)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights, input_activations=acts)
    return GPTQModifier(config_groups={"group_0": scheme}, ignore=ignore)


def int8_static_tensor(ignore: list[str]):
    """A GPTQ modifier for int8 per-channel weights and int8 static per-tensor inputs (``minmax`` observer)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.gptq import GPTQModifier

    weights = QuantizationArgs(num_bits=8, type="int", strategy="channel", symmetric=True)
    acts = QuantizationArgs(num_bits=8, type="int", strategy="tensor", symmetric=True, dynamic=False)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights, input_activations=acts)
    return GPTQModifier(config_groups={"group_0": scheme}, ignore=ignore)


def fp8_kv_cache():
    """The KV-cache scheme compressed-tensors writes for FP8 KV: e4m3, static per-tensor k/v scales."""
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=8, type="float", strategy="tensor", symmetric=True, dynamic=False)


def build_recipe(name: str, ignore: list[str]) -> list:
    """The llm-compressor modifiers of a recipe name (``bf16``: none); ``ignore`` stays unquantized."""
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

    def w8a8(**kw):
        return GPTQModifier(scheme="W8A8", targets="Linear", ignore=ignore, **kw)

    recipes = {
        "bf16": lambda: [],
        "gptq_w8a8": lambda: [w8a8()],
        "gptq_w4a8_g64": lambda: [int4_group(64, 8, ignore)],
        "gptq_w4a8_g128": lambda: [int4_group(128, 8, ignore)],
        "gptq_w4a16_g64": lambda: [int4_group(64, None, ignore)],
        "sq_gptq_w8a8": lambda: [SmoothQuantModifier(smoothing_strength=0.8), w8a8()],
        "gptq_w8a8_static": lambda: [int8_static_tensor(ignore)],
        "sq_gptq_w8a8_static": lambda: [SmoothQuantModifier(smoothing_strength=0.8), int8_static_tensor(ignore)],
        "gptq_w8a8_kv8": lambda: [w8a8(kv_cache_scheme=fp8_kv_cache())],
        "sq_gptq_w8a8_kv8": lambda: [SmoothQuantModifier(smoothing_strength=0.8), w8a8(kv_cache_scheme=fp8_kv_cache())],
    }
    return recipes[name]()


def window_nll(model, windows: torch.Tensor) -> float:
    """Mean next-token NLL over equal-length windows (= token mean, as in our evaluator)."""
    total = 0.0
    with torch.no_grad():
        for i, w in enumerate(windows):
            total += float(model(w[None], labels=w[None]).loss)
            if (i + 1) % 8 == 0 or i + 1 == len(windows):
                log.info("eval: window %d/%d, mean nll %.4f", i + 1, len(windows), total / (i + 1))
    return total / len(windows)


def kv_check(model, window: torch.Tensor) -> dict:
    """Evidence that the in-memory forward fake-quantizes the KV cache: one window's NLL with it on and off."""
    attn = [m for m in model.modules() if hasattr(m, "kv_cache") and hasattr(m, "k_scale")]
    nll_on = window_nll(model, window[None])
    for m in attn:
        m.quantization_enabled = False
    nll_off = window_nll(model, window[None])
    for m in attn:
        m.quantization_enabled = True
    return {"attention_modules_with_kv_scales": len(attn), "nll_window0_kv_on": nll_on, "nll_window0_kv_off": nll_off}


def add_common_args(p: argparse.ArgumentParser) -> None:
    """The flags every baseline script takes: model, calibration tokens, eval windows, threads, output."""
    p.add_argument("--model", required=True, help="Hugging Face model folder")
    p.add_argument("--tokens", required=True, help="tokens.safetensors of our calibration dump")
    p.add_argument("--eval_text", required=True, help="evaluation text (file or folder)")
    p.add_argument("--seq_len", type=int, required=True, help="eval window length")
    p.add_argument("--max_windows", type=int, required=True, help="eval windows")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ignore", default="lm_head", help="comma-separated compressed-tensors targets left unquantized")
    p.add_argument("--output_json", required=True)


def load_inputs(args: argparse.Namespace):
    """``(tokenizer, fp32 model, calibration token windows)`` of a baseline run.

    An MoE model is linearized after loading by llm-compressor's ``linearize_moe``: the fused 3-D
    expert weights of ``transformers`` become one ``Linear`` per expert projection (what GPTQ
    quantizes). Its load-time path (``load_quantizable_moe``) is not used: transformers' patch
    registry then imports every model module, the vision ones too, which need ``torchvision``.
    """
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    if getattr(model.config, "n_routed_experts", None):
        from llmcompressor.modeling.moe.linearize import linearize_moe

        linearize_moe(model)
    return tok, model, load_file(args.tokens)["input_ids"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", choices=RECIPES, required=True)
    add_common_args(p)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)

    from datasets import Dataset
    from llmcompressor import oneshot

    tok, model, calib = load_inputs(args)
    quant_s = 0.0
    if args.recipe != "bf16":
        data = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
        log.info("%s: oneshot on %d x %d calibration tokens", args.recipe, *calib.shape)
        start = time.perf_counter()
        recipe = build_recipe(args.recipe, args.ignore.split(","))
        model = oneshot(model=model, tokenizer=tok, recipe=recipe, dataset=data,
                        num_calibration_samples=calib.shape[0], max_seq_length=calib.shape[1],
                        shuffle_calibration_samples=False)
        quant_s = time.perf_counter() - start
    windows = ppl_windows(tok, load_text(args.eval_text, "test"), args.seq_len, args.max_windows)
    start = time.perf_counter()
    nll = window_nll(model.eval(), windows)
    eval_s = time.perf_counter() - start
    kv = kv_check(model, windows[0]) if args.recipe.endswith("_kv8") else None
    result = {
        "recipe": args.recipe, "ppl": math.exp(nll), "nll": nll, "tokens": windows.shape[0] * (args.seq_len - 1),
        "windows": windows.shape[0], "seq_len": args.seq_len, "calib_shape": list(calib.shape),
        "quant_seconds": quant_s, "eval_seconds": eval_s, **({"kv_check": kv} if kv else {}),
        "versions": {m: version(m) for m in ("llmcompressor", "compressed-tensors", "transformers", "torch")},
    }
    out = Path(args.output_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".tmp").write_text(json.dumps(result, indent=2))
    os.replace(out.with_suffix(".tmp"), out)
    log.info("%s: ppl %.4f (quantize %.1f s)", args.recipe, result["ppl"], quant_s)


if __name__ == "__main__":
    main()
