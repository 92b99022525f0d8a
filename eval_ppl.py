#!/usr/bin/env python
"""Perplexity of a model folder on Wikitext-2 or any local text, streamed block by block.

The command lives in :mod:`cores.cli.eval` (``--help`` for its flags); installed, it is also
``blockptq-eval``.
"""

import sys

from cores.cli.eval import main, parse_args  # noqa: F401  (parse_args: for callers that build configs)

if __name__ == "__main__":
    sys.exit(main())
