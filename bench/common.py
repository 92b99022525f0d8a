"""Helpers shared by the benchmarks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from blockptq_assets.tiny import make_tiny_checkpoint, save_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TEXT_SOURCE = ROOT / "assets" / "corpus" / "train.txt"
VOCAB = 4096

# Linux carries the high-water RSS of the parent's address space into a child's
# ru_maxrss at exec, so a child of a large benchmark process would report at least
# the benchmark's own peak. A small probe process starts the command instead.
RSS_PROBE = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[2:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
_, status, usage = os.wait4(proc.pid, 0)
if str(os.waitstatus_to_exitcode(status)) not in sys.argv[1].split(","):
    sys.exit(proc.stderr.read().decode()[-2000:])
print(usage.ru_maxrss)
"""


def peak_rss_mib(cmd: list[str], cwd: Path = ROOT, exit_codes: tuple[int, ...] = (0,)) -> float:
    """Peak resident set size (MiB) of ``cmd`` run in ``cwd`` (the repo root), from ``wait4`` in a probe process.

    Args:
        exit_codes: The exit codes that count as a run (``deploy.py`` exits 1 when verification FAILs tensors,
            having written the checkpoint and its report).
    """
    probe = subprocess.run([sys.executable, "-c", RSS_PROBE, ",".join(map(str, exit_codes)), *cmd], cwd=cwd,
                           capture_output=True, text=True)
    if probe.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {probe.stderr[-2000:]}")
    return int(probe.stdout) / 1024


def train_text(chars: int) -> str:
    """The first ``chars`` characters of the corpus train split (exits with what to run when it is missing)."""
    if not TEXT_SOURCE.is_file():
        raise SystemExit(f"{TEXT_SOURCE} is missing: run python scripts/prepare_assets.py first")
    return TEXT_SOURCE.read_text()[:chars]


def tiny_bf16_model(folder: Path, model_type: str, tokenizer_text: str, **overrides) -> tuple[Path, float]:
    """A random bf16 ``model_type`` checkpoint with a tokenizer trained on ``tokenizer_text``, and its size in MiB."""
    model = make_tiny_checkpoint(folder, model_type, vocab_size=VOCAB, dtype=torch.bfloat16, initializer_range=0.05,
                                 **overrides)
    save_tiny_tokenizer(model, tokenizer_text, VOCAB)
    return model, sum(f.stat().st_size for f in model.glob("*.safetensors")) / 2**20


def extract_peak_rss(model: Path, corpus: Path, n_samples: int, seq_len: int, out: Path) -> float:
    """Peak RSS (MiB) of ``extract_calib_data.py`` dumping ``n_samples x seq_len`` tokens of ``corpus`` to ``out``."""
    return peak_rss_mib([sys.executable, "extract_calib_data.py", "--model", str(model), "--dataset", str(corpus),
                         "--n_samples", str(n_samples), "--seq_len", str(seq_len), "--output_dir", str(out)])
