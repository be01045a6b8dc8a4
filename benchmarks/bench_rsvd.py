"""randomized_svd against torch.linalg.svd and torch.svd_lowrank, batched, fp32: time and the
relative error of the top-k singular values against an exact fp64 reference.

Cases: 16 dense 4096 x 16 matrices (the shape of an expert's B, k = 8), and 16 rank-16 products
B @ A of SIZE x SIZE (an expert update B_i A, k = 16). randomized_svd takes the product as the
tuple (B, A) and never forms it; the other providers (and ``randomized_svd[dense]``) get the
formed product, formed outside the timed region. Oversampling 8 and 2 power iterations asked of
both randomized methods, but not run alike: torch.svd_lowrank runs its 2 always, randomized_svd
one where its sketch (k + 8 columns) already spans the range, which is both cases here (the
dense matrices' rank bound is min(m, n) = 16 = k + 8, the product's r = 16 < k + 8), so it
makes 4 passes over the operand there to svd_lowrank's 6. ``randomized_svd[dense]`` sees the
formed SIZE x SIZE product, whose rank it cannot bound, and runs them. Run:

    pytest benchmarks/bench_rsvd.py --benchmark-only
    MTLORA_BENCH_RSVD_SIZE=4096 pytest benchmarks/bench_rsvd.py --benchmark-only

SIZE is 4096 on a GPU and 512 on the CPU by default (``MTLORA_BENCH_RSVD_SIZE`` overrides):
a full SVD of a 4096 x 4096 matrix takes tens of seconds on 2 CPU cores, times 16.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

from mtlora_kernels.linalg import randomized_svd

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SIZE = int(os.environ.get("MTLORA_BENCH_RSVD_SIZE", "4096" if DEVICE.type == "cuda" else "512"))
BATCH, OVERSAMPLE, POWER_ITERS = 16, 8, 2
# A randomized_svd result further than this from the exact singular values fails instead of
# being timed (fp32: the exact-rank cases here land near 1e-6).
MAX_REL_ERR = 1e-4


@functools.cache
def _case(name: str) -> dict:
    g = torch.Generator().manual_seed(0)
    if name == "dense":
        M = torch.randn(BATCH, 4096, 16, generator=g)
        ref = torch.linalg.svdvals(M.double())
        return {"label": f"{BATCH} x 4096x16 dense, k=8", "k": 8, "operand": M.to(DEVICE),
                "dense": M.to(DEVICE), "ref": ref}
    B = torch.randn(BATCH, SIZE, 16, generator=g)
    A = torch.randn(BATCH, 16, SIZE, generator=g) / SIZE ** 0.5
    # Exact singular values of B @ A from two QRs and a 16 x 16 SVD, in fp64.
    _, Rb = torch.linalg.qr(B.double())
    _, Ra = torch.linalg.qr(A.double().mT)
    ref = torch.linalg.svdvals(Rb @ Ra.mT)
    B, A = B.to(DEVICE), A.to(DEVICE)
    return {"label": f"{BATCH} x rank-16 product {SIZE}x{SIZE}, k=16", "k": 16,
            "operand": (B, A), "dense": B @ A, "ref": ref}


def _rsvd(case, dense=False):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    return randomized_svd(case["dense"] if dense else case["operand"], case["k"],
                          oversample=OVERSAMPLE, power_iters=POWER_ITERS, generator=gen)[1]


PROVIDERS = {
    "randomized_svd": _rsvd,
    "randomized_svd[dense]": lambda case: _rsvd(case, dense=True),
    "torch.svd_lowrank": lambda case: torch.svd_lowrank(
        case["dense"], q=case["k"] + OVERSAMPLE, niter=POWER_ITERS)[1],
    "torch.linalg.svd": lambda case: torch.linalg.svd(case["dense"], full_matrices=False)[1],
}
CASES = [("dense", p) for p in PROVIDERS if p != "randomized_svd[dense]"] + \
    [("product", p) for p in PROVIDERS]


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("case_name,provider", CASES, ids=[f"{c}-{p}" for c, p in CASES])
def test_rsvd(benchmark, case_name, provider):
    case = _case(case_name)
    fn = PROVIDERS[provider]
    k = case["k"]
    S = fn(case)[..., :k].double().cpu()
    ref = case["ref"][..., :k]
    err = ((S - ref).norm() / ref.norm()).item()
    if provider.startswith("randomized_svd") and not err <= MAX_REL_ERR:
        pytest.fail(f"{provider}: relative error of S {err:.3g} > {MAX_REL_ERR:g}")
    benchmark.group = case["label"]
    benchmark.extra_info.update(rel_err_S=err, device=str(DEVICE))

    def run():
        fn(case)
        _sync()

    # One full SVD of a 4096 x 4096 batch takes many seconds: few rounds, one warm-up.
    rounds = 2 if provider == "torch.linalg.svd" and case_name == "product" else 5
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
