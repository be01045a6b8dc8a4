"""``python -m mtlora_kernels``: the same command line as ``mtlora-kernels``."""

import sys

from mtlora_kernels.cli import main

sys.exit(main())
