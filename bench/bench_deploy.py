#!/usr/bin/env python
"""Benchmark deploy.py on a sharded random model, every number measured side by side in one run.

1. Throughput (MB/s of input safetensors) of each deploy against a plain
   safetensors read + write of the same shards (goal ratio >= 0.5).
2. Peak RSS of ``deploy.py`` (a subprocess, ``os.wait4``) against the largest
   input and output shard: streaming keeps it near one shard plus one block,
   whatever the depth. The subprocess is started from a small probe process:
   Linux carries the high-water RSS of the parent's address space into a
   child's ``ru_maxrss`` at exec, so a child of this (large) process would
   report at least this process's peak.

Quantized deploys run round-to-nearest (no param dir): the same export path as
with learned params, minus reading the small param files. ``bfloat16`` runs on
an FP8 (DeepSeek layout) copy of the model.

The plain copy runs on one thread. A deploy computes on torch's threads (``OMP_NUM_THREADS``)
and, on one torch thread, writes its shards on a thread of its own: CPU time counts every
thread, so with a free core a deploy's wall time falls below its CPU time, and on a
machine busy with other jobs its threads compete for the cores.

Each measurement is repeated (``--repeat``, interleaved) and the fastest run counts,
so a burst of load from other jobs does not decide the ratio. Each run starts after
``os.sync()``, so no run pays for writing back the dirty pages of the one before. A
deploy is timed into an empty folder: deleting a previous output is no part of either side.

Usage (OMP_NUM_THREADS=1 measures one core; on a shared machine it also avoids OpenMP spin-waiting
against other jobs):
    python bench/bench_deploy.py [--hidden 1024] [--layers 8] [--shards 4] [--verify_samples 8] [--repeat 3]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars in the timed deploys (read when tqdm is imported)

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import peak_rss_mib  # noqa: E402
from blockptq_assets.tiny import fp8_twins, make_tiny_checkpoint  # noqa: E402
from cores.deploy import DeployConfig, deploy  # noqa: E402

MB = 10**6


def shard_bytes(folder: Path) -> list[int]:
    return [p.stat().st_size for p in sorted(folder.glob("*.safetensors"))]


def clocks() -> tuple[float, float]:
    """(wall, CPU) seconds; CPU time counts every thread of this process and is blind to other jobs' load."""
    return time.perf_counter(), time.process_time()


def start_clean() -> tuple[float, float]:
    """Flush the dirty pages of earlier runs to disk, then start the clocks: otherwise the kernel throttles
    whichever run pushes the page cache over its dirty limit, whoever wrote the data."""
    os.sync()
    return clocks()


def since(start: tuple[float, float]) -> tuple[float, float]:
    now = clocks()
    return now[0] - start[0], now[1] - start[1]


def plain_copy_seconds(src: Path, dst: Path) -> tuple[float, float]:
    """Read every shard with safetensors and write it back unchanged; the I/O floor of any conversion."""
    dst.mkdir()
    start = start_clean()
    for shard in sorted(src.glob("*.safetensors")):
        save_file(load_file(shard), str(dst / shard.name), metadata={"format": "pt"})
    seconds = since(start)
    shutil.rmtree(dst)
    return seconds


def deploy_seconds(src: Path, out: Path, quant_type: str, max_shard: str,
                   verify_samples: int | None) -> tuple[float, float]:
    """Time one deploy into an empty ``out`` (removing the previous output is not the deploy's work, and
    the plain copy does not pay for it either)."""
    shutil.rmtree(out, ignore_errors=True)
    start = start_clean()
    deploy(DeployConfig(str(src), str(out), quant_type, max_shard_size=max_shard, verify_samples=verify_samples,
                        overwrite=True))
    return since(start)


def best(runs: list[tuple[float, float]]) -> tuple[float, float]:
    """The least wall and the least CPU time of several runs: the run least disturbed by other jobs."""
    return min(r[0] for r in runs), min(r[1] for r in runs)


def bench_one(src: Path, quant_type: str, work: Path, max_shard: str, verify_samples: int, repeat: int) -> None:
    size = sum(shard_bytes(src)) / MB
    out = work / f"out-{quant_type}"
    deploy_seconds(src, out, quant_type, max_shard, 1)  # warm-up: imports, page cache
    runs: dict[str, list[tuple[float, float]]] = {"plain": [], "full": [], "sampled": []}
    for _ in range(repeat):  # interleaved, so that a burst of load elsewhere hits every kind alike
        runs["plain"].append(plain_copy_seconds(src, work / "plain"))
        runs["full"].append(deploy_seconds(src, out, quant_type, max_shard, None))
        runs["sampled"].append(deploy_seconds(src, out, quant_type, max_shard, verify_samples))
    plain, full, sampled = (best(r) for r in runs.values())
    print(f"{quant_type:9s} input {size:.1f} MB, goal ratio >= 0.5; wall / CPU time, best of {repeat}:")
    print(f"{'':9s} plain read+write          {size / plain[0]:7.1f} / {size / plain[1]:7.1f} MB/s")
    for label, (wall, cpu) in (("deploy, verify all", full), (f"deploy, verify {verify_samples}", sampled)):
        print(f"{'':9s} {label:25s} {size / wall:7.1f} / {size / cpu:7.1f} MB/s   ratio {plain[0] / wall:.2f} / "
              f"{plain[1] / cpu:.2f}")
    cmd = [sys.executable, "deploy.py", "--input_weight_path", str(src), "--output_weight_path", str(out),
           "--quant_type", quant_type, "--max_shard_size", max_shard, "--overwrite"]
    rss, imports = peak_rss_mib(cmd), peak_rss_mib([sys.executable, "-c", "import cores.deploy"])
    largest_in, largest_out = max(shard_bytes(src)) / 2**20, max(shard_bytes(out)) / 2**20
    print(f"{'':9s} peak RSS deploy.py {rss:6.1f} MiB, of which imports {imports:.1f} MiB | largest shard in "
          f"{largest_in:.1f} MiB, out {largest_out:.1f} MiB | (peak - imports) / largest input shard "
          f"{(rss - imports) / largest_in:.2f}")
    shutil.rmtree(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=1024, help="hidden size (default 1024)")
    p.add_argument("--layers", type=int, default=8, help="decoder blocks (default 8)")
    p.add_argument("--shards", type=int, default=4, help="input shards (default 4)")
    p.add_argument("--verify_samples", type=int, default=8,
                   help="second measurement: verify N tensors instead of all (default 8)")
    p.add_argument("--repeat", type=int, default=3, help="runs of each measurement; the best counts (default 3)")
    args = p.parse_args()
    logging.basicConfig(level="WARNING")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        h, inter, vocab = args.hidden, args.hidden * 11 // 4, 32000
        params = 2 * vocab * h + args.layers * (2.5 * h * h + 3 * h * inter)  # embed, lm_head; q/o + k/v (GQA 4), mlp
        shard = f"{int(2 * params * 1.1 / args.shards / MB) + 1}MB"
        src = make_tiny_checkpoint(work / "bf16", "llama", dtype=torch.bfloat16, hidden_size=h, intermediate_size=inter,
                                   num_attention_heads=h // 64, num_key_value_heads=h // 256,
                                   num_hidden_layers=args.layers, vocab_size=vocab, max_shard_size=shard)
        print(f"model: llama hidden {h}, {args.layers} blocks, {len(shard_bytes(src))} bf16 shards of <= {shard}")
        for quant_type in ("w8a8c16", "w4a8c16"):
            bench_one(src, quant_type, work, shard, args.verify_samples, args.repeat)
        fp8, _ = fp8_twins(src, work / "fp8", work / "fp8-bf16-twin")
        shutil.rmtree(work / "fp8-bf16-twin")
        bench_one(fp8, "bfloat16", work, shard, args.verify_samples, args.repeat)


if __name__ == "__main__":
    main()
