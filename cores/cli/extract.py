"""Dump the FP hidden states entering every decoder block (plus the final one).

Example:
    python extract_calib_data.py --model assets/smollm2-135m --dataset assets/corpus/train.txt \
        --n_samples 64 --seq_len 2048 --output_dir outputs/calib
"""

from __future__ import annotations

import dataclasses
import logging

from ..calibrator.extract import ExtractConfig, extract_calibration
from ..utils.logging import setup_logging
from . import (at_least, check_device, check_output_dir, command_parser, config_from_args, device_flag,
               run_main)

log = logging.getLogger("extract_calib_data")


def parse_args(argv: list[str] | None = None) -> ExtractConfig:
    p = command_parser(__doc__)
    p.add_argument("--model", help="FP model folder (bf16 or FP8); required, here or in --config")
    p.add_argument("--output_dir", help="dump folder; required, here or in --config")
    p.add_argument("--dataset", help="wikitext2 (default), or a .txt / .parquet file or a folder")
    p.add_argument("--split", help="dataset split (default: train)")
    p.add_argument("--n_samples", type=at_least(1), help="calibration windows (default 128)")
    p.add_argument("--seq_len", type=at_least(1), help="tokens per window (default 2048)")
    p.add_argument("--seed", type=int, help="window sampling seed (default 0)")
    p.add_argument("--dev", help="cpu, cuda:N or N (default cpu)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype (default auto; the dump is bf16 either way)")
    p.add_argument("--batch_size", type=at_least(1), help="windows per forward (default 1)")
    a = p.parse_args(argv)
    cfg = config_from_args(ExtractConfig, a)
    check_output_dir("--output_dir", cfg.output_dir)
    return dataclasses.replace(cfg, device=check_device(device_flag(a), cfg.device))


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    return run_main(lambda: _run(parse_args(argv)), log)


def _run(cfg: ExtractConfig) -> int:
    manifest = extract_calibration(cfg)
    print(f"dump ready: {manifest.num_blocks + 1} boundaries of [{manifest.n_samples}, {manifest.seq_len}, "
          f"{manifest.hidden_size}]")
    return 0

