"""One command from an FP model to a deployed (optionally mixed-precision) checkpoint and its perplexity.

Chains extract_calib_data.py, main.py, deploy.py, the BF16-layer mix and eval_ppl.py, driven by a
recipe (cores/recipes/); rerunning resumes, each stage skipping what it finished. --jobs N trains the
blocks in N processes at once. Prints the result as JSON, then a summary table. Example:

    python quantize.py --model_name HuggingFaceTB/SmolLM2-135M-Instruct --model_path assets/smollm2-135m \
        --save_path outputs/smollm2-flow --calib_dataset assets/corpus/train.txt \
        --eval_dataset assets/corpus/eval.txt --recipe my_recipe.yaml
"""

from __future__ import annotations

import dataclasses
import json
import logging

from ..recipes.flow import FlowConfig, run_flow, summary_table
from ..utils.logging import setup_logging
from . import (at_least, check_device, check_output_dir, check_output_folder, command_parser, config_from_args,
               device_flag, run_main)

log = logging.getLogger("quantize")


def parse_args(argv: list[str] | None = None) -> FlowConfig:
    p = command_parser(__doc__)
    p.add_argument("--model_path", "--model", dest="model_path",
                   help="FP model folder (bf16 or FP8); required, here or in --config")
    p.add_argument("--save_path", "--output_dir", dest="save_path",
                   help="folder for the dump, params, deployed checkpoint, results; required, here or in --config")
    p.add_argument("--model_name", help="Hugging Face id; picks the built-in recipe (default: from config.json)")
    p.add_argument("--recipe", help="recipe file (default: the built-in one for the model)")
    p.add_argument("--mix_path", help="mixed-precision output (default: SAVE_PATH/mixed when the recipe has "
                                      "bf16_layers)")
    p.add_argument("--calib_dataset", help="calibration text (default: wikitext2)")
    p.add_argument("--eval_dataset", help="evaluation text (default: no evaluation)")
    p.add_argument("--n_samples", type=at_least(1), help="calibration windows (default 128)")
    p.add_argument("--seq_len", type=at_least(2), help="calibration window length (default 2048)")
    p.add_argument("--eval_seq_len", type=at_least(2), help="evaluation window length (default 2048)")
    p.add_argument("--eval_windows", type=at_least(1), help="evaluate only the first N windows")
    p.add_argument("--no_eval_bf16", dest="eval_bf16", action="store_false", default=None,
                   help="do not evaluate the source")
    p.add_argument("--dev", help="cpu, cuda, cuda:N or N (default cpu)")
    p.add_argument("--jobs", type=at_least(1), metavar="N",
                   help="training processes, each taking every N-th block (default 1; not with sequential "
                        "training): on cpu each gets cpu_count / N threads, on cuda job i uses cuda:(i mod "
                        "device count), on cuda:K all use it")
    a = p.parse_args(argv)
    cfg = config_from_args(FlowConfig, a)
    check_output_dir("--save_path", cfg.save_path)
    if cfg.mix_path:
        check_output_folder("--mix_path", cfg.mix_path)
    return dataclasses.replace(cfg, device=check_device(device_flag(a), cfg.device))


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    return run_main(lambda: _run(parse_args(argv)), log)


def _run(cfg: FlowConfig) -> int:
    out = run_flow(cfg)
    print(json.dumps(out, indent=2))
    print()
    print(summary_table(out, cfg.save_path))
    return 0

