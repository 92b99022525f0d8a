#!/usr/bin/env python
"""One command from an FP model to a deployed (optionally mixed-precision) checkpoint and its perplexity.

The command lives in :mod:`cores.cli.quantize` (``--help`` for its flags); installed, it is also
``blockptq-quantize``.
"""

import sys

from cores.cli.quantize import main, parse_args  # noqa: F401  (parse_args: for callers that build configs)

if __name__ == "__main__":
    sys.exit(main())
