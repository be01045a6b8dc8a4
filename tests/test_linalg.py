"""randomized_svd against torch.linalg.svd: singular values, orthonormality, subspaces; batched,
low-rank products, every dtype, the Triton kernels through the interpreter, and bad input."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from conftest import REL_TOL, rel_err
from mtlora_kernels import linalg
from mtlora_kernels.linalg import randomized_svd

F64 = torch.float64
# The Triton tests run the kernels on a GPU when there is one, else in Triton's interpreter on
# CPU tensors (conftest sets TRITON_INTERPRET=1 without a GPU).
TRITON_DEV = torch.device(
    "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _with_spectrum(batch, m, n, s, seed):
    """Random [*batch, m, n] with singular values ``s`` (len(s) <= min(m, n)): U diag(s) V^T."""
    g = _gen(seed)
    U, _ = torch.linalg.qr(torch.randn(*batch, m, len(s), generator=g, dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(*batch, n, len(s), generator=g, dtype=F64))
    return (U * s) @ V.mT


def _check_orthonormal(U, Vh, tol):
    k = U.shape[-1]
    eye = torch.eye(k, dtype=F64)
    assert (U.double().mT @ U.double() - eye).abs().max() <= tol, "U columns not orthonormal"
    assert (Vh.double() @ Vh.double().mT - eye).abs().max() <= tol, "Vh rows not orthonormal"


def _subspace_gap(X, Xref):
    """||(I - X X^T) Xref||_2 over the batch: the sine of the largest principal angle."""
    X, Xref = X.double(), Xref.double()
    resid = Xref - X @ (X.mT @ Xref)
    return torch.linalg.matrix_norm(resid, ord=2).max().item()


def _check_against_svd(M, out, k, tol_s, tol_orth, tol_sub):
    U, S, Vh = out
    Ur, Sr, Vhr = torch.linalg.svd(M.double(), full_matrices=False)
    assert U.shape == (*M.shape[:-1], k) and S.shape == (*M.shape[:-2], k)
    assert Vh.shape == (*M.shape[:-2], k, M.shape[-1])
    assert (S[..., :-1] >= S[..., 1:]).all(), "S not descending"
    assert rel_err(S, Sr[..., :k]) <= tol_s, f"S: {rel_err(S, Sr[..., :k]):.3g} > {tol_s:.3g}"
    _check_orthonormal(U, Vh, tol_orth)
    assert _subspace_gap(U, Ur[..., :k]) <= tol_sub
    assert _subspace_gap(Vh.mT, Vhr[..., :k, :].mT) <= tol_sub


# --------------------------------------------------------------------------- torch path, fp64


@pytest.mark.parametrize("batch", [(), (3,), (2, 2)])
def test_decaying_spectrum_fp64(batch):
    # sigma_j = 0.6^j: full rank, no exact truncation. With k = 6, p = 6, q = 2 the error of
    # sigma_k shrinks like (sigma_13 / sigma_6)^(4q+2) = 0.6^70 ~ 1e-16: the 1e-5 bound is the
    # issue's; the subspace of the top 6 is well separated (sigma_7 / sigma_6 = 0.6).
    M = _with_spectrum(batch, 50, 37, 0.6 ** torch.arange(37, dtype=F64), seed=1)
    out = randomized_svd(M, 6, oversample=6, power_iters=2, generator=_gen(0))
    _check_against_svd(M, out, 6, tol_s=1e-5, tol_orth=1e-5, tol_sub=1e-5)


@pytest.mark.parametrize("q", [0, 2])
def test_exact_rank_k_is_exact(q):
    # rank(M) = k <= k + p: the sketch spans range(M) exactly, so the result is exact up to
    # rounding (fp64 table tolerance), with or without power iterations.
    s = torch.tensor([9.0, 5.0, 3.0, 2.0, 0.5], dtype=F64)
    M = _with_spectrum((4,), 40, 29, s, seed=2)
    out = randomized_svd(M, 5, oversample=4, power_iters=q, generator=_gen(1))
    _check_against_svd(M, out, 5, tol_s=REL_TOL[F64], tol_orth=1e-12, tol_sub=1e-8)
    U, S, Vh = out
    assert rel_err((U * S.unsqueeze(-2)) @ Vh, M) <= REL_TOL[F64]


def test_truncation_keeps_the_top_k():
    # rank 8, k = 3, p = 5: rank <= k + p, so the top 3 triplets are exact.
    s = torch.tensor([10.0, 7.0, 4.0, 2.0, 1.0, 0.5, 0.2, 0.1], dtype=F64)
    M = _with_spectrum((2,), 33, 45, s, seed=3)
    out = randomized_svd(M, 3, oversample=5, power_iters=2, generator=_gen(2))
    _check_against_svd(M, out, 3, tol_s=REL_TOL[F64], tol_orth=1e-12, tol_sub=1e-8)


def test_power_iterations_reduce_the_error():
    # A slowly decaying spectrum where q = 0 is visibly off and q = 3 is not.
    s = 1.0 / (1.0 + torch.arange(40, dtype=F64))
    M = _with_spectrum((), 60, 40, s, seed=4)
    Sr = torch.linalg.svdvals(M)[:4]
    errs = [rel_err(randomized_svd(M, 4, oversample=4, power_iters=q, generator=_gen(3))[1], Sr)
            for q in (0, 3)]
    assert errs[1] < errs[0] / 10, errs


def test_each_power_iteration_shrinks_the_error_by_the_fourth_power_of_the_gap():
    """The documented rate: one more power iteration multiplies the relative error of sigma_k by
    about (sigma_{l+1} / sigma_k)^4. Spectrum 0.7^j, k = p = 4: ratio 0.7^5, so ratio^4 = 8e-4;
    from q = 1 to q = 2 the median factor over 8 matrices measured 4.8e-4 here (6.5e-4 to 1.0e-3
    with 6 other seeds), well inside (ratio^5, ratio^3) and far from ratio^2 = 2.8e-2."""
    s = 0.7 ** torch.arange(60, dtype=F64)
    M = _with_spectrum((8,), 80, 60, s, seed=30)
    k, p = 4, 4
    ratio = (s[k + p] / s[k - 1]).item()
    Sr = torch.linalg.svdvals(M)[:, k - 1]
    err = [((randomized_svd(M, k, oversample=p, power_iters=q, generator=_gen(31))[1][:, k - 1]
             - Sr) / Sr).abs().median().item() for q in (1, 2)]
    assert ratio ** 5 < err[1] / err[0] < ratio ** 3, (err, ratio)


# --------------------------------------------------------------------------- low-rank products


@pytest.mark.parametrize("a_batched", [False, True])
def test_low_rank_product_matches_the_formed_product(a_batched):
    g = _gen(5)
    N, m, r, n = 3, 45, 6, 31
    B = torch.randn(N, m, r, generator=g, dtype=F64)
    A = torch.randn(*((N,) if a_batched else ()), r, n, generator=g, dtype=F64)
    out = randomized_svd((B, A), 6, oversample=2, power_iters=2, generator=_gen(4))
    _check_against_svd(B @ A, out, 6, tol_s=REL_TOL[F64], tol_orth=1e-12, tol_sub=1e-8)


def test_low_rank_product_rank_above_the_sketch():
    # r = 20 > k + p = 10, decaying spectrum: the randomized path proper, through (B, A).
    g = _gen(6)
    U, _ = torch.linalg.qr(torch.randn(2, 70, 20, generator=g, dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(2, 50, 20, generator=g, dtype=F64))
    s = 0.5 ** torch.arange(20, dtype=F64)
    B, A = U * s, V.mT
    out = randomized_svd((B, A), 5, oversample=5, power_iters=2, generator=_gen(5))
    _check_against_svd(B @ A, out, 5, tol_s=1e-5, tol_orth=1e-5, tol_sub=1e-5)


def test_product_is_never_formed(monkeypatch):
    # Every GEMM the product path runs has an r-sized or sketch-sized dimension.
    seen = []
    real = torch.matmul

    def spy(a, b):
        seen.append((tuple(a.shape), tuple(b.shape)))
        return real(a, b)

    monkeypatch.setattr(linalg.torch, "matmul", spy)
    B, A = torch.randn(2, 64, 4, dtype=F64), torch.randn(4, 48, dtype=F64)
    randomized_svd((B, A), 3, oversample=1, power_iters=1, generator=_gen(6))
    assert seen and all(min(a[-2:]) <= 4 or min(b[-2:]) <= 4 for a, b in seen), seen
    assert all(sorted(t[-2:]) != [48, 64] for pair in seen for t in pair), seen


@pytest.mark.parametrize("dtype", [torch.bfloat16, F64])
def test_a_shared_factor_stays_one_matrix(monkeypatch, dtype):
    """A [r, n] shared by every expert enters the GEMMs as a stride-0 view, also when the torch
    path casts a 16-bit input to fp32 (a cast after expand wrote one copy per expert)."""
    seen = []
    real = torch.matmul
    monkeypatch.setattr(linalg.torch, "matmul", lambda a, b: seen.append(a) or real(a, b))
    g = _gen(19)
    B, A = torch.randn(5, 40, 4, generator=g).to(dtype), torch.randn(4, 30, generator=g).to(dtype)
    out = randomized_svd((B, A), 3, oversample=2, power_iters=1, generator=_gen(20))  # l = 5
    monkeypatch.undo()
    shared = [a for a in seen if a.shape[-2:] in ((4, 30), (30, 4))]
    assert shared and all(a.stride(0) == 0 for a in shared)
    ref = torch.linalg.svdvals(B.double() @ A.double())[..., :3]
    assert rel_err(out[1], ref) <= (REL_TOL[F64] if dtype == F64 else REL_TOL[torch.float32])


def test_one_power_iteration_runs_once_the_sketch_spans_the_range(monkeypatch):
    # r = 4 <= l: the sketch spans range(B @ A) already, so q = 3 runs the GEMMs of q = 1;
    # r = 12 > l = 6: it does not, and q = 3 adds 6 passes (each with its Gram matrices).
    calls = []
    real = torch.matmul
    monkeypatch.setattr(linalg.torch, "matmul", lambda a, b: calls.append(1) or real(a, b))

    def count(r, q):
        calls.clear()
        B, A = torch.randn(2, 30, r, dtype=F64), torch.randn(r, 20, dtype=F64)
        randomized_svd((B, A), 3, oversample=3, power_iters=q, generator=_gen(16))
        return len(calls)

    assert count(4, 3) == count(4, 1) > count(4, 0)
    assert count(12, 3) > count(12, 1) > count(12, 0)


@pytest.mark.parametrize("operand,rank,spans", [
    ("dense", 20, False), ("dense", 6, True), ("product", 12, False), ("product", 6, True)])
def test_each_power_iteration_reorthonormalises_both_products(monkeypatch, operand, rank,
                                                              spans):
    """The documented range finder: orth(M Omega), then q rounds of Q <- orth(M orth(M^T Q)),
    then M^T Q = Z R: 2 + 2q orthonormalisations. When l = k + p reaches the rank bound (dense:
    min(m, n); product: min(m, n, r)) the sketch already spans range(M) and at most one round
    runs: l = 6 here, so n = 6 or r = 6 is that case (exactly at the bound), 20 and 12 are not.
    The results stay exact where rank(M) <= l."""
    calls = []
    real = linalg._orth
    monkeypatch.setattr(linalg, "_orth", lambda Y, gemm: calls.append(1) or real(Y, gemm))
    g = _gen(17)
    if operand == "dense":
        M = torch.randn(2, 30, rank, generator=g, dtype=F64)
        dense = M
    else:
        M = (torch.randn(2, 30, rank, generator=g, dtype=F64),
             torch.randn(rank, 20, generator=g, dtype=F64))
        dense = M[0] @ M[1]
    for q in (0, 1, 3):
        calls.clear()
        out = randomized_svd(M, 3, oversample=3, power_iters=q, generator=_gen(18))
        assert len(calls) == 2 + 2 * (min(q, 1) if spans else q), (q, len(calls))
        if spans:  # the sketch spans range(M): exact
            _check_against_svd(dense, out, 3, tol_s=REL_TOL[F64], tol_orth=1e-12, tol_sub=1e-8)


def test_a_sketch_spanning_the_range_is_exact_in_fp32_for_any_omega():
    """l = n: Omega is a square Gaussian, whose condition number (heavy-tailed: up to 5.5e3
    over these 400 draws) multiplied the rounding error of range(Q) while no power iteration
    ran (worst relative reconstruction error 8.4e-5 here; 1.5e-3 for the product, whose r = l);
    the one round brings both to torch.linalg.svd's in fp32 (1.1e-6, measured)."""
    g = _gen(40)
    M = torch.randn(400, 128, 16, generator=g)
    A = torch.randn(16, 64, generator=g)

    def rec(out, ref):
        U, S, Vh = (t.double() for t in out)
        return (torch.linalg.matrix_norm(ref - (U * S[..., None, :]) @ Vh)
                / torch.linalg.matrix_norm(ref)).max().item()

    floor = rec(torch.linalg.svd(M, full_matrices=False), M.double())
    assert rec(randomized_svd(M, 16, oversample=8, generator=_gen(41)), M.double()) <= 4 * floor
    P = M.double() @ A.double()
    assert rec(randomized_svd((M, A), 16, oversample=0, generator=_gen(41)), P) <= 4 * floor


# --------------------------------------------------------------------------- dtypes, generator


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_inputs_are_computed_in_fp32(dtype):
    # n = 12 = k + p: the sketch is full rank, so the error is fp32 rounding only, measured
    # against the SVD of the very values stored in `dtype`.
    M = _with_spectrum((2,), 40, 12, torch.linspace(3.0, 0.5, 12, dtype=F64), seed=7).to(dtype)
    U, S, Vh = randomized_svd(M, 6, oversample=6, power_iters=1, generator=_gen(7))
    assert S.dtype == U.dtype == Vh.dtype == torch.float32
    _check_against_svd(M.double(), (U, S, Vh), 6, tol_s=REL_TOL[torch.float32],
                       tol_orth=1e-5, tol_sub=1e-4)


def test_generator_makes_it_reproducible():
    M = _with_spectrum((2,), 30, 30, 0.8 ** torch.arange(30, dtype=F64), seed=8)
    a = randomized_svd(M, 4, oversample=2, power_iters=0, generator=_gen(11))
    b = randomized_svd(M, 4, oversample=2, power_iters=0, generator=_gen(11))
    c = randomized_svd(M, 4, oversample=2, power_iters=0, generator=_gen(12))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[1], c[1])  # q = 0 on a full-rank matrix: the sketch shows


def test_non_contiguous_input():
    M = _with_spectrum((3,), 26, 34, torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=F64), seed=9)
    Mt = M.mT  # [3, 34, 26], transposed strides
    out = randomized_svd(Mt, 4, oversample=2, power_iters=1, generator=_gen(8))
    _check_against_svd(Mt, out, 4, tol_s=REL_TOL[F64], tol_orth=1e-12, tol_sub=1e-8)


# --------------------------------------------------------------------------- CholeskyQR2


def test_orth_cholesky_qr2_and_its_householder_fallback():
    g = _gen(9)
    good = torch.randn(40, 8, generator=g, dtype=F64)
    rank_deficient = good[:, :3] @ torch.randn(3, 8, generator=g, dtype=F64)
    zero = torch.zeros(40, 8, dtype=F64)
    # cond 1e6: CholeskyQR2's own range (below u^(-1/2) = 7e7), where its second pass matters:
    # the first leaves R2 visibly off I, so R = R2 R1 (not R1 R2) is needed for Q R = Y.
    U, _ = torch.linalg.qr(torch.randn(40, 8, generator=g, dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=F64))
    ill = (U * torch.logspace(0, -6, 8, dtype=F64)) @ V.T
    Y = torch.stack([good, rank_deficient, zero, ill])
    Q, R = linalg._orth(Y, torch.matmul)
    assert (Q.mT @ Q - torch.eye(8, dtype=F64)).abs().max() <= 1e-12
    for y, q, r in zip(Y, Q, R):
        assert rel_err(q @ r, y) <= REL_TOL[F64]
    assert torch.allclose(R, R.triu())


def test_orth_falls_back_to_householder_past_the_first_pass_threshold():
    """Candidates with cond(Y) = 1e4 in fp32 (past CholeskyQR2's u^(-1/2) ~ 4e3): where both
    Cholesky factorisations succeed but the first pass leaves ||Q1^T Q1 - I||_F above the
    threshold, that element's Q, R are Householder QR's (torch.linalg.qr), exactly; where the
    first Cholesky fails, too. A well-conditioned element keeps CholeskyQR2 (R's diagonal > 0).
    Which candidates are past the threshold is computed here, as the first pass computes it."""
    g = _gen(21)
    m, l = 256, 16
    U, _ = torch.linalg.qr(torch.randn(8, m, l, generator=g, dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(8, l, l, generator=g, dtype=F64))
    Y = ((U * torch.logspace(0, -4, l, dtype=F64)) @ V.mT).float()
    Y = torch.cat([Y, torch.randn(1, m, l, generator=g)])  # + one well-conditioned element
    eye = torch.eye(l)
    R1, info1 = torch.linalg.cholesky_ex(Y.mT @ Y, upper=True)
    Q1 = torch.linalg.solve_triangular(R1, Y, upper=True, left=False)
    G2 = Q1.mT @ Q1
    _, info2 = torch.linalg.cholesky_ex(G2, upper=True)
    past = (info1 == 0) & (info2 == 0) & (torch.linalg.matrix_norm(G2 - eye) > 0.5)
    failed = info1 != 0
    assert past.sum() >= 2 and failed.sum() >= 1 and not (past | failed)[-1]
    Q, R = linalg._orth(Y, torch.matmul)
    Qh, Rh = torch.linalg.qr(Y[past | failed])
    assert torch.equal(Q[past | failed], Qh) and torch.equal(R[past | failed], Rh)
    assert (torch.diagonal(R[-1]) > 0).all()
    assert (Q.double().mT @ Q.double() - eye.double()).abs().max() <= 1e-5


@pytest.mark.parametrize("dtype, e", [(torch.float32, 66), (torch.float64, 540)])
def test_magnitude_alone_does_not_take_the_householder_fallback(monkeypatch, dtype, e):
    """A batch of matrices at 2^e, 1 and 2^-e (fp32: ~1e20 and ~1e-20, fp64: ~1e162 and
    ~1e-162), where the Gram matrix of the unscaled sketch overflows to inf or underflows: each
    element is scaled by a power of two before CholeskyQR2, so none falls back to Householder QR
    (the outer two did before), and each matches its fp64 SVD to rounding. Checked at unit scale
    (M and S times 2^-e, exact) as the fp64 norms of the check would overflow at 2^540."""
    # Rank 16 > l = 12, so the 12 x 12 block of the sketch with the top singular values is
    # padded by the tail and the sketch stays well conditioned (cond(Y) < 300 here).
    s = torch.cat([torch.linspace(1.0, 0.5, 12, dtype=F64), torch.full((4,), 1e-2, dtype=F64)])
    scale = 2.0 ** torch.tensor([e, 0, -e], dtype=F64)
    M = (_with_spectrum((3,), 60, 40, s, 24) * scale[:, None, None]).to(dtype)
    qr_calls, qr = [], torch.linalg.qr
    monkeypatch.setattr(torch.linalg, "qr", lambda Y: qr_calls.append(len(Y)) or qr(Y))
    U, S, Vh = randomized_svd(M, 4, oversample=8, power_iters=2, generator=_gen(25))
    assert not qr_calls, f"Householder QR of {sum(qr_calls)} batch elements"
    for i in range(3):
        _check_against_svd(M[i].double() / scale[i], (U[i], S[i].double() / scale[i], Vh[i]), 4,
                           tol_s=REL_TOL[dtype] * 10, tol_orth=REL_TOL[dtype] * 10,
                           tol_sub=REL_TOL[dtype] * 100)


def test_outputs_carry_no_gradient():
    """Not differentiable (documented): a rank-deficient sketch takes the Householder fallback,
    whose QR derivative does not exist (autograd gave NaN, and the fallback's in-place write
    failed backward before that); the outputs must not pretend otherwise."""
    g = _gen(11)
    M = _with_spectrum((), 8, 6, torch.tensor([3.0, 1.5], dtype=F64), 12).requires_grad_()
    B = torch.randn(2, 7, 3, generator=g, dtype=F64, requires_grad=True)
    A = torch.randn(2, 3, 5, generator=g, dtype=F64, requires_grad=True)
    for operand, k in ((M, 2), ((B, A), 3)):
        out = randomized_svd(operand, k, generator=_gen(13))
        assert not any(t.requires_grad for t in out)
        dense = operand if isinstance(operand, torch.Tensor) else B @ A
        assert rel_err(out[1], torch.linalg.svdvals(dense.detach())[..., :k]) <= 1e-12


def test_zero_matrix_gives_zero_singular_values():
    U, S, Vh = randomized_svd(torch.zeros(2, 20, 10), 3, generator=_gen(10))
    assert torch.equal(S, torch.zeros(2, 3))
    _check_orthonormal(U, Vh, 1e-6)


# --------------------------------------------------------------------------- Triton kernels


@pytest.mark.parametrize("P,L,Q", [(17, 33, 70), (5, 9, 130), (80, 70, 3), (16, 16, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_bmm_matches_torch(P, L, Q, dtype):
    # Odd sizes across the tile sizes, a transposed A, a batch-shared (stride-0) A.
    from mtlora_kernels.triton.rsvd import bmm

    g = _gen(P * L + Q)
    a = torch.randn(2, Q, P, generator=g).to(dtype).mT  # [2, P, Q], transposed strides
    x = torch.randn(2, Q, L, generator=g)
    ref = a.double() @ x.double()
    assert rel_err(bmm(a.to(TRITON_DEV), x.to(TRITON_DEV)), ref) <= REL_TOL[torch.float32]
    shared = torch.randn(P, Q, generator=g).to(dtype)
    out = bmm(shared.to(TRITON_DEV).expand(2, P, Q), x.to(TRITON_DEV))  # batch stride 0
    assert rel_err(out, shared.double() @ x.double()) <= REL_TOL[torch.float32]


def test_triton_bmm_launches_a_large_batch_in_chunks(monkeypatch):
    """CUDA refuses grid.z > 65535 (the interpreter does not): a batch of more matrices goes in
    several launches. Checked with the chunk made 2 over a batch of 5, shared A included."""
    from mtlora_kernels.triton import rsvd

    monkeypatch.setattr(rsvd, "_MAX_GRID_Z", 2)
    g = _gen(77)
    a, x = torch.randn(5, 9, 20, generator=g), torch.randn(5, 20, 6, generator=g)
    assert rel_err(rsvd.bmm(a.to(TRITON_DEV), x.to(TRITON_DEV)), a.double() @ x.double()) \
        <= REL_TOL[torch.float32]
    shared = torch.randn(9, 20, generator=g).expand(5, 9, 20)
    assert rel_err(rsvd.bmm(shared.to(TRITON_DEV), x.to(TRITON_DEV)),
                   shared.double() @ x.double()) <= REL_TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_randomized_svd(dtype, monkeypatch):
    from mtlora_kernels.triton import rsvd

    M = _with_spectrum((2,), 40, 24, 0.6 ** torch.arange(24, dtype=F64), seed=12).to(dtype)
    launched, matmuls = [], []
    real_bmm, real_matmul = rsvd.bmm, torch.matmul
    monkeypatch.setattr(rsvd, "bmm", lambda a, x: launched.append(1) or real_bmm(a, x))
    monkeypatch.setattr(torch, "matmul", lambda a, b: matmuls.append(1) or real_matmul(a, b))
    out = randomized_svd(M.to(TRITON_DEV), 4, oversample=4, power_iters=2, generator=_gen(13),
                         backend="triton")
    monkeypatch.undo()
    # Every GEMM of the method went through the kernel: sketch, 2 per power round, final
    # product, the Gram matrices (2 per orthonormalisation) and the two rotations.
    assert len(launched) == 2 + 2 * 2 + 2 * (2 + 2 * 2) + 2 and not matmuls
    out = tuple(t.cpu() for t in out)
    _check_against_svd(M.double(), out, 4, tol_s=REL_TOL[torch.float32], tol_orth=1e-5,
                       tol_sub=1e-4)
    ref = randomized_svd(M, 4, oversample=4, power_iters=2, generator=_gen(13), backend="torch")
    assert rel_err(out[1], ref[1]) <= REL_TOL[torch.float32]


def test_triton_low_rank_product():
    g = _gen(14)
    B, A = torch.randn(3, 36, 8, generator=g), torch.randn(8, 20, generator=g)
    out = randomized_svd((B.to(TRITON_DEV), A.to(TRITON_DEV)), 8, oversample=0, power_iters=0,
                         generator=_gen(15), backend="triton")
    out = tuple(t.cpu() for t in out)
    _check_against_svd((B @ A).double(), out, 8, tol_s=REL_TOL[torch.float32], tol_orth=1e-5,
                       tol_sub=1e-4)


def test_triton_bmm_over_an_empty_inner_dimension_is_zero(monkeypatch):
    """An empty sum is 0: Q = 0 gives zeros, not the uninitialised output (torch.empty is
    poisoned with NaN here, so that leftover memory cannot pass by chance)."""
    from mtlora_kernels.triton import rsvd

    a, x = torch.randn(2, 5, 0, device=TRITON_DEV), torch.randn(2, 0, 3, device=TRITON_DEV)
    real = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *s, **k: real(*s, **k).fill_(float("nan")))
    out = rsvd.bmm(a, x)
    monkeypatch.undo()
    assert torch.equal(out.cpu(), torch.zeros(2, 5, 3))


def test_auto_backend_is_triton_on_a_gpu_below_fp64_only(monkeypatch):
    """'auto': Triton on a CUDA tensor when it is available and M is not fp64, else torch (the
    documented rule; Triton computes in fp32). Availability is faked: no GPU is needed."""
    from mtlora_kernels import backends

    monkeypatch.setattr(backends, "available", lambda name, device: (True, ""))
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert linalg._resolve_backend("auto", cuda, dtype) == "triton"
        assert linalg._resolve_backend(None, cpu, dtype) == "torch"
    assert linalg._resolve_backend("auto", cuda, F64) == "torch"
    monkeypatch.setattr(backends, "available", lambda name, device: (False, "no triton"))
    assert linalg._resolve_backend("auto", cuda, torch.float32) == "torch"


def test_triton_backend_rejects_fp64():
    with pytest.raises(ValueError, match="float64"):
        randomized_svd(torch.randn(8, 8, dtype=F64, device=TRITON_DEV), 2, backend="triton")


def test_triton_kernel_is_registered_with_its_launch_configs():
    from mtlora_kernels.triton import registry, rsvd

    spec = registry.KERNELS["rsvd_bmm"]
    assert spec.uses_dot and set(spec.dtypes) == {"bf16", "fp16", "fp32"}
    picked = {rsvd.pick_config(P, L).label()
              for P in (1, 16, 17, 4096) for L in (1, 16, 17, 33, 200)}
    assert picked == {cfg.label() for cfg in spec.configs}
    for P in (1, 15, 16, 17, 64, 4096):  # the rule of pick_config's docstring, at its edges
        for L in (1, 16, 17, 32, 33, 64, 65, 200):
            c = rsvd.pick_config(P, L).constexprs
            assert c["BLOCK_P"] == (16 if P <= 16 else 64), (P, L)
            assert c["BLOCK_L"] == min(b for b in (16, 32, 64) if b >= min(L, 64)), (P, L)
    for cfg in spec.configs:  # every tl.dot operand dimension >= 16 (the compiler's rule)
        assert min(cfg.constexprs[k] for k in ("BLOCK_P", "BLOCK_L", "BLOCK_Q")) >= 16


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("call,exc,match", [
    (lambda: randomized_svd(torch.randn(5, 4), 5), ValueError, r"k must be .*\[1, 4\]"),
    (lambda: randomized_svd(torch.randn(5, 4), 0), ValueError, "k must be"),
    (lambda: randomized_svd(torch.randn(5), 1), ValueError, r"\[\.\.\., m, n\]"),
    (lambda: randomized_svd(torch.randn(5, 4), 2, oversample=-1), ValueError, "oversample"),
    (lambda: randomized_svd(torch.randn(50, 40), 2, power_iters=1.5), TypeError,
     "power_iters must be an integer, got float 1.5"),
    (lambda: randomized_svd(torch.randn(5, 4), 2, oversample=True), TypeError, "oversample"),
    (lambda: randomized_svd(torch.randn(5, 4), 2, generator=123), TypeError,
     "generator must be a torch.Generator"),
    (lambda: randomized_svd(torch.ones(5, 4, dtype=torch.int64), 2), TypeError, "floating"),
    (lambda: randomized_svd((torch.randn(5, 3), torch.randn(2, 4)), 2), ValueError,
     r"B \[\.\.\., m, r\] and A \[\.\.\., r, n\]"),
    (lambda: randomized_svd((torch.randn(2, 5, 3), torch.randn(3, 3, 4)), 2), ValueError,
     "broadcast"),
    (lambda: randomized_svd([torch.randn(5, 3), torch.randn(3, 4)], 2), TypeError, "tuple"),
    (lambda: randomized_svd(torch.randn(5, 4), 2, backend="cuda"), ValueError, "backend"),
])
def test_bad_input_is_named(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# k, oversample and power_iters take any integer type (numpy, a 0-d tensor), never a bool.
@pytest.mark.parametrize("value", [np.int64(2), torch.tensor(2)], ids=["np.int64", "tensor"])
def test_integer_arguments_of_any_integer_type_are_taken(value):
    M = torch.randn(9, 7, generator=torch.Generator().manual_seed(0), dtype=F64)
    want = randomized_svd(M, 2, 2, 2, generator=torch.Generator().manual_seed(1))
    got = randomized_svd(M, value, value, value, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("value", [True, np.True_, torch.tensor(True)],
                         ids=["bool", "np.bool", "bool-tensor"])
@pytest.mark.parametrize("name", ["k", "oversample", "power_iters"])
def test_bools_are_refused(name, value):
    with pytest.raises(TypeError, match=f"{name} must be an integer, got"):
        randomized_svd(torch.randn(5, 4), **{"k": 2, name: value})
