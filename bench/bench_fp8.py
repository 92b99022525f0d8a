#!/usr/bin/env python
"""Benchmark ``deploy.py --quant_type fp8``: every calibration mode, with and without activation statistics.

For SmolLM2-135M (``assets/smollm2-135m``), and optionally a random sharded llama (``--models tiny`` / ``both``)
a random Qwen3-Next (``--models qwen3_next`` / ``all``) and a random Qwen3.5 vision-language model
(``--models qwen3_5`` / ``all``: its decoder quantized, the vision tower passed through in BF16),
one row per mode x activation-aware:

1. ppl of the FP8 checkpoint through our loader (``eval_ppl.py``) against the BF16 source, on the same
   windows of the corpus eval split (Δ%).
2. Deploy wall seconds, and the throughput ratio against a plain safetensors read + write of the
   same shards, measured side by side in this run (:func:`bench.bench_deploy.plain_copy_seconds`,
   interleaved, best of ``--repeat``; goal ratio >= 0.5), with every converted weight verified (the
   default) and with ``--verify_samples`` of them (a spot check). An activation-aware deploy includes
   the pass that runs every block on the calibration dump to collect its statistics.
3. Peak RSS of ``deploy.py`` (a subprocess, :func:`bench.common.peak_rss_mib`), less that of the
   imports alone, against the largest input shard.
4. The verification bands (GOOD / WARN / FAIL tensors).

The calibration dump is made here with ``extract_calib_data.py`` unless ``--calib_dir`` gives one.

Usage (OMP_NUM_THREADS=1 measures one core; on a shared machine it also avoids OpenMP spin-waiting
against other jobs):
    python bench/bench_fp8.py [--calib_dir DUMP] [--eval_windows 16] [--seq_len 512] [--repeat 2] \
        [--models smollm2|tiny|qwen3_next|qwen3_5|both|all]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars in the timed deploys (read when tqdm is imported)

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import eval_ppl  # noqa: E402
from bench.bench_deploy import best, plain_copy_seconds, shard_bytes, since, start_clean  # noqa: E402
from bench.common import VOCAB, peak_rss_mib, tiny_bf16_model, train_text  # noqa: E402
from blockptq_assets.tiny import make_tiny_vl_checkpoint, save_tiny_tokenizer  # noqa: E402
from cores.deploy import DeployConfig, deploy  # noqa: E402

CASES = [("max", False), ("rms", False), ("rms", True), ("percentile", False), ("percentile", True),
         ("mse", False), ("mse", True)]
TINY_CASES = [("max", False), ("mse", False), ("mse", True)]
QWEN3_NEXT = dict(  # every linear on the 128-row tile grid but the 64-row k / v (vLLM merges them with q: kept)
    hidden_size=512, num_hidden_layers=4, head_dim=64, num_attention_heads=8, num_key_value_heads=1,
    layer_types=["linear_attention", "linear_attention", "full_attention", "linear_attention"],
    linear_num_value_heads=8, linear_num_key_heads=4, linear_key_head_dim=64, linear_value_head_dim=64,
    num_experts=8, num_experts_per_tok=2, moe_intermediate_size=256, shared_expert_intermediate_size=512,
    decoder_sparse_step=1, mlp_only_layers=[1], intermediate_size=1024, max_shard_size="20MB")
QWEN3_5_TEXT = dict(  # every decoder linear on the 128-row tile grid but DeltaNet's small in_proj_b / in_proj_a
    vocab_size=VOCAB, hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
    num_key_value_heads=2, head_dim=64, max_position_embeddings=1024, initializer_range=0.05,
    layer_types=["linear_attention", "linear_attention", "full_attention", "linear_attention"],
    linear_num_value_heads=8, linear_num_key_heads=4, linear_key_head_dim=64, linear_value_head_dim=64,
    linear_conv_kernel_dim=4, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                               "partial_rotary_factor": 0.25, "mrope_section": [2, 3, 3],
                                               "mrope_interleaved": True})
QWEN3_5_VISION = dict(depth=1, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=512, patch_size=8,
                      spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16)


def tiny_qwen3_5(folder: Path, tokenizer_text: str) -> Path:
    """A random bf16 Qwen3.5 vision-language folder (``Qwen3_5ForConditionalGeneration``) with a tokenizer
    trained on ``tokenizer_text``."""
    make_tiny_vl_checkpoint(folder, "qwen3_5", QWEN3_5_TEXT, QWEN3_5_VISION, dtype=torch.bfloat16)
    save_tiny_tokenizer(folder, tokenizer_text, VOCAB)
    return folder


def ppl(model: Path, corpus: Path, seq_len: int, windows: int, out_json: Path) -> float:
    """``eval_ppl.py`` on ``model`` (our streaming loader; an FP8 folder is dequantized as it is read)."""
    with contextlib.redirect_stdout(io.StringIO()):  # its one-line summary would break the table
        rc = eval_ppl.main(["--model", str(model), "--dataset", str(corpus), "--seq_len", str(seq_len),
                            "--max_windows", str(windows), "--output_json", str(out_json)])
    if rc:
        raise SystemExit(f"eval_ppl.py failed on {model} (exit {rc})")
    return json.loads(out_json.read_text())["ppl"]


def make_dump(model: Path, corpus: Path, out: Path, n_samples: int, seq_len: int) -> Path:
    """A calibration dump of ``model`` (``extract_calib_data.py``, corpus train split)."""
    subprocess.run([sys.executable, "extract_calib_data.py", "--model", str(model), "--output_dir", str(out),
                    "--dataset", str(corpus), "--split", "train", "--n_samples", str(n_samples), "--seq_len",
                    str(seq_len), "--batch_size", "4"], cwd=ROOT, check=True, capture_output=True)
    return out


def fp8_flags(mode: str, calib: Path | None) -> dict:
    return {"fp8_mode": None if mode == "max" else mode, "calib_dir": None if calib is None else str(calib)}


def deploy_seconds(src: Path, out: Path, flags: dict, verify_samples: int | None = None
                   ) -> tuple[tuple[float, float], dict]:
    """Time one fp8 deploy into an empty ``out``: ((wall, CPU) seconds, verification summary)."""
    shutil.rmtree(out, ignore_errors=True)
    start = start_clean()
    result = deploy(DeployConfig(str(src), str(out), "fp8", overwrite=True, verify_samples=verify_samples,
                                 **flags))
    return since(start), result.verify


def bench_model(name: str, src: Path, corpus: Path, calib: Path, cases: list[tuple[str, bool]], work: Path,
                seq_len: int, windows: int, repeat: int, verify_samples: int) -> None:
    size_mb = sum(shard_bytes(src)) / 10**6
    largest = max(shard_bytes(src)) / 2**20
    base = ppl(src, corpus, seq_len, windows, work / "ppl-bf16.json")
    imports = peak_rss_mib([sys.executable, "-c", "import cores.deploy"])
    print(f"\n{name}: {size_mb:.1f} MB bf16 in {len(shard_bytes(src))} shard(s), largest {largest:.1f} MiB; "
          f"ppl bf16 {base:.4f} ({windows} windows x {seq_len} tokens of {corpus.name} test); "
          f"throughput best of {repeat}, wall (CPU) ratio vs plain copy; imports take {imports:.0f} MiB RSS")
    print(f"{'mode':11s} {'act':4s} {'ppl':>9s} {'Δ%':>8s} {'deploy s':>9s} {'plain s':>8s} {'ratio':>12s} "
          f"{f'ratio, {verify_samples} checked':>20s} {'peak RSS MiB':>13s} {'-imports/shard':>15s} "
          f"{'GOOD/WARN/FAIL':>15s}")
    out = work / "out"
    deploy_seconds(src, out, fp8_flags("max", None))  # warm-up: imports, page cache
    for mode, act in cases:
        flags = fp8_flags(mode, calib if act else None)
        plains, deploys, sampled = [], [], []
        for _ in range(repeat):  # interleaved, so that a burst of load elsewhere hits every kind alike
            plains.append(plain_copy_seconds(src, work / "plain"))
            sampled.append(deploy_seconds(src, out, flags, verify_samples)[0])
            seconds, verify = deploy_seconds(src, out, flags)
            deploys.append(seconds)
        plain, dep, spot = best(plains), best(deploys), best(sampled)
        q = ppl(out, corpus, seq_len, windows, work / "ppl-fp8.json")
        cmd = [sys.executable, "deploy.py", "--input_weight_path", str(src), "--output_weight_path", str(out),
               "--quant_type", "fp8", "--overwrite"]
        cmd += [] if mode == "max" else ["--fp8_mode", mode]
        cmd += ["--calib_dir", str(calib)] if act else []
        rss = peak_rss_mib(cmd, exit_codes=(0, 1))  # 1: verification FAILed tensors (the bands column)
        bands = f"{verify['GOOD']}/{verify['WARN']}/{verify['FAIL']}"
        print(f"{mode:11s} {'yes' if act else 'no':4s} {q:9.4f} {100 * (q / base - 1):+8.2f} {dep[0]:9.2f} "
              f"{plain[0]:8.2f} {plain[0] / dep[0]:5.2f} ({plain[1] / dep[1]:4.2f}) "
              f"{plain[0] / spot[0]:13.2f} ({plain[1] / spot[1]:4.2f}) {rss:13.0f} "
              f"{(rss - imports) / largest:15.2f} {bands:>15s}", flush=True)
    shutil.rmtree(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "assets" / "smollm2-135m"), help="BF16 source (SmolLM2-135M)")
    p.add_argument("--corpus", default=str(ROOT / "assets" / "corpus"), help="eval / calibration text")
    p.add_argument("--calib_dir", help="calibration dump of --model (default: made here)")
    p.add_argument("--calib_samples", type=int, default=16, help="windows of the dump made here (default 16)")
    p.add_argument("--calib_seq_len", type=int, default=512, help="tokens per dump window (default 512)")
    p.add_argument("--eval_windows", type=int, default=16, help="ppl windows (default 16)")
    p.add_argument("--seq_len", type=int, default=512, help="ppl window length (default 512)")
    p.add_argument("--repeat", type=int, default=2, help="timed runs of each deploy; the best counts (default 2)")
    p.add_argument("--verify_samples", type=int, default=16,
                   help="converted weights the spot-check column verifies (default 16)")
    p.add_argument("--models", default="smollm2", choices=["smollm2", "tiny", "qwen3_next", "qwen3_5", "both", "all"],
                   help="SmolLM2 (default), a random bf16 llama (hidden 1024, 8 blocks, 4 shards), a random bf16 "
                        "Qwen3-Next (hidden 512, DeltaNet + gated attention + MoE, 4 blocks), a random bf16 Qwen3.5 "
                        "vision-language model (decoder hidden 512, DeltaNet + gated attention, 4 blocks), both "
                        "(SmolLM2 + llama) or all")
    args = p.parse_args()
    logging.basicConfig(level="ERROR")
    logging.getLogger("cores").setLevel(logging.ERROR)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    corpus, src = Path(args.corpus), Path(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.models in ("smollm2", "both", "all"):
            calib = Path(args.calib_dir) if args.calib_dir else make_dump(src, corpus, work / "calib",
                                                                          args.calib_samples, args.calib_seq_len)
            bench_model(src.name, src, corpus, calib, CASES, work, args.seq_len, args.eval_windows, args.repeat,
                        args.verify_samples)
        if args.models in ("tiny", "both", "all"):
            tiny, _ = tiny_bf16_model(work / "tiny", "llama", train_text(400_000), hidden_size=1024,
                                      intermediate_size=2816, num_attention_heads=16, num_key_value_heads=4,
                                      num_hidden_layers=8, max_shard_size="55MB")
            tiny_calib = make_dump(tiny, corpus, work / "tiny-calib", 8, 256)
            bench_model("random llama hidden 1024, 8 blocks", tiny, corpus, tiny_calib, TINY_CASES, work, 256, 8,
                        args.repeat, args.verify_samples)
        if args.models in ("qwen3_next", "all"):
            qnext, _ = tiny_bf16_model(work / "qwen3_next", "qwen3_next", train_text(400_000), **QWEN3_NEXT)
            qnext_calib = make_dump(qnext, corpus, work / "qwen3_next-calib", 8, 256)
            bench_model("random Qwen3-Next hidden 512, 4 blocks (3 DeltaNet, 1 gated attention)", qnext, corpus,
                        qnext_calib, CASES, work, 256, 8, args.repeat, args.verify_samples)
        if args.models in ("qwen3_5", "all"):
            q35 = tiny_qwen3_5(work / "qwen3_5", train_text(400_000))
            q35_calib = make_dump(q35, corpus, work / "qwen3_5-calib", 8, 256)
            bench_model("random Qwen3.5 VL, decoder hidden 512, 4 blocks (3 DeltaNet, 1 gated attention)", q35,
                        corpus, q35_calib, CASES, work, 256, 8, args.repeat, args.verify_samples)


if __name__ == "__main__":
    main()
