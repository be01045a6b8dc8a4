"""What this installation was built with: the CUDA extension's archs, CUDA and torch versions.

The facts come from the compiled extension itself (attributes of ``mtlora_kernels._C`` set at
compile time), so they can never disagree with the binary that is loaded.
"""

from __future__ import annotations

import torch


def build_info() -> dict:
    """Build facts as a flat dict (for ``mtlora-kernels info`` and bug reports).

    Keys: ``version``; ``installed_version`` (the installed distribution's, with a wheel's local
    label such as ``+cu130torch2.14``; None when running from a tree that is not installed);
    ``torch`` and ``torch_cuda`` (the running torch and its CUDA, None for a CPU build);
    ``cuda_extension`` (bool: ``mtlora_kernels._C`` imported); when it did, ``extension_archs``
    (e.g. ``["sm_80", "sm_90"]``, from nvcc's ``__CUDA_ARCH_LIST__``), ``extension_cuda``
    (toolkit it was compiled with), ``extension_torch`` (torch it was compiled against) and
    ``extension_torch_matches`` (whether that torch's major.minor is the running one's, as in a
    wheel's label; False means rebuild: torch's C++ ABI changes between minor versions);
    otherwise ``cuda_extension_reason``.
    """
    from mtlora_kernels import __version__, backends

    info: dict = {
        "version": __version__,
        "installed_version": backends._installed_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
    }
    ext, why = backends._cuda_extension()
    info["cuda_extension"] = ext is not None
    if ext is None:
        info["cuda_extension_reason"] = why
        return info
    archs = [a.strip() for a in str(ext.arch_list).split(",") if a.strip()]
    info["extension_archs"] = [f"sm_{int(a) // 10}" for a in archs]
    info["extension_cuda"] = str(ext.cuda_version)
    info["extension_torch"] = str(ext.torch_version)
    info["extension_torch_matches"] = (backends._torch_major_minor(torch.__version__)
                                       == backends._torch_major_minor(str(ext.torch_version)))
    return info


__all__ = ["build_info"]
