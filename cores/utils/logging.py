"""One logging set-up for the entry points."""

from __future__ import annotations

import logging


def setup_logging(level: str | int = "INFO", prefix: str = "") -> None:
    """Log to stderr at ``level``, each line led by the time, level and logger name (then ``prefix``)."""
    logging.basicConfig(level=level, format=f"%(asctime)s %(levelname)s %(name)s: {prefix}%(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "transformers.tokenization_utils_base"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
