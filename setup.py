"""Build script: the pure-Python package, plus the CUDA extension ``mtlora_kernels._C`` when a
CUDA toolkit and a CUDA build of torch are present.

Environment:
    MTLORA_BUILD_CUDA   auto (default): build _C if possible, otherwise skip it with a note;
                        1: build it or fail; 0: never build it.
    TORCH_CUDA_ARCH_LIST  architectures to compile for (default "8.0 8.6 8.9 9.0+PTX").
    MAX_JOBS            parallel compile jobs (ninja), honoured by torch's BuildExtension.
    CUDA_HOME           the toolkit; when unset we use the one of the nvcc on PATH, or
                        /usr/local/cuda (torch's own guess from a wrapper nvcc in /usr/local/bin
                        is /usr/local, where the link fails on -lcudart: SPEC section 6).
    MTLORA_LOCAL_VERSION  a PEP 440 local version label appended to the version (set by
                        python/tools/build_wheel.py, e.g. "cu130torch2.14").
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "8.0 8.6 8.9 9.0+PTX"


def read_sources() -> list[str]:
    """The extension's sources, from csrc/sources.txt (the one list CMake reads too)."""
    lines = (ROOT / "csrc" / "sources.txt").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def version() -> str:
    text = (ROOT / "mtlora_kernels" / "__init__.py").read_text()
    base = re.search(r'^__version__\s*=\s*"([^"]+)"', text, re.M).group(1)
    local = os.environ.get("MTLORA_LOCAL_VERSION", "").strip()
    return f"{base}+{local}" if local else base


def _default_cuda_home() -> None:
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        candidates.append(Path(os.path.realpath(nvcc)).parent.parent)
    candidates.append(Path("/usr/local/cuda"))
    for home in candidates:
        if (home / "include" / "cuda_runtime.h").is_file() and (home / "bin" / "nvcc").exists():
            os.environ["CUDA_HOME"] = str(home)
            return


def cuda_build_plan() -> tuple[bool, str]:
    """``(build, reason)``: whether to build _C and, if not, why."""
    mode = os.environ.get("MTLORA_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "1", "0"):
        sys.exit(f"MTLORA_BUILD_CUDA must be auto, 1 or 0; got {mode!r}")
    if mode == "0":
        return False, "MTLORA_BUILD_CUDA=0"
    _default_cuda_home()
    reason = ""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError as exc:
        reason = f"torch is not importable at build time ({exc}); use --no-build-isolation"
    else:
        if torch.version.cuda is None:
            reason = f"torch {torch.__version__} is a CPU build (no CUDA libraries to link)"
        elif CUDA_HOME is None or not (Path(CUDA_HOME) / "bin" / "nvcc").exists():
            reason = f"no CUDA toolkit found (CUDA_HOME={CUDA_HOME!r}); set CUDA_HOME"
    if reason and mode == "1":
        sys.exit(f"MTLORA_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
    return not reason, reason


def extension_kwargs() -> dict:
    build, reason = cuda_build_plan()
    if not build:
        print(f"mtlora-kernels: building without the CUDA extension: {reason}", file=sys.stderr)
        return {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    print(f"mtlora-kernels: building mtlora_kernels._C for TORCH_CUDA_ARCH_LIST="
          f"{os.environ['TORCH_CUDA_ARCH_LIST']!r}, CUDA_HOME={os.environ.get('CUDA_HOME')}",
          file=sys.stderr)
    ext = CUDAExtension(
        name="mtlora_kernels._C",
        sources=read_sources(),
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={
            "cxx": ["-O3"],  # torch picks the C++ standard it needs (C++20 for torch 2.14)
            # -std=c++17 pinned: the .cu files include no torch headers, so they need no more,
            # and without it each torch adds its own (C++20 for 2.14), which CMakeLists.txt and
            # the kernel report (`mtlora-kernels kernels`) would not match. -lineinfo: kernels
            # map back to source in ncu / compute-sanitizer at no runtime cost. No
            # --use_fast_math: the router softmax relies on an accurate expf.
            "nvcc": ["-O3", "-std=c++17", "-lineinfo"],
        },
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


setup(version=version(), **extension_kwargs())
