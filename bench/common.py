"""Helpers shared by the benchmarks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Linux carries the high-water RSS of the parent's address space into a child's
# ru_maxrss at exec, so a child of a large benchmark process would report at least
# the benchmark's own peak. A small probe process starts the command instead.
RSS_PROBE = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
_, status, usage = os.wait4(proc.pid, 0)
if status:
    sys.exit(proc.stderr.read().decode()[-2000:])
print(usage.ru_maxrss)
"""


def peak_rss_mib(cmd: list[str]) -> float:
    """Peak resident set size (MiB) of ``cmd`` run in the repo root, from ``wait4`` in a probe process."""
    probe = subprocess.run([sys.executable, "-c", RSS_PROBE, *cmd], cwd=ROOT, capture_output=True, text=True)
    if probe.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {probe.stderr[-2000:]}")
    return int(probe.stdout) / 1024
