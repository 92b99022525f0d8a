#!/usr/bin/env python
"""Dump the FP hidden states entering every decoder block (plus the final one).

Example:
    python extract_calib_data.py --model assets/smollm2-135m --dataset assets/corpus/train.txt \
        --n_samples 64 --seq_len 2048 --output_dir outputs/calib
"""

from __future__ import annotations

import argparse
import logging
import sys

from cores.calibrator.extract import ExtractConfig, extract_calibration
from cores.cli import at_least, check_device, check_output_dir, run_main
from cores.utils.logging import setup_logging

log = logging.getLogger("extract_calib_data")


def parse_args(argv: list[str] | None = None) -> ExtractConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="FP model folder (bf16 or FP8)")
    p.add_argument("--output_dir", required=True, help="dump folder")
    p.add_argument("--dataset", default="wikitext2", help="wikitext2, or a .txt / .parquet file or a folder")
    p.add_argument("--split", default="train", help="dataset split (default: train)")
    p.add_argument("--n_samples", type=at_least(1), default=128, help="calibration windows (default 128)")
    p.add_argument("--seq_len", type=at_least(1), default=2048, help="tokens per window (default 2048)")
    p.add_argument("--seed", type=int, default=0, help="window sampling seed (default 0)")
    p.add_argument("--dev", default="cpu", help="cpu, cuda:N or N (default cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype (the dump is bf16 either way)")
    p.add_argument("--batch_size", type=at_least(1), default=1, help="windows per forward (default 1)")
    a = p.parse_args(argv)
    check_output_dir("--output_dir", a.output_dir)
    return ExtractConfig(model=a.model, output_dir=a.output_dir, dataset=a.dataset, split=a.split,
                         n_samples=a.n_samples, seq_len=a.seq_len, seed=a.seed, device=check_device("--dev", a.dev),
                         dtype=a.dtype, batch_size=a.batch_size)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    return run_main(lambda: _run(parse_args(argv)), log)


def _run(cfg: ExtractConfig) -> int:
    manifest = extract_calibration(cfg)
    print(f"dump ready: {manifest.num_blocks + 1} boundaries of [{manifest.n_samples}, {manifest.seq_len}, "
          f"{manifest.hidden_size}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
