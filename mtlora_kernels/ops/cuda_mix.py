"""The ``cuda`` backend of the fused mix: thin wrappers over the extension ``mtlora_kernels._C``.

Same contract as the other backends (see the docstring of :mod:`mtlora_kernels.ops.mix`);
validation beyond what the kernels need, autograd and dispatch live there. The extension checks
shapes, dtypes (fp32 / fp16 / bf16; fp64 is left to the torch backend), devices and contiguity
again at its boundary.

STATUS: the CUDA kernels behind this module compile for sm_80 / sm_90 and pass the tests against
the reference in the CPU emulator of ``tests/cuda_emu``; they have not been run on a GPU yet
(``tests/test_cuda_mix.py`` runs them there wherever a GPU exists).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import Tensor

from mtlora_kernels import backends


def _ext():
    ext, why = backends._cuda_extension()
    if ext is None:
        raise RuntimeError(f"the cuda backend is unavailable: {why}")
    return ext


def forward(x: Tensor, A: Tensor, B: Tensor, route_weight: Tensor | None, logits: Tensor | None,
            residual: Tensor | None, groups: int, scaling: float, dropout_p: float, seed: int
            ) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, h, pi)`` of the fused mix; see :mod:`mtlora_kernels.ops.mix`."""
    y, h, pi = _ext().forward(x, A, B, route_weight, logits, residual, int(groups),
                              float(scaling), float(dropout_p), int(seed))
    return y, h, pi


def backward(dy: Tensor, x: Tensor, A: Tensor, B: Tensor, route_weight: Tensor | None, h: Tensor,
             pi: Tensor, dpi: Tensor | None, groups: int, scaling: float, dropout_p: float,
             seed: int, deterministic: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dx, dA, dB, dW_route, dlogits)``."""
    del deterministic  # the kernels use no atomics: bitwise reproducible in every mode
    dx, dA, dB, dW, dz = _ext().backward(dy, x, A, B, route_weight, h, pi, dpi, int(groups),
                                         float(scaling), float(dropout_p), int(seed))
    return dx, dA, dB, dW, dz


def dropout_keep_mask(seed: int, T: int, d_in: int, p: float, device) -> Tensor:
    """The bool keep-mask [T, d_in] the kernels draw for ``seed`` (Philox4x32-10, Triton's
    ``tl.rand(seed, t * d_in + k) >= p`` convention); on a CPU device the same function runs on
    the host."""
    return _ext().dropout_keep_mask(int(seed), int(T), int(d_in), float(p), torch.device(device))


def unsupported(dtype: torch.dtype, r: int, n_experts: int) -> str | None:
    """Why the kernels cannot take these inputs (any r and N; fp64 is the torch backend's)."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"the CUDA backend supports float32, float16 and bfloat16 inputs, got {dtype}"
    return None


BACKEND = SimpleNamespace(forward=forward, backward=backward, dropout_keep_mask=dropout_keep_mask,
                          unsupported=unsupported)
