#!/usr/bin/env python
"""AutoRound baseline for ``bench/bench_quality.py``; runs in its own venv.

Quantizes the model with AutoRound (SignRound, ``iters`` steps per block), calibrated on
the exact token windows of one of our dumps (``tokens.safetensors``, key ``input_ids``:
passed as a list of ``[1, seq]`` tensors, so nsamples = windows and seqlen = their
length), then evaluates perplexity with a plain ``transformers`` forward of the model
that ``quantize()`` leaves in memory: qdq weights copied into each Linear, and for
activation quantization each Linear wrapped in auto-round's ``WrapperWALayer``, which
fake-quantizes its input. Same eval windows and NLL as ``llmcompressor_gptq.py``.

Tuning runs in fp32 (``amp=False``): this CPU has no bf16 units and the eval is fp32.

Usage:
    python bench/baselines/autoround_w4a8.py --recipe autoround_w4a8_g64 --model M --tokens T \
        --eval_text E --seq_len 2048 --max_windows 8 --iters 200 --output_json F
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

from bench.baselines.llmcompressor_gptq import add_common_args, load_inputs, window_nll  # noqa: E402
from cores.utils.data import load_text, ppl_windows  # noqa: E402

log = logging.getLogger("autoround_baseline")
RECIPES = ("autoround_w4a8_g64", "autoround_w4a16_g64")


def build_scheme(name: str, group_size: int) -> dict:
    """auto-round scheme fields of a recipe: int4 symmetric group weights, optional int8 dynamic per-token inputs.

    ``act_group_size=-1`` is one scale per row of the flattened ``[tokens, features]`` input,
    i.e. per token; ``act_dynamic=True`` recomputes it on every forward.
    """
    weights = {"bits": 4, "group_size": group_size, "sym": True, "data_type": "int"}
    acts = {
        "autoround_w4a8_g64": {"act_bits": 8, "act_group_size": -1, "act_sym": True, "act_data_type": "int",
                               "act_dynamic": True},
        "autoround_w4a16_g64": {"act_bits": 16},
    }
    return {**weights, **acts[name]}


def count_act_wrappers(model: torch.nn.Module) -> int:
    """Modules whose input auto-round fake-quantizes in the plain forward (``WrapperWALayer``)."""
    from auto_round.wrapper import WrapperWALayer

    return sum(isinstance(m, WrapperWALayer) for m in model.modules())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", choices=RECIPES, required=True)
    add_common_args(p)
    p.add_argument("--iters", type=int, default=200, help="SignRound steps per block (0: RTN)")
    p.add_argument("--group_size", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=8, help="calibration windows per SignRound step")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)

    from auto_round import AutoRound
    from auto_round.schemes import QuantizationScheme

    tok, model, calib = load_inputs(args)
    scheme = build_scheme(args.recipe, args.group_size)
    log.info("%s: AutoRound %s, %d iters on %d x %d calibration tokens", args.recipe, scheme, args.iters,
             *calib.shape)
    start = time.perf_counter()
    ar = AutoRound(model, tokenizer=tok, scheme=QuantizationScheme.from_dict(scheme), dataset=list(calib.split(1)),
                   iters=args.iters, nsamples=calib.shape[0], seqlen=calib.shape[1], batch_size=args.batch_size,
                   device_map="cpu", enable_torch_compile=False, amp=False)
    model, _ = ar.quantize()
    quant_s = time.perf_counter() - start
    model = model.float().eval()
    wrappers = count_act_wrappers(model)
    log.info("%s: quantized in %.1f s; %d Linear inputs fake-quantized", args.recipe, quant_s, wrappers)

    windows = ppl_windows(tok, load_text(args.eval_text, "test"), args.seq_len, args.max_windows)
    start = time.perf_counter()
    nll = window_nll(model, windows)
    result = {
        "recipe": args.recipe, "ppl": math.exp(nll), "nll": nll, "tokens": windows.shape[0] * (args.seq_len - 1),
        "windows": windows.shape[0], "seq_len": args.seq_len, "calib_shape": list(calib.shape),
        "iters": args.iters, "group_size": args.group_size, "batch_size": args.batch_size, "scheme": scheme,
        "act_quant_layers": wrappers, "quant_seconds": quant_s, "eval_seconds": time.perf_counter() - start,
        "versions": {m: version(m) for m in ("auto-round", "transformers", "torch")},
    }
    out = Path(args.output_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".tmp").write_text(json.dumps(result, indent=2))
    os.replace(out.with_suffix(".tmp"), out)
    log.info("%s: ppl %.4f (quantize %.1f s, %d iters)", args.recipe, result["ppl"], quant_s, args.iters)


if __name__ == "__main__":
    main()
