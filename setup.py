"""Build script: the pure-Python package, plus the CUDA extension mtlora_kernels._C when a CUDA
toolkit and a CUDA build of torch are present (MTLORA_BUILD_CUDA=auto|1|0, default auto)."""

from setuptools import setup

setup()
