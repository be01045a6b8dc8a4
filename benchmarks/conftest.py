"""pytest-benchmark suite of the layer (``pytest benchmarks/ --benchmark-only``).

Files here are named ``bench_*.py``, which pytest does not collect by default: this hook
collects them from this directory only, so ``tests/`` keeps its own rules.
"""

from __future__ import annotations

import pytest


def pytest_collect_file(file_path, parent):
    # A file named on the command line is collected by pytest itself, whatever its name.
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_addoption(parser):
    parser.addoption("--paper-shape", action="store_true",
                     help="time T=2048 (8192 on a GPU), d=4096, r=16, N=16 even on the CPU "
                          "(default on the CPU: a small shape)")
