"""Randomized truncated SVD (Halko, Martinsson and Tropp 2011) for batches of matrices and of
low-rank products, with CholeskyQR2 orthonormalisation (SPEC section 3).

Every large operation is a GEMM of the input against a skinny fp32 basis of l = k + oversample
columns: on a GPU they run in one batched Triton kernel (:mod:`mtlora_kernels.triton.rsvd`),
on the CPU in torch. The remaining work is on l x l matrices (Cholesky, triangular solves, one
small SVD).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mtlora_kernels import backends
from mtlora_kernels._checks import as_int
from mtlora_kernels.ops.mix import acc_dtype

# CholeskyQR2 falls back to Householder QR (torch.linalg.qr, per batch element) when Cholesky
# fails or the first pass leaves ||Q1^T Q1 - I||_F above this. Measured on Y = U diag(s) V^T with
# m = 1024 and 4096 rows, l = 24: in fp32 that first-pass error is 9e-3 at cond(Y) = 1e3 and
# 0.75-0.9 at 1e4 (the second pass still reaches 6e-7 there), and Cholesky fails from 3e4 on; in
# fp64 it is 2e-3 at 1e7 and 0.04-0.15 at 1e8, and Cholesky fails at 1e9. So the fallback starts
# near cond(Y) = u^(-1/2) (~4e3 in fp32, ~1e8 in fp64), where CholeskyQR2's guarantee ends.
# Rank-deficient sketches (input rank < k + oversample) always take it; Y's magnitude alone
# does not (_orth scales each batch element by a power of two first).
_CHOLQR_MAX_FIRST_PASS_ERR = 0.5


def _resolve_backend(backend: str | None, device: torch.device, dtype: torch.dtype) -> str:
    name = backend or "auto"
    if name not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton'; got {name!r}")
    if name == "auto":
        ok = device.type == "cuda" and dtype != torch.float64 and backends.available(
            "triton", device)[0]
        return "triton" if ok else "torch"
    if name == "triton":
        ok, why = backends.available("triton", device)
        if not ok:
            raise RuntimeError(f"backend 'triton' was requested but is unavailable: {why}")
        if dtype == torch.float64:
            raise ValueError("the triton backend computes in fp32; use backend='torch' for "
                             "float64 input")
    return name


def _gemm_fn(backend: str):
    """``gemm(a, x) = a @ x`` for a [b, P, Q] (any strides, batch stride may be 0) and the
    skinny x [b, Q, L] in the accumulation dtype; returns [b, P, L] in that dtype."""
    if backend == "triton":
        from mtlora_kernels.triton.rsvd import bmm

        return bmm
    return torch.matmul


def _orth(Y: Tensor, gemm) -> tuple[Tensor, Tensor]:
    """``Q, R = torch.linalg.qr(Y)`` by CholeskyQR2 (two Gram + Cholesky passes, GEMM-only),
    with Householder QR for the batch elements it cannot handle (see the threshold above).

    Each batch element is first scaled by a power of two 2^-e (exact) to bring max |Y| into
    [0.5, 1), and R is scaled back by 2^e: the Gram matrix Y^T Y would otherwise overflow or
    underflow and send every such element to the fallback (in fp32 it did for all of a batch
    of 300 x 200 inputs with entries ~1e20 or ~1e-18, not at 1e18 or 1e-15). Both scalings are
    exact, so where the unscaled Gram matrix neither overflows nor underflows the results are
    unchanged (bit-identical on the CPU, measured). e is clamped so that 2^e and 2^-e stay
    finite, which only binds for a subnormal or near-overflow max |Y|."""
    fi = torch.finfo(Y.dtype)
    e = torch.frexp(Y.abs().amax(dim=(-2, -1), keepdim=True)).exponent.clamp(
        math.frexp(fi.tiny)[1], math.frexp(fi.max)[1] - 1)
    Ys = torch.ldexp(Y, -e)
    eye = torch.eye(Y.shape[-1], dtype=Y.dtype, device=Y.device)
    R1, info1 = torch.linalg.cholesky_ex(gemm(Ys.mT, Ys), upper=True)
    Q1 = torch.linalg.solve_triangular(R1, Ys, upper=True, left=False)
    G2 = gemm(Q1.mT, Q1)
    R2, info2 = torch.linalg.cholesky_ex(G2, upper=True)
    Q = torch.linalg.solve_triangular(R2, Q1, upper=True, left=False)
    R = torch.ldexp(R2 @ R1, e)
    # `not (err <= thr)` also catches the NaN a failed first Cholesky leaves behind.
    bad = (info1 != 0) | (info2 != 0) | ~(
        torch.linalg.matrix_norm(G2 - eye) <= _CHOLQR_MAX_FIRST_PASS_ERR)
    if bad.any():
        Q[bad], R[bad] = torch.linalg.qr(Y[bad])
    return Q, R


def _as_batched_operator(M, acc: torch.dtype, backend: str):
    """Flatten the batch of a dense M or a product (B, A) to one dim; return (batch shape, m, n,
    rank bound, mm, rmm, device) with ``mm(X) = M @ X`` and ``rmm(Y) = M^T @ Y`` on [b, ., l]
    operands."""
    gemm = _gemm_fn(backend)
    # The torch path computes in acc (one up-cast here); the Triton kernel up-casts its tiles.
    load = (lambda t: t.to(acc)) if backend == "torch" else (lambda t: t)
    if isinstance(M, Tensor):
        if M.dim() < 2:
            raise ValueError(f"M must be [..., m, n]; got shape {tuple(M.shape)}")
        batch, (m, n) = M.shape[:-2], M.shape[-2:]
        D = load(M.reshape(-1, m, n))
        return (batch, m, n, min(m, n), (lambda X: gemm(D, X)), (lambda Y: gemm(D.mT, Y)),
                M.device)
    B, A = M
    if B.dim() < 2 or A.dim() < 2 or B.shape[-1] != A.shape[-2]:
        raise ValueError("a low-rank product needs B [..., m, r] and A [..., r, n]; got B "
                         f"{tuple(B.shape)} and A {tuple(A.shape)}")
    if B.device != A.device or B.dtype != A.dtype:
        raise ValueError(f"B and A must share device and dtype; got {B.device}/{B.dtype} and "
                         f"{A.device}/{A.dtype}")
    (m, r), n = B.shape[-2:], A.shape[-1]
    try:
        batch = torch.broadcast_shapes(B.shape[:-2], A.shape[:-2])
    except RuntimeError as exc:
        raise ValueError(f"the batch dims of B {tuple(B.shape[:-2])} and A "
                         f"{tuple(A.shape[:-2])} do not broadcast") from exc
    # expand() keeps a shared factor (A [r, n] for all experts) as a stride-0 view, not a copy;
    # cast before expanding, as a cast of the expanded view would write one copy per expert.
    Bf = load(B).expand(*batch, m, r).reshape(-1, m, r)
    Af = load(A).expand(*batch, r, n).reshape(-1, r, n)
    return (batch, m, n, min(m, n, r), (lambda X: gemm(Bf, gemm(Af, X))),
            (lambda Y: gemm(Af.mT, gemm(Bf.mT, Y))), B.device)


@torch.no_grad()
def randomized_svd(
    M: Tensor | tuple[Tensor, Tensor],
    k: int,
    oversample: int = 8,
    power_iters: int = 2,
    generator: torch.Generator | None = None,
    *,
    backend: str | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``U, S, Vh = torch.linalg.svd(M, full_matrices=False)`` cut to the top k triplets
    (``U[..., :k], S[..., :k], Vh[..., :k, :]``) by a randomized range finder: approximate, and
    exact up to rounding when rank(M) <= k + oversample.

    Halko-Martinsson-Tropp: sketch ``Y = M @ Omega`` with a Gaussian Omega [n, l],
    ``l = min(k + oversample, m, n)``; ``power_iters`` rounds of ``Q <- orth(M @ orth(M^T @ Q))``;
    then ``M^T Q = Z R`` gives ``Q^T M = R^T Z^T`` and the l x l SVD of ``R^T`` yields U, S, Vh.
    That is ``2 + 2 * power_iters`` passes over M. Each power iteration multiplies the relative
    error of the k-th singular value by about ``(sigma_{l+1} / sigma_k)^4`` (the sine of the angle
    between the sketch and the top singular subspace by the square of that ratio); when l reaches
    the rank bound (min(m, n), or r for a product) the sketch spans range(M) and at most one
    runs, to undo the rounding error that the conditioning of the square sketch amplifies.

    Args:
        M: [..., m, n] (fp16 / bf16 / fp32 / fp64, any strides), or a tuple ``(B, A)`` with
            B [..., m, r] and A [..., r, n] (batch dims broadcast) meaning ``B @ A``, which is
            never formed: each pass costs two skinny GEMMs, O((m + n) r l) instead of O(m n l).
        k: number of singular triplets, 1 <= k <= min(m, n).
        oversample: extra sketch columns p >= 0 (accuracy improves with the gap sigma_{k+p+1}
            / sigma_k).
        power_iters: q >= 0 rounds of subspace iteration, each re-orthonormalised.
        generator: torch.Generator that draws Omega (for reproducible results); its device may
            differ from M's. None uses the global RNG of M's device.
        backend: 'auto' (Triton on a CUDA tensor when available and M is not fp64, else torch),
            'torch' or 'triton'.

    Returns:
        U [..., m, k], S [..., k] (descending, >= 0), Vh [..., k, n], in fp32 (fp64 for fp64
        input), U with orthonormal columns and Vh with orthonormal rows. Signs of singular vector
        pairs are arbitrary, as in torch.linalg.svd. Not differentiable (computed under
        no_grad): its QR of a sketch wider than rank(M), the case where it is exact, has no
        derivative (autograd returned NaN). Use torch.linalg.svd where gradients are needed.
    """
    if not isinstance(M, Tensor) and not (
            isinstance(M, tuple) and len(M) == 2 and all(isinstance(t, Tensor) for t in M)):
        raise TypeError("M must be a tensor [..., m, n] or a tuple (B [..., m, r], A [..., r, n]) "
                        f"meaning B @ A; got {type(M).__name__}")
    dtype = (M if isinstance(M, Tensor) else M[0]).dtype
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"M must be a real floating tensor (fp16/bf16/fp32/fp64); got {dtype}")
    backend = _resolve_backend(backend, (M if isinstance(M, Tensor) else M[0]).device, dtype)
    acc = acc_dtype(dtype)
    batch, m, n, rank_bound, mm, rmm, device = _as_batched_operator(M, acc, backend)
    k = as_int(k, "k")
    if not 1 <= k <= min(m, n):
        raise ValueError(f"k must be an int in [1, min(m, n)] = [1, {min(m, n)}]; got {k!r}")
    oversample = as_int(oversample, "oversample", minimum=0)
    power_iters = as_int(power_iters, "power_iters", minimum=0)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None; got "
                        f"{type(generator).__name__}")
    gemm = _gemm_fn(backend)
    nb, l = batch.numel(), min(k + oversample, m, n)
    gen_device = generator.device if generator is not None else device
    omega = torch.randn(nb, n, l, generator=generator, dtype=acc, device=gen_device).to(device)
    Q, _ = _orth(mm(omega), gemm)
    # A sketch at least as wide as rank(M) can be (min(m, n), or r for a product) spans range(M)
    # in exact arithmetic, but its effective Omega is then square (n x n dense, A Omega r x r for
    # a product), whose condition number has a heavy tail and multiplies the rounding error of
    # range(Q). One round (Z an orthonormal basis of range(M^T)) undoes that; more add nothing.
    # Measured in fp32 on 2000 random 256 x 16 matrices, k = 16, p = 8: relative
    # reconstruction error ||M - U S Vh|| / ||M|| median 1.1e-6, 99th percentile 3.4e-5, max
    # 3.4e-4 with no round; max 1.2e-6 with one (torch.linalg.svd: 1.2e-6). Time on the CPU,
    # 16 x 4096 x 16, k = 8, p = 8 (l = n = 16): median 12 ms with no round, 23 ms with one.
    for _ in range(power_iters if l < rank_bound else min(power_iters, 1)):
        Z, _ = _orth(rmm(Q), gemm)
        Q, _ = _orth(mm(Z), gemm)
    Z, R = _orth(rmm(Q), gemm)  # M^T Q = Z R, so Q^T M = R^T Z^T
    Ut, S, Wh = torch.linalg.svd(R.mT)
    U = gemm(Q, Ut[..., :k].contiguous())
    Vh = gemm(Z, Wh[..., :k, :].mT.contiguous()).mT
    return (U.reshape(*batch, m, k), S[..., :k].reshape(*batch, k),
            Vh.contiguous().reshape(*batch, k, n))


__all__ = ["randomized_svd"]
