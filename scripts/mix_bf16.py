#!/usr/bin/env python
"""Restore some decoder layers of a deployed checkpoint to BF16 from its source model.

See cores/recipes/mixed.py (restore_bf16_layers). Example:

    python scripts/mix_bf16.py --deployed outputs/smollm2-w8a8 --source assets/smollm2-135m \
        --bf16_layers 28-29 --output outputs/smollm2-w8a8-mix
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cores.cli import check_output_folder, run_main  # noqa: E402
from cores.recipes import load_recipe, parse_layer_ranges  # noqa: E402
from cores.recipes.mixed import restore_bf16_layers  # noqa: E402
from cores.utils.logging import setup_logging  # noqa: E402

log = logging.getLogger("mix_bf16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--deployed", required=True, help="compressed-tensors checkpoint from deploy.py")
    p.add_argument("--source", required=True, help="the FP model it was deployed from")
    p.add_argument("--output", required=True, help="folder to write")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--bf16_layers", nargs="+", help="layers to keep in BF16, e.g. 22 28-29")
    group.add_argument("--recipe", help="a recipe file whose bf16_layers to use")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    return p.parse_args(argv)


def _run(a: argparse.Namespace) -> int:
    check_output_folder("--output", a.output)
    layers = list(load_recipe(a.recipe).bf16_layers) if a.recipe else parse_layer_ranges(a.bf16_layers)
    print(restore_bf16_layers(a.deployed, a.source, layers, a.output, a.overwrite).line())
    return 0


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    setup_logging()
    return run_main(lambda: _run(a), log)


if __name__ == "__main__":
    sys.exit(main())
