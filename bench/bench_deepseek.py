#!/usr/bin/env python
"""Quality of the seed's MLA + MoE flow on the trained tiny DeepSeek-V3 (FP8 source).

One dump of the train split, then per scheme (``w8a8c8``, ``w4a8c8``; static activations)
an RTN and a learned param dir, each made by ``--train_mode mla --cls c8`` and
``--train_mode moe --cls bf16`` jobs into one dir; fake-quant ppl of both, ppl of the
deployed learned checkpoint, its size against the FP8 and bf16 sources, and how many
calibration tokens each routed expert saw (and how many kept RTN for having too few).

Usage:
    python bench/bench_deepseek.py [--n_samples 16] [--seq_len 256] [--epochs 4] [--max_windows 8]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import deploy as deploy_cli  # noqa: E402
import eval_ppl  # noqa: E402
import extract_calib_data  # noqa: E402
import main as main_cli  # noqa: E402
from blockptq_assets.assets import ensure_assets  # noqa: E402
from blockptq_assets.tiny_trained import ensure_tiny_deepseek  # noqa: E402
from cores.calibrator.params import ParamDir  # noqa: E402


def _mib(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n_samples", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--eval_seq_len", type=int, default=512)
    p.add_argument("--max_windows", type=int, default=8)
    args = p.parse_args()
    logging.disable(logging.INFO)
    assets = ensure_assets()
    tiny = ensure_tiny_deepseek(assets.model_dir.parent)
    evals = ["--dataset", str(assets.eval_text), "--seq_len", str(args.eval_seq_len), "--max_windows",
             str(args.max_windows)]
    rows = []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)

        def ppl(model: Path, *params: str) -> float:
            out = work / "ppl.json"
            assert eval_ppl.main(["--model", str(model), *evals, "--output_json", str(out), *params]) == 0
            return json.loads(out.read_text())["ppl"]

        dump = work / "dump"
        assert extract_calib_data.main(["--model", str(tiny.fp8_dir), "--dataset", str(assets.train_text),
                                        "--n_samples", str(args.n_samples), "--seq_len", str(args.seq_len),
                                        "--output_dir", str(dump)]) == 0
        rows.append(("FP8 source", ppl(tiny.fp8_dir), ""))
        for w_bits in (8, 4):
            scheme = f"w{w_bits}a8c8"
            for rtn in (True, False):
                out = work / f"{scheme}_{'rtn' if rtn else 'learned'}"
                for mode, cls in (("mla", "c8"), ("moe", "bf16")):
                    assert main_cli.main(["--model", str(tiny.fp8_dir), "--data_dir", str(dump), "--output_dir",
                                          str(out), "--w_bits", str(w_bits), "--act", "static", "--epochs",
                                          str(args.epochs), "--train_mode", mode, "--cls", cls]
                                         + (["--rtn"] if rtn else [])) == 0
                rows.append((f"{scheme} static {'RTN' if rtn else 'learned'}", ppl(tiny.fp8_dir, "--param_dir",
                                                                                  str(out)), ""))
            deployed = work / f"{scheme}_deployed"
            assert deploy_cli.main(["--input_weight_path", str(tiny.fp8_dir), "--output_weight_path",
                                    str(deployed), "--quant_type", scheme, "--param_dir", str(out)]) == 0
            rows.append((f"{scheme} learned, deployed", ppl(deployed), f"{_mib(deployed):.1f} MiB"))
            records = ParamDir(out).records("moe")
            moe = [r for r in records if r["expert_tokens"]]
            counts = [c for r in moe for c in r["expert_tokens"]]
            fallbacks = sum(len(r["rtn_experts"]) for r in moe)
            better = sum(r["loss_learned"] < r["loss_rtn"] for r in ParamDir(out).records())
            rows.append((f"  {scheme}: {len(counts)} routed experts, tokens min {min(counts)} / median "
                         f"{sorted(counts)[len(counts) // 2]} / max {max(counts)}, {fallbacks} kept RTN; "
                         f"learned < RTN in {better}/{len(ParamDir(out).records())} sub-blocks", None, ""))
    print(f"tiny DeepSeek-V3 ({tiny.record['settings']['n_routed_experts']} experts, "
          f"{tiny.record['settings']['num_hidden_layers']} blocks), FP8 {_mib(tiny.fp8_dir):.1f} MiB, bf16 "
          f"{_mib(tiny.model_dir):.1f} MiB; calibration {args.n_samples} x {args.seq_len}, {args.epochs} epochs; "
          f"eval {args.max_windows} x {args.eval_seq_len} tokens of the eval split")
    for label, value, extra in rows:
        print(label if value is None else f"{label:<34} ppl {value:9.4f}  {extra}")


if __name__ == "__main__":
    main()
