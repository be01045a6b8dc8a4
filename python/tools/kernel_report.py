#!/usr/bin/env python
"""Compile every kernel for sm_80 / sm_90 without a GPU and print registers, spills, shared
memory, tensor-core use and a roofline estimate (same as ``mtlora-kernels kernels``).

    python python/tools/kernel_report.py [--json | --markdown] [--kernel NAME] [--no-cuda]
"""

import sys
from pathlib import Path

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mtlora_kernels.kernel_report import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
