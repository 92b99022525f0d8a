"""Run an entry point as ``python SCRIPT ARGS`` with faults injected from outside it (used by tests/e2e/test_faults.py).

    python tests/e2e/fault_runner.py [--events os:replace,os:fsync,...] [--count_file F]
        [--kill_at N --kill_when before|after] [--deny_write DIR] -- SCRIPT ARGS...

- ``--events``: callables (``module:attr`` or ``module:Class.attr``) whose calls are
  counted together; ``--count_file`` receives the list of calls (their names, in
  order) at exit, as JSON.
- ``--kill_at N``: SIGKILL this process at the N-th counted call, before or after
  the real call runs: a real ``kill -9`` at a chosen point of the writes.
- ``--deny_write DIR``: ``os.access`` says DIR is not writable (as a read-only
  folder is for a user who is not root; root ignores permission bits).

The production code is untouched: the hooks are installed by wrapping attributes
before the script runs.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import json
import os
import runpy
import signal
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _install(targets: list[str], kill_at: int | None, when: str, calls: list[str]) -> None:
    lock = threading.Lock()

    def hook(real, target):
        def hooked(*args, **kwargs):
            with lock:
                calls.append(target)
                hit = len(calls) == kill_at
            if hit and when == "before":
                os.kill(os.getpid(), signal.SIGKILL)
            out = real(*args, **kwargs)
            if hit and when == "after":
                os.kill(os.getpid(), signal.SIGKILL)
            return out

        return hooked

    for target in targets:
        module_name, _, attr = target.partition(":")
        owner = importlib.import_module(module_name)
        *path, name = attr.split(".")
        for part in path:
            owner = getattr(owner, part)
        setattr(owner, name, hook(getattr(owner, name), target))


def _deny_write(folder: Path) -> None:
    real = os.access
    folder = folder.resolve()

    def access(path, mode, *args, **kwargs):
        if mode & os.W_OK and Path(path).resolve() == folder:
            return False
        return real(path, mode, *args, **kwargs)

    os.access = access


def main() -> None:
    argv = sys.argv[1:]
    split = argv.index("--")
    p = argparse.ArgumentParser()
    p.add_argument("--events", default="")
    p.add_argument("--count_file")
    p.add_argument("--kill_at", type=int)
    p.add_argument("--kill_when", choices=["before", "after"], default="before")
    p.add_argument("--deny_write")
    a = p.parse_args(argv[:split])
    script, *args = argv[split + 1:]
    sys.path.insert(0, str(ROOT))
    calls: list[str] = []
    if a.events:
        _install(a.events.split(","), a.kill_at, a.kill_when, calls)
    if a.count_file:
        atexit.register(lambda: Path(a.count_file).write_text(json.dumps(calls)))
    if a.deny_write:
        _deny_write(Path(a.deny_write))
    sys.argv = [script, *args]
    runpy.run_path(str(ROOT / script), run_name="__main__")


if __name__ == "__main__":
    main()
