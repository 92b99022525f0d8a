#!/usr/bin/env python
"""Print a perplexity table from eval_ppl.py JSON files: name=path arguments, first one is the baseline."""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    rows = []
    for arg in argv:
        name, _, path = arg.partition("=")
        with open(path) as f:
            rows.append((name, json.load(f)))
    if not rows:
        print("usage: ppl_table.py NAME=RESULT.json [NAME=RESULT.json ...]", file=sys.stderr)
        return 2
    base = rows[0][1]["ppl"]
    print(f"{'model':<28} {'ppl':>10} {'vs ' + rows[0][0]:>14} {'tokens':>8}")
    for name, r in rows:
        print(f"{name:<28} {r['ppl']:>10.4f} {(r['ppl'] / base - 1) * 100:>+13.2f}% {r['tokens']:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
