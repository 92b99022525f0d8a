#!/usr/bin/env python
"""Dump the FP hidden states entering every decoder block (plus the final one).

The command lives in :mod:`cores.cli.extract` (``--help`` for its flags); installed, it is also
``blockptq-extract``.
"""

import sys

from cores.cli.extract import main, parse_args  # noqa: F401  (parse_args: for callers that build configs)

if __name__ == "__main__":
    sys.exit(main())
