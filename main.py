#!/usr/bin/env python
"""Learn block-wise quantization parameters from a calibration dump.

The command lives in :mod:`cores.cli.train` (``--help`` for its flags); installed, it is also
``blockptq-train``.
"""

import sys

from cores.cli.train import main, parse_args  # noqa: F401  (parse_args: for callers that build configs)

if __name__ == "__main__":
    sys.exit(main())
