#!/usr/bin/env python
"""Per-block training time and peak RSS: our block trainer against AutoRound, same blocks, same tokens.

Both tools quantize the first ``--blocks`` blocks of SmolLM2-135M (a truncated copy of the asset,
so AutoRound, which always runs the whole model, has only those blocks to do) at W4A8 g64 with
dynamic per-token inputs, calibrated on the same ``--n_samples x --seq_len`` token windows (our
dump's ``tokens.safetensors``), one torch thread each. Ours: ``main.py`` with its defaults (clips,
rounding, smoothing, norm loss) for ``--epochs``; seconds per block from the block records.
AutoRound: ``auto-round`` in its own venv (as for ``bench_quality.py``), ``--iters`` SignRound
steps of ``--batch_size`` windows per block; seconds per block = its quantize time / blocks (the
input caching included). Peak RSS is each process's high-water mark, measured from outside.

Usage:
    python bench/bench_vs_autoround.py [--blocks 2] [--n_samples 64] [--seq_len 512] [--epochs 2] [--iters 200]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from safetensors.torch import load_file, save_file  # noqa: E402

from bench.bench_quality import AUTOROUND_SCRIPT, ensure_baseline_venv  # noqa: E402
from bench.common import extract_peak_rss, peak_rss_mib  # noqa: E402
from blockptq_assets.assets import ensure_assets  # noqa: E402
from cores.calibrator.params import ParamDir  # noqa: E402


def truncated_model(src: Path, out: Path, blocks: int) -> Path:
    """``src`` with only its first ``blocks`` decoder blocks (config and weights), built once."""
    if (out / "config.json").is_file():
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy2(f, tmp / f.name)
    config = json.loads((src / "config.json").read_text())
    config["num_hidden_layers"] = blocks
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    weights = {}
    for shard in sorted(src.glob("*.safetensors")):
        for name, t in load_file(shard).items():
            if not name.startswith("model.layers.") or int(name.split(".")[2]) < blocks:
                weights[name] = t
    save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
    tmp.rename(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--n_samples", type=int, default=64)
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--epochs", type=int, default=2, help="our epochs (bench_quality.py's budget)")
    p.add_argument("--iters", type=int, default=200, help="AutoRound SignRound steps per block (its default)")
    p.add_argument("--batch_size", type=int, default=8, help="AutoRound windows per step (its default)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_vs_autoround")
    p.add_argument("--autoround_venv", type=Path, default=ROOT / "outputs" / "venv-autoround")
    args = p.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the children's torch threads
    assets = ensure_assets()
    run = args.out / f"b{args.blocks}_n{args.n_samples}_s{args.seq_len}"
    model = truncated_model(assets.model_dir, run / "model", args.blocks)
    dump, params = run / "dump", run / f"ours_e{args.epochs}"
    py = sys.executable
    if not (dump / "manifest.json").is_file():
        extract_peak_rss(model, assets.train_text, args.n_samples, args.seq_len, dump)
    shutil.rmtree(params, ignore_errors=True)
    ours_rss = peak_rss_mib([py, "main.py", "--model", str(model), "--data_dir", str(dump), "--output_dir",
                             str(params), "--scheme", "w4a8c16", "--act", "dynamic", "--group_size", "64",
                             "--epochs", str(args.epochs)])
    records = ParamDir(params).records()
    ours_s = sum(r["seconds"] for r in records) / len(records)

    ar_py = ensure_baseline_venv(args.autoround_venv, "auto-round", "auto_round")
    result_json = run / f"autoround_i{args.iters}.json"
    ar_rss = peak_rss_mib([str(ar_py), str(AUTOROUND_SCRIPT), "--recipe", "autoround_w4a8_g64", "--model", str(model),
                           "--tokens", str(dump / "tokens.safetensors"), "--eval_text", str(assets.eval_text),
                           "--seq_len", str(args.seq_len), "--max_windows", "1", "--threads", str(args.threads),
                           "--iters", str(args.iters), "--batch_size", str(args.batch_size), "--group_size", "64",
                           "--output_json", str(result_json)])
    ar_s = json.loads(result_json.read_text())["quant_seconds"] / args.blocks
    print(f"SmolLM2-135M, first {args.blocks} blocks, W4A8 g64 dynamic, calibration {args.n_samples} x {args.seq_len} "
          f"tokens, {args.threads} torch thread(s)")
    ours = f"ours: {args.epochs} epochs (clips + rounding + smoothing + norm loss)"
    for label, secs, rss in ((ours, ours_s, ours_rss),
                             (f"AutoRound: {args.iters} iters x {args.batch_size} windows", ar_s, ar_rss)):
        print(f"{label:<62} {secs:8.1f} s/block   peak RSS {rss:7.1f} MiB")
    print(f"ratio ours / AutoRound: time {ours_s / ar_s:.3f}   peak RSS {ours_rss / ar_rss:.3f}")


if __name__ == "__main__":
    main()
