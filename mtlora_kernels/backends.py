"""Which backends exist on this machine, and why not when they don't.

Loaded lazily: importing the package never imports triton or the CUDA extension. If the
extension ``mtlora_kernels._C`` fails to import, the package falls back to the other backends,
with one warning that says why when a GPU is present (without one, ``info`` reports why).
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import re
import warnings
from types import SimpleNamespace

import torch


@functools.cache
def _triton_status() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except ImportError as exc:  # pragma: no cover - triton ships with torch's CUDA builds
        return False, f"triton is not installed ({exc})"
    return True, ""


def _torch_major_minor(version: str) -> str:
    """``"2.14"`` of ``"2.14.1+cu130"``: what a build of the extension is tied to (torch's C++
    ABI changes between minor versions; a wheel's local label names it, e.g. +cu130torch2.14)."""
    return ".".join(version.split("+")[0].split(".")[:2])


def _installed_version(distribution: str = "mtlora-kernels") -> str | None:
    """The installed ``distribution``'s version, for mtlora-kernels with a wheel's local label
    (e.g. ``0.1.0+cu130torch2.14``); None when it is not installed (this package: when it runs
    from a tree that is not installed)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _wheel_for_other_torch() -> str:
    """Why the extension cannot load, when the installed wheel's label names another torch."""
    label = (_installed_version() or "").partition("+")[2]
    built = re.search(r"torch(\d+\.\d+)$", label)
    if built is None or built.group(1) == _torch_major_minor(torch.__version__):
        return ""
    return (f"; this mtlora-kernels (+{label}) was built for torch {built.group(1)}, not torch "
            f"{torch.__version__}: install its wheel for this torch or build it from source")


@functools.cache
def _cuda_extension() -> tuple[object | None, str]:
    try:
        ext = importlib.import_module("mtlora_kernels._C")
    except ImportError as exc:
        msg = (f"the CUDA extension mtlora_kernels._C is not built or failed to load ({exc})"
               + _wheel_for_other_torch())
        if torch.cuda.is_available():
            warnings.warn(msg + "; falling back to the triton/torch backends", stacklevel=3)
        return None, msg
    return ext, ""


def available(name: str, device: torch.device | str | None = None) -> tuple[bool, str]:
    """``(ok, reason)`` for backend ``name`` on ``device`` (None: this machine's GPU, if any)."""
    device = torch.device(device) if device is not None else None
    if name == "torch":
        return True, ""
    on_gpu = device.type == "cuda" if device is not None else torch.cuda.is_available()
    if name == "triton":
        ok, why = _triton_status()
        if not ok:
            return ok, why
        if on_gpu:
            return True, ""
        from mtlora_kernels.triton._common import interpreting

        if interpreting():
            return True, ""  # the interpreter runs the kernels on CPU tensors
        return False, "triton kernels need a CUDA tensor (or TRITON_INTERPRET=1)"
    if name == "cuda":
        ext, why = _cuda_extension()
        if ext is None:
            return False, why
        if not on_gpu:
            return False, "the CUDA extension needs a CUDA tensor (no GPU here)"
        return True, ""
    raise ValueError(f"unknown backend {name!r}")


# A constant of the process for given arguments, and so for torch.compile, whose trace of a
# layer runs the backend choice: dynamo calls it at trace time instead of tracing the import
# of triton or of the extension, which it cannot (fullgraph=True failed on the first check).
# This is what torch.compiler.assume_constant_result sets; the decorator itself imports
# torch._dynamo, and with it triton, which made `import mtlora_kernels` 1.4 s slower.
available._dynamo_marked_constant = True


def load(name: str) -> SimpleNamespace:
    """The backend object (forward / backward / dropout_keep_mask / unsupported) of a non-torch
    backend."""
    if name == "triton":
        from mtlora_kernels.triton import mix as triton_mix

        return triton_mix.BACKEND
    if name == "cuda":
        from mtlora_kernels.ops import cuda_mix

        return cuda_mix.BACKEND
    raise ValueError(f"unknown backend {name!r}")


def report() -> dict[str, str]:
    """Backend name -> 'available' or the reason it is not (for the CLI's ``info``)."""
    out = {}
    for name in ("torch", "triton", "cuda"):
        ok, why = available(name)
        out[name] = "available" if ok else why
    return out
