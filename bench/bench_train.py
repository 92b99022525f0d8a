#!/usr/bin/env python
"""Peak RSS of extract_calib_data.py and main.py at L vs 4L layers (same width), in one run;
with ``--baseline REV``, also main.py's block-mode peak RSS on one MoE block, this tree vs REV.

Both stages hold one block at a time, so their peak memory should not grow with depth
(goal ratio <= 1.3). The checkpoint size is printed beside it for scale.

The MoE part trains the second block (routed experts) of a DeepSeek-V3-shaped bf16 model
with ``--train_mode block`` and the default learning (clips, rounding offsets, smoothing),
once with this tree's main.py and once with REV's, checked out in a temporary git worktree,
on the same dump: the ratio is this tree's peak over REV's.

Usage:
    python bench/bench_train.py [--layers 6] [--n_samples 8] [--seq_len 256] [--baseline REV] [--skip_depth]
        [--repeats 3] [--flags "--round_optimizer sign"]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
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
    p.add_argument("--baseline", metavar="REV", help="also compare block-mode peak RSS on an MoE block with REV")
    p.add_argument("--skip_depth", action="store_true", help="only the MoE comparison")
    p.add_argument("--experts", type=int, default=32, help="routed experts of the MoE block (default 32)")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs of each side (peak RSS of one run varies by up to a third here); the median is compared")
    p.add_argument("--flags", default="", help="more main.py flags for this tree's MoE run, e.g. "
                                               "'--round_optimizer sign'")
    args = p.parse_args()
    if not args.skip_depth:
        depth(args)
    if args.baseline:
        moe_block(args)


def depth(args) -> None:
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


def moe_block(args) -> None:
    text = train_text(200_000)
    print(f"== block-mode peak RSS on one MoE block: deepseek_v3, hidden 768, {args.experts} experts of width 768, "
          f"{args.n_samples} x {args.seq_len} tokens, {args.scheme}, 1 epoch, this tree vs {args.baseline} ==")
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        corpus = work / "train.txt"
        corpus.write_text(text)
        model, size = tiny_bf16_model(
            work / "moe", "deepseek_v3", text[:100_000], hidden_size=768, intermediate_size=1536,
            moe_intermediate_size=768, n_routed_experts=args.experts, num_experts_per_tok=4, n_group=4, topk_group=2,
            num_attention_heads=8, num_key_value_heads=8, q_lora_rank=256, kv_lora_rank=256, qk_nope_head_dim=64,
            qk_rope_head_dim=32, v_head_dim=64, num_hidden_layers=2)
        dump = work / "calib"
        extract_peak_rss(model, corpus, args.n_samples, args.seq_len, dump)
        base = work / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", str(base), args.baseline], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            rss = {"baseline": [], "this tree": []}
            for rep in range(args.repeats):  # interleaved: a slow phase of the machine hits both sides
                for name, tree in (("baseline", base), ("this tree", ROOT)):
                    out = work / f"params_{tree.name}_{rep}"
                    rss[name].append(peak_rss_mib([
                        sys.executable, str(tree / "main.py"), "--model", str(model), "--data_dir", str(dump),
                        "--output_dir", str(out), "--scheme", args.scheme, "--epochs", "1", "--start_block_idx", "1",
                        "--end_block_idx", "2", *(args.flags.split() if tree == ROOT else ())], cwd=tree))
                    print(f"  run {rep + 1}/{args.repeats} {name}: {rss[name][-1]:7.1f} MiB", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, capture_output=True)
    med = {name: statistics.median(values) for name, values in rss.items()}
    print(f"checkpoint {size:7.1f} MiB   main.py --train_mode block, median of {args.repeats}: {args.baseline} "
          f"{med['baseline']:7.1f} MiB   this tree {args.flags} {med['this tree']:7.1f} MiB   "
          f"ratio {med['this tree'] / med['baseline']:.3f} (goal <= 0.6)")


if __name__ == "__main__":
    main()
