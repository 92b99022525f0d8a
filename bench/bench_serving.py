#!/usr/bin/env python
"""vLLM in the loop: our fake-quant, our deployed and vLLM's perplexity of each deployed scheme.

Runs with the project venv and drives everything by subprocess, on SmolLM2-135M
(``assets/``): one calibration dump (``extract_calib_data.py``), then for each row of
``--schemes`` ``main.py`` (``--epochs E``, or ``--rtn``), ``eval_ppl.py --param_dir`` (fake-quant),
``deploy.py``, ``eval_ppl.py --model DEPLOYED``, and ``.venv-vllm/bin/python
scripts/check_serving.py`` on the deployed folder (vLLM's CPU build, ``bash scripts/setup_vllm.sh``),
all on the same eval windows. vLLM runs in float32 first (the dtype of our CPU eval); a checkpoint
whose kernels cannot run float32 (vLLM's CPU W4 kernel is bf16 / fp16 only) is retried in bfloat16,
and the bf16 reference is then served in bfloat16 too. A refusal is printed verbatim in the table.

A row is ``scheme:act[:act_format]``, e.g. ``w8a8c8:static`` or ``w4a8c8:dynamic:fp8``; ``--act_format X``
reaches ``main.py`` only when a row names it (deploy.py takes the scheme from the params), so the
bench runs with and without that option in the pipeline. W4 rows use ``--group_size`` (default 64:
SmolLM2's 576 is not a multiple of 128).

Results land in ``--out`` (default ``outputs/serving``): params, deployed folders, every JSON, and
``bench_serving.json``. Training resumes by itself; ``--reuse`` also skips every eval / deploy / vLLM
step whose output already exists.

Usage:
    python bench/bench_serving.py [--schemes w8a8c8:static,w8a8c8:dynamic,w4a8c8:dynamic,w4a8c8:static]
        [--max_windows 16] [--seq_len 512] [--epochs 1 | --rtn] [--out outputs/serving] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SCHEMES = "w8a8c8:static,w8a8c8:dynamic,w4a8c8:dynamic,w4a8c8:static"
EXIT_REFUSED = 3  # scripts/check_serving.py


@dataclass(frozen=True)
class Row:
    scheme: str
    act: str
    act_format: str | None

    @property
    def tag(self) -> str:
        return "_".join(p for p in (self.scheme, self.act, self.act_format) if p)

    @property
    def label(self) -> str:
        return f"{self.scheme} {self.act}" + (f" act {self.act_format}" if self.act_format else "")


def parse_rows(spec: str) -> list[Row]:
    rows = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        parts = item.split(":")
        if len(parts) not in (2, 3) or parts[1] not in ("static", "dynamic"):
            raise SystemExit(f"bad scheme row '{item}': expected scheme:static|dynamic[:act_format]")
        rows.append(Row(parts[0], parts[1], parts[2] if len(parts) == 3 and parts[2] else None))
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--schemes", default=DEFAULT_SCHEMES, help=f"rows scheme:act[:act_format] (default {DEFAULT_SCHEMES})")
    p.add_argument("--max_windows", type=int, default=16, help="eval windows (default 16)")
    p.add_argument("--seq_len", type=int, default=512, help="eval window length (default 512)")
    p.add_argument("--epochs", type=int, default=1, help="training epochs per block (default 1)")
    p.add_argument("--rtn", action="store_true", help="round-to-nearest params instead of training")
    p.add_argument("--group_size", type=int, default=64, help="W4 group size (default 64)")
    p.add_argument("--n_samples", type=int, default=8, help="calibration windows (default 8)")
    p.add_argument("--calib_seq_len", type=int, default=512, help="calibration window length (default 512)")
    p.add_argument("--model", default=str(ROOT / "assets" / "smollm2-135m"))
    p.add_argument("--dataset", default=str(ROOT / "assets" / "corpus" / "eval.txt"))
    p.add_argument("--train_dataset", default=str(ROOT / "assets" / "corpus" / "train.txt"))
    p.add_argument("--out", default=str(ROOT / "outputs" / "serving"))
    p.add_argument("--vllm_python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    p.add_argument("--reuse", action="store_true", help="skip eval / deploy / vLLM steps whose outputs exist")
    return p.parse_args(argv)


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_dir = self.out / "logs"
        self.log_dir.mkdir(exist_ok=True)
        self.eval_args = ["--dataset", args.dataset, "--seq_len", str(args.seq_len), "--max_windows", str(args.max_windows)]
        self.has_vllm = Path(args.vllm_python).is_file()
        self.timings: dict[str, float] = {}

    def run(self, name: str, cmd: list[str], ok_codes: tuple[int, ...] = (0,)) -> int:
        """Run ``cmd`` in the repo root, its output in ``logs/<name>.log``; raise unless it exits with ``ok_codes``."""
        log = self.log_dir / f"{name}.log"
        print(f"  $ {' '.join(cmd)}", flush=True)
        start = time.perf_counter()
        with log.open("w") as f:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
        self.timings[name] = time.perf_counter() - start
        if rc not in ok_codes:
            tail = log.read_text()[-3000:]
            raise RuntimeError(f"{name} failed (exit {rc}), see {log}:\n{tail}")
        return rc

    def fresh(self, path: Path, *inputs: Path) -> bool:
        """Whether the step producing ``path`` has to run: always without --reuse, else when ``path`` is
        missing or older than a file under ``inputs``."""
        if not (self.args.reuse and path.exists()):
            return True
        newest = max((f.stat().st_mtime for d in inputs for f in (d.rglob("*") if d.is_dir() else [d])
                      if f.is_file()), default=0.0)
        return newest > path.stat().st_mtime

    def eval_ppl(self, name: str, model: str, param_dir: Path | None = None) -> dict:
        out = self.out / f"ppl_{name}.json"
        if self.fresh(out, *(p for p in (param_dir, Path(model) / "config.json") if p is not None)):
            cmd = [sys.executable, "eval_ppl.py", "--model", model, *self.eval_args, "--output_json", str(out)]
            if param_dir is not None:
                cmd += ["--param_dir", str(param_dir)]
            self.run(f"eval_{name}", cmd)
        return json.loads(out.read_text())

    def vllm(self, name: str, model: str, dtypes: tuple[str, ...] = ("float32", "bfloat16")) -> list[dict]:
        """check_serving.py in each dtype until one runs (a refusal at load is final: no other dtype is tried)."""
        results = []
        if not self.has_vllm:
            return [{"refused": f"no vLLM venv at {self.args.vllm_python}: run bash scripts/setup_vllm.sh"}]
        for dtype in dtypes:
            out = self.out / f"vllm_{name}_{dtype}.json"
            if self.fresh(out, Path(model) / "config.json"):
                self.run(f"vllm_{name}_{dtype}", [self.args.vllm_python, "scripts/check_serving.py", "--model", model,
                                                  *self.eval_args, "--dtype", dtype, "--output_json", str(out)],
                         ok_codes=(0, EXIT_REFUSED))
            result = json.loads(out.read_text())
            results.append(result)
            if "refused" not in result or result.get("refused_stage") != "forward":
                break
        return results

    def calib(self) -> Path:
        calib = self.out / "calib"
        if not (calib / "manifest.json").is_file():
            self.run("extract_calib", [sys.executable, "extract_calib_data.py", "--model", self.args.model,
                                       "--dataset", self.args.train_dataset, "--n_samples", str(self.args.n_samples),
                                       "--seq_len", str(self.args.calib_seq_len), "--output_dir", str(calib)])
        return calib

    def scheme_row(self, row: Row, calib: Path) -> dict:
        a = self.args
        params = self.out / f"params_{row.tag}{'_rtn' if a.rtn else ''}"
        deployed = self.out / f"{row.tag}{'_rtn' if a.rtn else ''}_deployed"
        name = f"{row.tag}{'_rtn' if a.rtn else ''}"
        cmd = [sys.executable, "main.py", "--model", a.model, "--data_dir", str(calib), "--output_dir", str(params),
               "--scheme", row.scheme, "--act", row.act]
        if row.scheme.startswith("w4"):
            cmd += ["--group_size", str(a.group_size)]
        if row.act_format:
            cmd += ["--act_format", row.act_format]
        cmd += ["--rtn"] if a.rtn else ["--epochs", str(a.epochs)]
        result: dict = {"row": row.label, "params": str(params), "deployed": str(deployed)}
        try:
            self.run(f"train_{name}", cmd)
            result["fake"] = self.eval_ppl(f"{name}_fake", a.model, params)
            if self.fresh(deployed / "config.json", params):
                self.run(f"deploy_{name}", [sys.executable, "deploy.py", "--input_weight_path", a.model,
                                            "--output_weight_path", str(deployed), "--quant_type", row.scheme,
                                            "--param_dir", str(params), "--overwrite"])
            result["deployed_ppl"] = self.eval_ppl(f"{name}_deployed", str(deployed))
        except RuntimeError as err:
            result["error"] = str(err)
            return result
        result["vllm"] = self.vllm(name, str(deployed))
        return result


def fmt_ppl(r: dict | None) -> str:
    return f"{r['ppl']:.4f}" if r and "ppl" in r else "-"


def rel(a: dict | None, b: dict | None) -> str:
    if not (a and b and "ppl" in a and "ppl" in b):
        return ""
    return f"{(a['ppl'] / b['ppl'] - 1) * 100:+.3f} %"


def print_table(title: str, fake: dict | None, ours: dict | None, vllm_runs: list[dict]) -> None:
    print(f"\n{title}")
    print(f"  {'measure':<34} {'ppl':>10}  {'vs ours deployed':>16}  {'seconds':>8}")
    if fake is not None:
        print(f"  {'ours, fake-quant (--param_dir)':<34} {fmt_ppl(fake):>10}  {rel(fake, ours):>16}")
    if ours is not None:
        print(f"  {'ours, deployed folder' if fake is not None else 'ours (eval_ppl.py)':<34} {fmt_ppl(ours):>10}")
    for v in vllm_runs:
        dtype = v.get("dtype", "?")
        label = f"vLLM {v.get('vllm_version', '')} {dtype}, kv {v.get('kv_cache_dtype_used', v.get('kv_cache_dtype', '?'))}"
        if "refused" in v:
            print(f"  {label:<34} {'REFUSED':>10}  ({v.get('refused_stage', '?')})")
            for line in v["refused"].splitlines():
                print(f"      {line}")
        else:
            print(f"  {label:<34} {fmt_ppl(v):>10}  {rel(v, ours):>16}  {v.get('seconds', 0):>8.1f}")
            for what, n in (v.get("schemes") or {}).items():
                print(f"      {n:4d} x {what}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = parse_rows(args.schemes)
    bench = Bench(args)
    if not bench.has_vllm:
        print(f"warning: no vLLM venv at {args.vllm_python} (bash scripts/setup_vllm.sh); vLLM columns stay empty")
    print(f"bf16 reference {args.model}")
    ref = {"ours": bench.eval_ppl("bf16", args.model)}
    calib = bench.calib()
    results = []
    need_bf16 = False
    for row in rows:
        print(f"{row.label}")
        result = bench.scheme_row(row, calib)
        results.append(result)
        need_bf16 |= any(v.get("dtype") == "bfloat16" and "ppl" in v for v in result.get("vllm", []))
    ref["vllm"] = bench.vllm("bf16", args.model, ("float32",))
    if need_bf16:  # a scheme served in bf16: its reference in bf16 too
        ref["vllm"] += bench.vllm("bf16", args.model, ("bfloat16",))

    windows = f"{args.max_windows} windows of {args.seq_len} tokens of {args.dataset}"
    how = "round-to-nearest" if args.rtn else f"{args.epochs} epoch(s)"
    print(f"\n=== SmolLM2-135M, {windows}; params: {how}, calibration {args.n_samples} x {args.calib_seq_len} tokens")
    print_table("bf16 (source folder)", None, ref["ours"], ref["vllm"])
    for result in results:
        if "error" in result:
            print(f"\n{result['row']}: pipeline failed\n  {result['error']}")
            continue
        print_table(result["row"], result["fake"], result["deployed_ppl"], result["vllm"])
    summary = {"settings": vars(args), "bf16": ref, "rows": results, "timings_s": bench.timings}
    (bench.out / "bench_serving.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nwrote {bench.out / 'bench_serving.json'}; logs in {bench.log_dir}")
    return 0


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
