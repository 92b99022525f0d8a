#!/usr/bin/env python
"""Write a serving checkpoint (compressed-tensors, or FP8 128x128 blocks) from FP weights, or dequantize FP8 to BF16.

The command lives in :mod:`cores.cli.deploy` (``--help`` for its flags); installed, it is also
``blockptq-deploy``.
"""

import sys

from cores.cli.deploy import main, parse_args  # noqa: F401  (parse_args: for callers that build configs)

if __name__ == "__main__":
    sys.exit(main())
