#!/usr/bin/env python
"""Fetch and build the offline assets: SmolLM2-135M-Instruct (bf16 HF folder) and the text corpus.

Idempotent: a second run only checks that everything is in place.

Example:
    python scripts/prepare_assets.py --assets_dir assets
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # blockptq_assets is not installed

from blockptq_assets.assets import DEFAULT_ASSETS_DIR, AssetError, ensure_assets  # noqa: E402
from cores.utils.logging import setup_logging  # noqa: E402

log = logging.getLogger("prepare_assets")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--assets_dir", default=str(DEFAULT_ASSETS_DIR),
                   help=f"where to put them (default: {DEFAULT_ASSETS_DIR})")
    args = p.parse_args(argv)
    setup_logging()
    start = time.perf_counter()
    try:
        assets = ensure_assets(args.assets_dir)
    except AssetError as err:
        log.error("%s", err)
        return 2
    log.info("assets ready in %.1f s", time.perf_counter() - start)
    print(f"model:      {assets.model_dir}\ntrain text: {assets.train_text}\neval text:  {assets.eval_text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
