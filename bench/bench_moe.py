#!/usr/bin/env python
"""Peak RSS of ``main.py --train_mode moe`` with E vs 4E routed experts, next to ``--train_mode block``.

``moe`` reads, trains and frees one expert at a time, so its peak memory should not grow
with the expert count (goal ratio <= 1.3); ``block`` holds every expert of a block at
once and is printed for contrast. Same DeepSeek-V3 shape otherwise; one calibration dump
per model; the checkpoint size is printed for scale.

Usage:
    python bench/bench_moe.py [--experts 16] [--hidden 512] [--moe_intermediate 512]
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
    p.add_argument("--experts", type=int, default=16, help="E (default 16); 4E is also run")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--moe_intermediate", type=int, default=512)
    p.add_argument("--layers", type=int, default=3, help="blocks; the first is dense")
    p.add_argument("--n_samples", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=128)
    args = p.parse_args()
    text = train_text(200_000)
    print(f"== peak RSS vs routed experts: deepseek_v3, hidden {args.hidden}, expert width {args.moe_intermediate}, "
          f"{args.layers} blocks, {args.n_samples} x {args.seq_len} tokens, w8a8c16 dynamic, 1 epoch ==")
    rows = {}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        corpus = work / "train.txt"
        corpus.write_text(text)
        for experts in (args.experts, 4 * args.experts):
            model, size = tiny_bf16_model(
                work / f"E{experts}", "deepseek_v3", text[:100_000], hidden_size=args.hidden,
                intermediate_size=2 * args.hidden, moe_intermediate_size=args.moe_intermediate,
                n_routed_experts=experts, num_experts_per_tok=4, n_group=4, topk_group=2, num_attention_heads=8,
                num_key_value_heads=8, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16,
                v_head_dim=32, num_hidden_layers=args.layers)
            dump = work / f"calib{experts}"
            extract_peak_rss(model, corpus, args.n_samples, args.seq_len, dump)
            rss = {}
            for mode in ("moe", "block"):
                rss[mode] = peak_rss_mib([
                    sys.executable, "main.py", "--model", str(model), "--data_dir", str(dump), "--output_dir",
                    str(work / f"params{experts}_{mode}"), "--scheme", "w8a8c16", "--act", "dynamic", "--epochs", "1",
                    "--train_mode", mode])
            rows[experts] = rss
            print(f"experts {experts:4d}  checkpoint {size:7.1f} MiB  --train_mode moe {rss['moe']:7.1f} MiB  "
                  f"--train_mode block {rss['block']:7.1f} MiB")
    small, big = rows[args.experts], rows[4 * args.experts]
    print(f"ratio 4E/E: --train_mode moe {big['moe'] / small['moe']:.3f} (goal <= 1.3)   "
          f"--train_mode block {big['block'] / small['block']:.3f}")


if __name__ == "__main__":
    main()
