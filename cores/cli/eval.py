"""Perplexity of a model folder on Wikitext-2 or any local text, streamed block by block.

Example:
    python eval_ppl.py --model assets/smollm2-135m --dataset assets/corpus/eval.txt \
        --seq_len 2048 --output_json outputs/ppl_bf16.json
"""

from __future__ import annotations

import dataclasses
import logging

from ..eval.perplexity import PplConfig, evaluate_ppl, write_result
from ..utils.logging import setup_logging
from . import (at_least, check_device, check_output_dir, check_output_file, command_parser, config_from_args,
               device_flag, run_main)

log = logging.getLogger("eval_ppl")


def parse_args(argv: list[str] | None = None) -> tuple[PplConfig, str | None]:
    p = command_parser(__doc__)
    p.add_argument("--model", help="Hugging Face model folder (bf16, FP8 or deployed); required, here or in --config")
    p.add_argument("--dataset", help="wikitext2 (default), or a .txt / .parquet file or a folder")
    p.add_argument("--split", help="dataset split (default: test)")
    p.add_argument("--seq_len", type=at_least(2), help="window length in tokens (default: 2048)")
    p.add_argument("--output_json", help="write the result here as JSON (a flag only, not a --config key)")
    p.add_argument("--dev", help="cpu, cuda:N or N (default: cpu)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype; auto (default) = bfloat16 on GPU, float32 on CPU")
    p.add_argument("--batch_size", type=at_least(1), help="windows per forward (default: 1)")
    p.add_argument("--max_windows", type=at_least(1), help="evaluate only the first N windows")
    p.add_argument("--offload_dir", help="keep hidden states in a file here instead of RAM")
    p.add_argument("--param_dir", help="evaluate the fake-quantized model with params from main.py")
    p.add_argument("--mla_param_path", help="params of --train_mode mla, when kept apart from --moe_param_path")
    p.add_argument("--moe_param_path", help="params of --train_mode moe, when kept apart from --mla_param_path")
    a = p.parse_args(argv)
    output_json = a.__dict__.pop("output_json")
    check_output_file("--output_json", output_json)
    cfg = config_from_args(PplConfig, a)
    check_output_dir("--offload_dir", cfg.offload_dir)
    return dataclasses.replace(cfg, device=check_device(device_flag(a), cfg.device)), output_json


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    return run_main(lambda: _run(*parse_args(argv)), log)


def _run(cfg: PplConfig, output_json: str | None) -> int:
    result = evaluate_ppl(cfg)
    given = [p for p in (cfg.param_dir, cfg.mla_param_path, cfg.moe_param_path) if p]
    what = f"fake-quant ({', '.join(given)})" if given else "deployed" if result.deployed else "float"
    print(f"{what} ppl {result.ppl:.4f} | {result.tokens} tokens in {result.windows} windows of {result.seq_len} | "
          f"{result.tokens_per_s:.1f} tokens/s | {result.dtype} on {result.device}")
    if output_json:
        write_result(result, output_json)
        log.info("wrote %s", output_json)
    return 0

