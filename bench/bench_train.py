#!/usr/bin/env python
"""Peak RSS of extract_calib_data.py and main.py at L vs 4L layers (same width), in one run.

Both stages hold one block at a time, so their peak memory should not grow with depth
(goal ratio <= 1.3). The checkpoint size is printed beside it for scale.

Usage:
    python bench/bench_train.py [--layers 6] [--n_samples 8] [--seq_len 256]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import extract_peak_rss, peak_rss_mib, tiny_bf16_model, train_text  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=6, help="L (default 6); 4L is also run")
    p.add_argument("--n_samples", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--scheme", default="w8a8c8")
    args = p.parse_args()
    text = train_text(400_000)
    print(f"== peak RSS vs depth: hidden 768, intermediate 3072, {args.n_samples} x {args.seq_len} tokens, "
          f"{args.scheme}, 1 epoch ==")
    rows = {}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        corpus = work / "train.txt"
        corpus.write_text(text)
        for n in (args.layers, 4 * args.layers):
            model, size = tiny_bf16_model(work / f"L{n}", "llama", text[:200_000], hidden_size=768,
                                          intermediate_size=3072, num_attention_heads=12, num_key_value_heads=4,
                                          num_hidden_layers=n)
            dump, params = work / f"calib{n}", work / f"params{n}"
            extract = extract_peak_rss(model, corpus, args.n_samples, args.seq_len, dump)
            train = peak_rss_mib([sys.executable, "main.py", "--model", str(model), "--data_dir", str(dump),
                                  "--output_dir", str(params), "--scheme", args.scheme, "--epochs", "1"])
            rows[n] = (size, extract, train)
            print(f"layers {n:3d}  checkpoint {size:7.1f} MiB  extract_calib_data.py {extract:7.1f} MiB  "
                  f"main.py {train:7.1f} MiB")
    (_, e1, t1), (_, e4, t4) = rows[args.layers], rows[4 * args.layers]
    print(f"ratio 4L/L: extract_calib_data.py {e4 / e1:.3f}   main.py {t4 / t1:.3f}   (goal <= 1.3)")


if __name__ == "__main__":
    main()
