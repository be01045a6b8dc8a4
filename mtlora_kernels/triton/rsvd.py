"""Triton kernels of the randomized SVD: one batched GEMM for the sketch, the power iterations,
the Gram matrices of CholeskyQR2 and the final rotations (SPEC section 3).

Every GEMM of :func:`mtlora_kernels.linalg.randomized_svd` is "big operand times a skinny fp32
basis": ``C[b] = A[b] @ X[b]`` with A [b, p, q] either the input matrix (bf16 / fp16 / fp32, any
strides, so ``M^T`` is a stride swap and never a copy) or an fp32 basis, and X [b, q, l] fp32 with
l = k + oversample columns. The kernel loads A in its storage dtype and up-casts the tile to fp32
before ``tl.dot``: the basis must stay fp32 (rounding Q to bf16 would put a 2^-9 relative error on
every singular value), and ``input_precision="tf32x3"`` keeps about 22 bits on tensor cores
(``_common.mma_fp32``; the interpreter computes it as the GPU does).
The up-cast also keeps clear of the Triton 3.8 interpreter's bf16 ``tl.dot`` bug, though that is
not why it is here. These GEMMs stream A once per pass with l <= 64 columns, so they are bound
by memory, not by the 3 tensor-core passes of tf32x3 (estimate for an H100, unmeasured).
"""

from __future__ import annotations

import triton
import triton.language as tl
import torch
from torch import Tensor

from mtlora_kernels.triton._common import cdiv, interpreting, mma_fp32
from mtlora_kernels.triton.registry import KernelConfig, KernelSpec, register

# CUDA's limit on grid.y and grid.z; the batch (axis 2) is launched in chunks of at most this.
_MAX_GRID_Z = 65535


@triton.jit
def rsvd_bmm_kernel(
    # pointers
    a_ptr, x_ptr, c_ptr,
    # sizes: C [batch, P, L] = A [batch, P, Q] @ X [batch, Q, L]
    P, L, Q,
    # strides (a batch stride may be 0: one operand shared by the whole batch)
    stride_ab, stride_ap, stride_aq,
    stride_xb, stride_xq, stride_xl,
    stride_cb, stride_cp, stride_cl,
    # meta
    BLOCK_P: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_Q: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_l = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)  # batch * stride can pass 2^31 elements
    # int64 rows: one untransposed matrix may hold 2^31+ elements (offs_p * stride_ap wraps).
    offs_p = pid_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_q = tl.arange(0, BLOCK_Q)
    a_ptrs = a_ptr + pid_b * stride_ab + offs_p[:, None] * stride_ap + offs_q[None, :] * stride_aq
    x_ptrs = x_ptr + pid_b * stride_xb + offs_q[:, None] * stride_xq + offs_l[None, :] * stride_xl
    acc = tl.zeros((BLOCK_P, BLOCK_L), dtype=tl.float32)
    for q0 in range(0, Q, BLOCK_Q):
        q_ok = offs_q < Q - q0
        a = tl.load(a_ptrs, mask=(offs_p[:, None] < P) & q_ok[None, :], other=0.0)
        x = tl.load(x_ptrs, mask=q_ok[:, None] & (offs_l[None, :] < L), other=0.0)
        acc = mma_fp32(a.to(tl.float32), x, acc, UPCAST)
        a_ptrs += BLOCK_Q * stride_aq
        x_ptrs += BLOCK_Q * stride_xq
    c_ptrs = c_ptr + pid_b * stride_cb + offs_p[:, None] * stride_cp + offs_l[None, :] * stride_cl
    tl.store(c_ptrs, acc, mask=(offs_p[:, None] < P) & (offs_l[None, :] < L))


# Every configuration the launcher picks, as (BLOCK_P, BLOCK_L, BLOCK_Q, num_warps). 64-row
# tiles for the tall GEMMs (M @ X, M^T @ Y), 16-row tiles with longer Q steps for the short ones
# (Gram matrices, A @ X of a low-rank product). tf32x3 holds hi and lo parts of both operands in
# registers: at 4 warps the 64 x 64 x 64 tile spilled 720-1440 bytes on sm_80 and 64-256 on
# sm_90, so the 64-row tiles step Q by 32 with 8 warps (0 bytes spilled on sm_80 and sm_90).
_TILES = (
    (64, 16, 32, 8), (64, 32, 32, 8), (64, 64, 32, 8),
    (16, 16, 64, 4), (16, 32, 64, 4), (16, 64, 32, 4),
)
CONFIGS = tuple(
    KernelConfig({"BLOCK_P": bp, "BLOCK_L": bl, "BLOCK_Q": bq, "UPCAST": False}, num_warps=w,
                 num_stages=3)
    for bp, bl, bq, w in _TILES
)
_CONFIG_BY_TILE = {(c.constexprs["BLOCK_P"], c.constexprs["BLOCK_L"]): c for c in CONFIGS}

register(KernelSpec(
    name="rsvd_bmm",
    fn=rsvd_bmm_kernel,
    signature={
        "a_ptr": "*{dtype}", "x_ptr": "*fp32", "c_ptr": "*fp32",
        "P": "i32", "L": "i32", "Q": "i32",
        "stride_ab": "i32", "stride_ap": "i32", "stride_aq": "i32",
        "stride_xb": "i32", "stride_xq": "i32", "stride_xl": "i32",
        "stride_cb": "i32", "stride_cp": "i32", "stride_cl": "i32",
    },
    configs=CONFIGS,
    dtypes=("bf16", "fp16", "fp32"),
    uses_dot=True,
    notes="randomized SVD: C[b] = A[b] @ X[b], X a skinny fp32 basis, fp32 accumulation (tf32x3)",
))


def pick_config(P: int, L: int) -> KernelConfig:
    """The configuration for an output of P x L: 16-row tiles when P <= 16, and the narrowest
    of 16 / 32 / 64 columns that covers L (wider L takes several column tiles of 64)."""
    bp = 16 if P <= 16 else 64
    bl = 16 if L <= 16 else 32 if L <= 32 else 64
    return _CONFIG_BY_TILE[(bp, bl)]


def bmm(a: Tensor, x: Tensor) -> Tensor:
    """``torch.bmm(a.float(), x)`` with fp32 accumulation.

    Args:
        a: [b, P, Q] fp16 / bf16 / fp32, any strides (a transpose is a stride swap; a batch
            stride of 0 shares one matrix across the batch).
        x: [b, Q, L] fp32, any strides.

    Returns [b, P, L] fp32, contiguous.
    """
    if a.dim() != 3 or x.dim() != 3 or a.shape[0] != x.shape[0] or a.shape[2] != x.shape[1]:
        raise ValueError(f"bmm needs a [b, P, Q] and x [b, Q, L]; got {tuple(a.shape)} and "
                         f"{tuple(x.shape)}")
    if a.dtype not in (torch.float16, torch.bfloat16, torch.float32) or x.dtype != torch.float32:
        raise TypeError(f"bmm needs a in fp16/bf16/fp32 and x in fp32; got {a.dtype}, {x.dtype}")
    if a.device != x.device:
        raise ValueError(f"a and x must be on one device; got {a.device} and {x.device}")
    nb, P, Q = a.shape
    L = x.shape[2]
    c = torch.empty(nb, P, L, dtype=torch.float32, device=a.device)
    if c.numel() == 0:
        return c
    if Q == 0:
        return c.zero_()
    cfg = pick_config(P, L)
    bp, bl = cfg.constexprs["BLOCK_P"], cfg.constexprs["BLOCK_L"]
    meta = {**cfg.constexprs, "UPCAST": interpreting()}
    # Triton launches on the current CUDA device, not a's: see triton.mix._launch.
    with torch.cuda.device_of(a):
        for b0 in range(0, nb, _MAX_GRID_Z):  # more matrices than grid.z takes: several launches
            b1 = min(nb, b0 + _MAX_GRID_Z)
            grid = (cdiv(P, bp), cdiv(L, bl), b1 - b0)
            rsvd_bmm_kernel[grid](
                a[b0:b1], x[b0:b1], c[b0:b1],
                P, L, Q,
                a.stride(0), a.stride(1), a.stride(2),
                x.stride(0), x.stride(1), x.stride(2),
                c.stride(0), c.stride(1), c.stride(2),
                **meta, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
    return c
