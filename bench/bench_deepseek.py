#!/usr/bin/env python
"""Quality of the seed's MLA + MoE flow on the trained tiny DeepSeek-V3 (FP8 source), against llm-compressor GPTQ.

One dump of the train split, then per scheme (``w8a8c8``, ``w4a8c8``) and activation mode
(``dynamic``, the default, and ``static``) an RTN and a learned param dir (the trainer's defaults:
clips + rounding, norm loss), each made by ``--train_mode mla --cls c8`` and ``--train_mode moe
--cls bf16`` jobs into one dir; fake-quant ppl of both, ppl of the deployed learned checkpoint, its
size against the FP8 and bf16 sources, and how many calibration tokens each routed expert saw (and
how many kept RTN for having too few).

Peers: llm-compressor GPTQ (``--baselines``, in its own venv as for ``bench_quality.py``) on the
BF16 dequantization of the same FP8 source (``deploy.py --quant_type bfloat16``), calibrated on the
dump's token windows and evaluated on the same windows by a plain ``transformers`` forward, with the
fused experts linearized by llm-compressor (one ``Linear`` per expert projection, all quantized)
and ``kv_b_proj`` left in BF16, as ours. Their KV cache stays 16-bit: llm-compressor's KV scheme
acts on the per-head keys and values that ``transformers`` decompresses from the latent, which an
MLA engine does not cache, so there is no like-for-like C8 peer. The ``bf16`` row checks that the
two evaluators agree. Every stage is cached under ``--out``; delete a folder to redo it.

Usage:
    python bench/bench_deepseek.py [--n_samples 16] [--seq_len 256] [--epochs 4] [--max_windows 32]
        [--schemes w8a8c8,w4a8c8] [--acts dynamic,static] [--baselines bf16,gptq_w8a8,gptq_w4a8_g128]
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import deploy as deploy_cli  # noqa: E402
import eval_ppl  # noqa: E402
import extract_calib_data  # noqa: E402
import main as main_cli  # noqa: E402
from bench.bench_quality import BASELINE_SCRIPT, BASELINES, ensure_baseline_venv, run_baseline  # noqa: E402
from blockptq_assets.assets import ensure_assets  # noqa: E402
from blockptq_assets.tiny_trained import ensure_tiny_deepseek  # noqa: E402
from cores.calibrator.params import ParamDir  # noqa: E402

PEERS = ("bf16", "gptq_w8a8", "gptq_w4a8_g128", "gptq_w8a8_static")
PEER_LABELS = {**BASELINES, "gptq_w4a8_g128": "llm-compressor GPTQ W4A8 g128 (dyn tok)"}
PEER_IGNORE = "lm_head,re:.*kv_b_proj$"


def _mib(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n_samples", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--eval_seq_len", type=int, default=512)
    p.add_argument("--max_windows", type=int, default=32)
    p.add_argument("--schemes", default="w8a8c8,w4a8c8")
    p.add_argument("--acts", default="dynamic,static")
    p.add_argument("--baselines", default="bf16,gptq_w8a8,gptq_w4a8_g128", help=f"subset of {','.join(PEERS)}, or ''")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the peers' runs")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_deepseek")
    p.add_argument("--venv", type=Path, default=ROOT / "outputs" / "venv-baseline", help="llm-compressor venv")
    args = p.parse_args()
    unknown = set(filter(None, args.baselines.split(","))) - set(PEERS)
    if unknown:
        p.error(f"unknown baselines {sorted(unknown)}; choose from {','.join(PEERS)}")
    logging.disable(logging.INFO)
    assets = ensure_assets()
    tiny = ensure_tiny_deepseek(assets.model_dir.parent)
    run = args.out / f"n{args.n_samples}_s{args.seq_len}"
    evals = ["--dataset", str(assets.eval_text), "--seq_len", str(args.eval_seq_len), "--max_windows",
             str(args.max_windows)]
    rows = []

    def ppl(name: str, model: Path, *params: str) -> float:
        out = run / "ppl" / f"{name}_L{args.eval_seq_len}_w{args.max_windows}.json"
        if not out.is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            assert eval_ppl.main(["--model", str(model), *evals, "--output_json", str(out), *params]) == 0
        return json.loads(out.read_text())["ppl"]

    dump = run / "dump"
    assert extract_calib_data.main(["--model", str(tiny.fp8_dir), "--dataset", str(assets.train_text),
                                    "--n_samples", str(args.n_samples), "--seq_len", str(args.seq_len),
                                    "--output_dir", str(dump)]) == 0
    rows.append(("FP8 source", ppl("fp8_source", tiny.fp8_dir), ""))
    for scheme in filter(None, args.schemes.split(",")):
        w_bits = scheme[1]
        for act in filter(None, args.acts.split(",")):
            for rtn in (True, False):
                out = run / f"{scheme}_{act}_{'rtn' if rtn else f'learned_e{args.epochs}'}"
                start = time.perf_counter()
                if not (out / "done").is_file():
                    for mode, cls in (("mla", "c8"), ("moe", "bf16")):
                        assert main_cli.main(["--model", str(tiny.fp8_dir), "--data_dir", str(dump), "--output_dir",
                                              str(out), "--w_bits", w_bits, "--act", act, "--epochs",
                                              str(args.epochs), "--train_mode", mode, "--cls", cls]
                                             + (["--rtn"] if rtn else [])) == 0
                    (out / "done").write_text(f"{time.perf_counter() - start:.1f}\n")
                secs = float((out / "done").read_text())
                rows.append((f"{scheme} {act} {'RTN' if rtn else 'learned'}", ppl(out.name, tiny.fp8_dir,
                                                                                  "--param_dir", str(out)),
                             f"{secs:.0f} s"))
            deployed = run / f"{scheme}_{act}_deployed"
            if not (deployed / "config.json").is_file():
                assert deploy_cli.main(["--input_weight_path", str(tiny.fp8_dir), "--output_weight_path",
                                        str(deployed), "--quant_type", scheme, "--param_dir", str(out),
                                        "--overwrite"]) == 0
            rows.append((f"{scheme} {act} learned, deployed", ppl(deployed.name, deployed),
                         f"{_mib(deployed):.1f} MiB"))
            params = ParamDir(out)
            records = params.records()
            moe = [r for r in params.records("moe") if r["expert_tokens"]]
            counts = [c for r in moe for c in r["expert_tokens"]]
            fallbacks = sum(len(r["rtn_experts"]) for r in moe)
            better = sum(r["loss_learned"] < r["loss_rtn"] for r in records)
            rows.append((f"  {len(counts)} routed experts, tokens min {min(counts)} / median "
                         f"{sorted(counts)[len(counts) // 2]} / max {max(counts)}, {fallbacks} kept RTN; "
                         f"learned < RTN in {better}/{len(records)} sub-blocks", None, ""))
    recipes = list(filter(None, args.baselines.split(",")))
    if recipes:
        bf16 = run / "bf16_dequant"
        if not (bf16 / "config.json").is_file():
            assert deploy_cli.main(["--input_weight_path", str(tiny.fp8_dir), "--output_weight_path", str(bf16),
                                    "--quant_type", "bfloat16", "--overwrite"]) == 0
        py = ensure_baseline_venv(args.venv)
        for recipe in recipes:
            out = run / "baselines" / f"{recipe}_L{args.eval_seq_len}_w{args.max_windows}.json"
            if not out.is_file():
                run_baseline([str(py), str(BASELINE_SCRIPT)], recipe, bf16, dump / "tokens.safetensors",
                             assets.eval_text, args, out, "--ignore", PEER_IGNORE, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
            result = json.loads(out.read_text())
            rows.append((PEER_LABELS[recipe], result["ppl"],
                         "" if recipe == "bf16" else f"{result['quant_seconds']:.0f} s"))
    source = rows[0][1]
    print(f"tiny DeepSeek-V3 ({tiny.record['settings']['n_routed_experts']} experts, "
          f"{tiny.record['settings']['num_hidden_layers']} blocks), FP8 {_mib(tiny.fp8_dir):.1f} MiB, bf16 "
          f"{_mib(tiny.model_dir):.1f} MiB; calibration {args.n_samples} x {args.seq_len}, {args.epochs} epochs; "
          f"eval {args.max_windows} x {args.eval_seq_len} tokens of the eval split; C8: fp8 MLA latent cache "
          f"(ours only)")
    for label, value, extra in rows:
        print(label if value is None else f"{label:<44} ppl {value:9.4f} {(value / source - 1) * 100:+7.2f}%  {extra}")


if __name__ == "__main__":
    main()
