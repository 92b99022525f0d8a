#!/usr/bin/env python
"""Quality benchmark: BF16, RTN and the ablation of what is learned at every scheme, next to llm-compressor.

Measured in one run on SmolLM2-135M (``ensure_assets``): one calibration dump from the
train split, then for each scheme and activation mode a round-to-nearest and a learned
param dir (block-loss stats and training wall time from their records), fake-quant
perplexity on the eval split (GPTQ/OmniQuant protocol: first ``--max_windows``
windows of ``--eval_seq_len``), and llm-compressor recipes run in their own venv
(``outputs/venv-baseline``, created here) on the same calibration token windows (the
dump's ``tokens.safetensors``) and the same eval windows; ``autoround_*`` baselines run the
``auto-round`` package (``--autoround_iters`` SignRound steps per block) in
``outputs/venv-autoround``, also created here. Every stage is cached under
``--out``: a rerun skips what exists and only re-prints the table. The ablation rows
(``--variants``) add one learned part at a time: clips, rounding, smoothing, the norm loss,
sequential inputs.

Defaults are the issue's budget: 64 calibration windows of 512 tokens, 2 epochs, the first 32
eval windows of 512 tokens; W4 uses groups of 64 (576, the hidden size, is not a multiple of 128).
On a 2-core CPU one learned variant of one scheme takes about 40 minutes there; pass
``--schemes``/``--acts``/``--variants`` to run a part.

Usage:
    python bench/bench_quality.py [--n_samples 64] [--calib_seq_len 512] [--epochs 2] [--lr X] [--lwc_lr X]
        [--eval_seq_len 512] [--max_windows 32] [--schemes w8a8c16,...] [--acts static,dynamic]
        [--variants rtn,clip,...] [--baselines gptq_w8a8,...,autoround_w4a8_g64] [--autoround_iters 200]
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from blockptq_assets.assets import Assets, ensure_assets  # noqa: E402
from cores.calibrator.extract import ExtractConfig, extract_calibration  # noqa: E402
from cores.calibrator.trainer import TrainConfig, run_training  # noqa: E402
from cores.eval.perplexity import PplConfig, evaluate_ppl  # noqa: E402

log = logging.getLogger("bench_quality")
SCHEMES = ("w8a8c16", "w8a8c8", "w4a8c16", "w4a8c8")
BASELINES = {  # recipe -> label; all ignore lm_head, weights symmetric
    "bf16": "transformers bf16 (baseline venv, fp32 forward)",
    "gptq_w8a8": "llm-compressor GPTQ W8A8 (int8 chan, dyn tok)",
    "gptq_w4a8_g64": "llm-compressor GPTQ W4A8 g64 (dyn tok)",
    "gptq_w4a16_g64": "llm-compressor GPTQ W4A16 g64",
    "sq_gptq_w8a8": "llm-compressor SmoothQuant+GPTQ W8A8",
    "gptq_w8a8_static": "llm-compressor GPTQ W8A8 static (per-tensor input)",
    "sq_gptq_w8a8_static": "llm-compressor SmoothQuant+GPTQ W8A8 static",
    "gptq_w8a8_kv8": "llm-compressor GPTQ W8A8 + fp8 KV",
    "sq_gptq_w8a8_kv8": "llm-compressor SmoothQuant+GPTQ W8A8 + fp8 KV",
    "autoround_w4a8_g64": "AutoRound W4A8 g64 (dyn tok)",
    "autoround_w4a16_g64": "AutoRound W4A16 g64",
}
BASELINE_SCRIPT = ROOT / "bench" / "baselines" / "llmcompressor_gptq.py"
AUTOROUND_SCRIPT = ROOT / "bench" / "baselines" / "autoround_w4a8.py"


@dataclass(frozen=True)
class Row:
    """One line of the table; ``better``/``fallbacks`` only for learned rows."""

    label: str
    ppl: float
    seconds: float | None = None
    better: str = ""
    fallbacks: str = ""


def cached_json(path: Path, compute) -> dict:
    """``path``'s JSON, computing and writing it first when absent."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(compute(), indent=2))
        tmp.replace(path)
    return json.loads(path.read_text())


def ensure_baseline_venv(venv: Path, package: str = "llmcompressor", module: str = "llmcompressor") -> Path:
    """Create ``venv`` with CPU torch 2.13.0 and ``package`` unless ``module`` imports already; its python."""
    py = venv / "bin" / "python"
    if py.is_file() and subprocess.run([str(py), "-c", f"import {module}"], capture_output=True).returncode == 0:
        return py
    log.info("creating %s (torch==2.13.0 first, then %s)", venv, package)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pin = ROOT / "bench" / "baselines" / "constraints-torch.txt"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "-c", str(pin), package], check=True)
    return py


def ppl(assets: Assets, args: argparse.Namespace, param_dir: Path | None) -> float:
    cfg = PplConfig(model=str(assets.model_dir), dataset=str(assets.eval_text), split="test",
                    seq_len=args.eval_seq_len, max_windows=args.max_windows,
                    param_dir=None if param_dir is None else str(param_dir))
    name = "bf16" if param_dir is None else param_dir.name
    result = cached_json(args.run_dir / "ppl" / f"{name}_L{args.eval_seq_len}_w{args.max_windows}.json",
                         lambda: asdict(evaluate_ppl(cfg)))
    log.info("%s: ppl %.4f over %d tokens", name, result["ppl"], result["tokens"])
    return result["ppl"]


VARIANTS = {  # name -> (label, TrainConfig overrides): the ablation, each row adds one part to the one before
    "rtn": ("RTN", dict(rtn=True)),
    "clip": ("+clipping (LWC/LAC)", dict(rounding=False, smooth=False, loss="mse")),
    "round": ("+rounding", dict(rounding=True, smooth=False, loss="mse")),
    "smooth": ("+smoothing", dict(rounding=True, smooth=True, loss="mse")),
    "loss": ("+norm loss (default)", dict(rounding=True, smooth=True, loss="norm_mse")),
    "sequential": ("+sequential", dict(rounding=True, smooth=True, loss="norm_mse", sequential=True)),
}


def learned_tag(args: argparse.Namespace) -> str:
    """The param dir suffix of non-default learning settings (none: the names earlier runs cached under)."""
    parts = [f"_{k}{v}" for k, v in (("lr", args.lr), ("lwclr", args.lwc_lr), ("roundlr", args.round_lr)) if v]
    return "".join(parts) + (f"_{args.round_optimizer}" if args.round_optimizer else "")


def scheme_rows(assets: Assets, args: argparse.Namespace, scheme: str, act: str) -> list[Row]:
    """Train (or reuse) one param dir per ablation variant of one scheme and evaluate each.

    ``act`` ``static_zp`` is static activations with a zero point (``--act static --act_zero_point``)."""
    w4 = scheme.startswith("w4")
    tag = f"{scheme}_{act}" + (f"_kv{args.kv_format}" if scheme.endswith("c8") else "")
    rows = []
    for variant in filter(None, args.variants.split(",")):
        name, overrides = VARIANTS[variant]
        cfg = TrainConfig(model=str(assets.model_dir), data_dir=str(args.run_dir / "calib"), output_dir="",
                          scheme=scheme, act=act.removesuffix("_zp"), act_zero_point=act.endswith("_zp"),
                          kv_format=args.kv_format,
                          group_size=args.group_size if w4 else None, epochs=args.epochs, lr=args.lr,
                          lwc_lr=args.lwc_lr, round_lr=args.round_lr, round_optimizer=args.round_optimizer,
                          **overrides)
        out = args.run_dir / (f"{tag}_rtn" if cfg.rtn else f"{tag}_{variant}_e{args.epochs}{learned_tag(args)}")
        cfg = replace(cfg, output_dir=str(out))
        records = run_training(cfg).records()
        seconds = sum(r["seconds"] for r in records)
        label = f"{scheme} {act} {name}"
        if cfg.rtn:
            rows.append(Row(label, ppl(assets, args, out), seconds))
            continue
        better = sum(r["loss_learned"] < r["loss_rtn"] for r in records)
        fallbacks = sum(r["fallback_to_rtn"] for r in records)
        rows.append(Row(label, ppl(assets, args, out), seconds, f"{better}/{len(records)}",
                        f"{fallbacks}/{len(records)}"))
    return rows


def run_baseline(cmd: list[str], recipe: str, model: Path, tokens: Path, eval_text: Path, args: argparse.Namespace,
                 out: Path, *extra: str, **run_kw) -> None:
    """Run a peer script (``cmd``: its venv's python and the script) on ``model``, calibrated on the dump's
    ``tokens`` and evaluated on the windows of ``args`` (``eval_seq_len``, ``max_windows``, ``threads``);
    it writes ``out``."""
    subprocess.run([*cmd, "--recipe", recipe, "--model", str(model), "--tokens", str(tokens), "--eval_text",
                    str(eval_text), "--seq_len", str(args.eval_seq_len), "--max_windows", str(args.max_windows),
                    "--threads", str(args.threads), *extra, "--output_json", str(out)], check=True, **run_kw)


def baseline_row(assets: Assets, args: argparse.Namespace, recipe: str) -> Row:
    """Run one peer recipe in its own venv (cached) on our calibration tokens and eval windows.

    ``autoround_*`` recipes run ``auto-round`` (``--autoround_iters`` SignRound steps per block)
    in ``--autoround_venv``; the rest run llm-compressor in ``--venv``.
    """
    autoround = recipe.startswith("autoround_")
    suffix = f"_i{args.autoround_iters}" if autoround else ""
    out = args.run_dir / "baselines" / f"{recipe}{suffix}_L{args.eval_seq_len}_w{args.max_windows}.json"
    if not out.is_file():
        if autoround:
            py = ensure_baseline_venv(args.autoround_venv, "auto-round", "auto_round")
            script = [str(AUTOROUND_SCRIPT), "--iters", str(args.autoround_iters), "--group_size",
                      str(args.group_size)]
        else:
            py = ensure_baseline_venv(args.venv)
            script = [str(BASELINE_SCRIPT)]
        log.info("%s: running in %s", recipe, py)
        run_baseline([str(py), *script], recipe, assets.model_dir, args.run_dir / "calib" / "tokens.safetensors",
                     assets.eval_text, args, out)
    result = json.loads(out.read_text())
    log.info("%s: ppl %.4f, versions %s", recipe, result["ppl"], result["versions"])
    label = BASELINES[recipe] + (f", {args.autoround_iters} iters" if autoround else "")
    return Row(label, result["ppl"], result["quant_seconds"] if recipe != "bf16" else None)


def table(rows: list[Row], bf16: float, args: argparse.Namespace) -> str:
    head = (f"SmolLM2-135M, eval {args.max_windows} x {args.eval_seq_len} tokens of the eval split; calibration "
            f"{args.n_samples} x {args.calib_seq_len} tokens of the train split; learned: {args.epochs} epochs, "
            f"LAC lr {args.lr or '1e-2 static, 2e-3 dynamic'}, LWC lr {args.lwc_lr or '2e-3 at W8, 1e-2 at W4'}; "
            f"W4 group {args.group_size}; "
            f"C8 {args.kv_format}; rounding offsets {args.round_optimizer or 'default update'}, lr "
            f"{args.round_lr or 'default'}\n")
    lines = [f"{'model':<48} {'ppl':>9} {'vs bf16':>9} {'blk learned<rtn':>16} {'fallbacks':>10} {'wall s':>8}"]
    for r in rows:
        secs = "" if r.seconds is None else f"{r.seconds:.1f}"
        lines.append(f"{r.label:<48} {r.ppl:9.4f} {(r.ppl / bf16 - 1) * 100:+8.2f}% {r.better:>16} "
                     f"{r.fallbacks:>10} {secs:>8}")
    foot = ("wall s: sum of per-block training time (ours, from the block records) or oneshot time "
            "(llm-compressor), model load and eval excluded")
    return head + "\n".join(lines) + "\n" + foot


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n_samples", type=int, default=64, help="calibration windows")
    p.add_argument("--calib_seq_len", type=int, default=512, help="tokens per calibration window")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, help="activation / KV clip learning rate (default: the trainer's, by act)")
    p.add_argument("--lwc_lr", type=float, help="weight clip learning rate (default: the trainer's, by bits)")
    p.add_argument("--round_lr", type=float, help="rounding offset learning rate (default: the trainer's)")
    p.add_argument("--round_optimizer", choices=("adam", "sign"),
                   help="rounding offset update (default: the trainer's, by weight bits)")
    p.add_argument("--eval_seq_len", type=int, default=512)
    p.add_argument("--max_windows", type=int, default=32, help="eval windows (the first N)")
    p.add_argument("--group_size", type=int, default=64, help="W4 group size")
    p.add_argument("--kv_format", choices=("fp8", "int8"), default="fp8")
    p.add_argument("--schemes", default=",".join(SCHEMES))
    p.add_argument("--acts", default="static,dynamic", help="static, static_zp (with a zero point), dynamic")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"ablation rows, subset of {','.join(VARIANTS)}")
    p.add_argument("--baselines", default=",".join(BASELINES), help=f"subset of {','.join(BASELINES)}, or ''")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_quality")
    p.add_argument("--venv", type=Path, default=ROOT / "outputs" / "venv-baseline", help="llm-compressor venv")
    p.add_argument("--autoround_venv", type=Path, default=ROOT / "outputs" / "venv-autoround", help="auto-round venv")
    p.add_argument("--autoround_iters", type=int, default=200, help="SignRound steps per block (auto-round's default)")
    args = p.parse_args()
    unknown = set(filter(None, args.baselines.split(","))) - set(BASELINES)
    if unknown:
        p.error(f"unknown baselines {sorted(unknown)}; choose from {','.join(BASELINES)}")
    unknown = set(filter(None, args.variants.split(","))) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {','.join(VARIANTS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    args.run_dir = args.out / f"n{args.n_samples}_s{args.calib_seq_len}"
    assets = ensure_assets()
    start = time.perf_counter()

    extract_calibration(ExtractConfig(model=str(assets.model_dir), output_dir=str(args.run_dir / "calib"),
                                      dataset=str(assets.train_text), split="train", n_samples=args.n_samples,
                                      seq_len=args.calib_seq_len, seed=0))
    bf16 = ppl(assets, args, None)
    rows = [Row("bf16", bf16)]
    for scheme in filter(None, args.schemes.split(",")):
        for act in filter(None, args.acts.split(",")):
            rows += scheme_rows(assets, args, scheme, act)
    recipes = list(filter(None, args.baselines.split(",")))
    rows += [baseline_row(assets, args, recipe) for recipe in recipes]
    log.info("bench done in %.1f s", time.perf_counter() - start)
    print(table(rows, bf16, args))


if __name__ == "__main__":
    main()
