#!/usr/bin/env python
"""Train (once) the tiny DeepSeek-V3 on the corpus and cache it with its FP8 twin under the assets folder.

A few minutes on one CPU thread the first time; afterwards it only checks that the cached
folders match the settings. Needs the SmolLM2 tokenizer and the corpus (scripts/prepare_assets.py).

Example:
    OMP_NUM_THREADS=1 python scripts/train_tiny_deepseek.py --assets_dir assets
    python eval_ppl.py --model assets/tiny-deepseek-v3 --dataset assets/corpus --seq_len 512
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # blockptq_assets is not installed

from blockptq_assets.assets import DEFAULT_ASSETS_DIR, AssetError  # noqa: E402
from blockptq_assets.tiny_trained import TinyDeepseekSettings, ensure_tiny_deepseek  # noqa: E402
from cores.utils.logging import setup_logging  # noqa: E402

log = logging.getLogger("train_tiny_deepseek")


def main(argv: list[str] | None = None) -> int:
    defaults = TinyDeepseekSettings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--assets_dir", default=str(DEFAULT_ASSETS_DIR),
                   help=f"holds smollm2-135m and corpus; the folders go there too (default: {DEFAULT_ASSETS_DIR})")
    p.add_argument("--steps", type=int, default=defaults.steps,
                   help=f"optimizer steps (default: {defaults.steps}); other values make another cache")
    p.add_argument("--seed", type=int, default=defaults.seed, help=f"seed (default: {defaults.seed})")
    p.add_argument("--outlier_channels", type=int, default=defaults.outlier_channels,
                   help=f"outlier channels planted in every norm (default: {defaults.outlier_channels}; 0: none)")
    p.add_argument("--outlier_scale", type=float, default=defaults.outlier_scale,
                   help=f"their factor, a power of two (default: {defaults.outlier_scale:g})")
    args = p.parse_args(argv)
    setup_logging()
    settings = dataclasses.replace(defaults, steps=args.steps, seed=args.seed,
                                   outlier_channels=args.outlier_channels, outlier_scale=args.outlier_scale)
    try:
        tiny = ensure_tiny_deepseek(args.assets_dir, settings)
    except AssetError as err:
        log.error("%s", err)
        return 2
    record = tiny.record
    ev = record["eval"]
    print(f"bf16: {tiny.model_dir}\nfp8:  {tiny.fp8_dir}\n"
          f"trained {record['train_tokens']} tokens in {record['train_seconds']:.0f} s "
          f"({record['threads']} thread(s)), final loss {record['losses'][-1]['loss']:.3f}\n"
          f"eval ppl {ev['ppl']:.2f} ({ev['windows']} windows of {ev['seq_len']} tokens of {ev['split']})\n"
          f"planted outlier channels (x{record['outlier_channels']['scale']:g}): "
          f"{record['outlier_channels']['channels_by_width']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
