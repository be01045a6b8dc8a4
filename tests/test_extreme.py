"""Extreme values: huge and masked router logits, non-finite inputs, huge scaling, r = 1.

Non-finite policy (one rule, the one ``mtlora_kernels/ops/mix.py`` implements):

* Router logits are checked at the boundary: NaN or +inf in external ``logits`` raises
  ``ValueError``; -inf is allowed and masks that expert (its weight is exactly 0).
* Everything else propagates as the reference computes it (IEEE arithmetic, no check, no
  repair): NaN / Inf in x, lora_A, lora_B, route_weight or residual, and a group whose experts
  are all -inf (0/0 in the softmax), give NaN / Inf at exactly the outputs where
  :func:`mtlora_kernels.reference.mix_reference` has them, and correct values elsewhere.

The routing weights come from a max-subtracted softmax of fp32 logits, so logits up to +-1e4 in
fp16 / bf16 / fp32, from external logits or from a fused router with large weights, give finite
weights equal to the fp64 softmax of the same values.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, REL_TOL, assert_close_to_reference, backend_params, rel_err

from mtlora_kernels.ops.mix import mix
from mtlora_kernels.reference import mix_reference, routing_weights

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BACKENDS = backend_params()
# dx's router term dz·W_route: softmax gradients sum to 0 over a group's experts, so the part of
# W_route shared by a group's rows cancels exactly in dx only if dz is not rounded to the input
# dtype first. Both backends once rounded it (dx off by 22% / 100% in fp16 / bf16 at logits of
# ~1e4); test_fused_router_with_large_weights keeps them honest.
BACKEND_DTYPES = [
    pytest.param(b.values[0], dt, id=f"{b.id}-{str(dt).split('.')[-1]}", marks=b.marks)
    for b in BACKENDS for dt in DTYPES
]
T, D_IN, D_OUT, R, N, G = 13, 24, 32, 4, 4, 2


def _inputs(dtype, *, seed, b_scale=1.0, x_scale=1.0, r=R, n=N):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D_IN, generator=gen, dtype=torch.float64) * x_scale
    A = torch.randn(r, D_IN, generator=gen, dtype=torch.float64) / D_IN**0.5
    B = torch.randn(n, D_OUT, r, generator=gen, dtype=torch.float64) / r**0.5 * b_scale
    return [t.to(dtype) for t in (x, A, B)], gen


def _routing(v, groups, n):
    """The reference's routing weights (fp32 logits for low-precision inputs, as it computes)."""
    if "logits" in v:
        return routing_weights(v["logits"].detach(), groups, n)
    if "W" in v:
        acc = torch.promote_types(v["x"].dtype, torch.float32)
        return routing_weights(v["x"].detach().to(acc) @ v["W"].detach().to(acc).T, groups, n)
    return torch.ones(*v["x"].shape[:-1], groups, 1, dtype=torch.float64)


def _compare(backend, inputs: dict, *, groups=G, scaling=2.0, dy_scale=1.0, what="",
             unscored=()):
    """Run the op on ``inputs`` (x, A, B and W or logits) and check y, pi and the gradient of
    every input: finite, and within the table's tolerance of the fp64 run, or within 2x the
    error of the reference run in the same dtype (plain PyTorch) where that is larger and
    finite (conftest.baseline_tolerance). Inputs named in ``unscored`` only have their gradient
    checked for finiteness. The upstream gradient is standard normal times ``dy_scale``.
    Returns the backend's routing weights and gradients (on CPU)."""
    dtype = inputs["x"].dtype
    n = inputs["B"].shape[0]

    def run(fn, cast, device="cpu"):
        v = {k: t.detach().to(device, cast(t)).requires_grad_() for k, t in inputs.items()}
        y = fn(v["x"], v["A"], v["B"], v.get("W"), logits=v.get("logits"), groups=groups,
               scaling=scaling)
        return (y[0], y[1], v) if isinstance(y, tuple) else (y, _routing(v, groups, n), v)

    def ours(*args, **kw):
        return mix(*args, **kw, backend=backend, return_routing=True)

    y, pi, v = run(ours, lambda t: t.dtype, DEVICE)
    y64, pi64, v64 = run(mix_reference, lambda t: torch.float64)
    yb, pib, vb = run(mix_reference, lambda t: t.dtype)
    assert torch.isfinite(y).all() and torch.isfinite(pi).all(), f"{what}: non-finite output"
    assert_close_to_reference(pi, pi64, torch.float32, f"{what} pi", pib)
    assert_close_to_reference(y, y64, dtype, f"{what} y", yb)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    dy = dy * dy_scale
    dy = dy.to(dtype).double()  # the upstream gradient as the backend receives it
    names = list(v)
    got, want, base = [torch.autograd.grad(out, [vv[k] for k in names],
                                           dy.to(out.device, out.dtype))
                       for out, vv in ((y, v), (y64, v64), (yb, vb))]
    for name, a, b, bb in zip(names, got, want, base):
        assert torch.isfinite(a).all(), f"{what}: non-finite gradient of {name}"
        if name not in unscored:
            assert_close_to_reference(a, b, dtype, f"{what} d{name}", bb)
    return pi.cpu(), {k: g.cpu() for k, g in zip(names, got)}


# --------------------------------------------------------------------------------------------
# Huge and masked router logits.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_external_logits_1e4_and_masked_experts(backend, dtype):
    (x, A, B), gen = _inputs(dtype, seed=1)
    # Per (token, group) a shared offset of +-1e4 plus a spread of up to 40: the softmax is not
    # saturated, and exp() of the raw logits would overflow in any float format.
    offset = torch.where(torch.rand(T, G, 1, generator=gen) < 0.5, -1e4, 1e4)
    logits = offset + 40 * torch.rand(T, G, N, generator=gen)
    masked = torch.rand(T, G, N, generator=gen) < 0.3
    masked[..., 0] = False  # at least one live expert per group
    logits = logits.masked_fill(masked, float("-inf")).view(T, G * N).to(dtype)
    pi, grads = _compare(backend, dict(x=x, A=A, B=B, logits=logits), what=f"{backend} {dtype}")
    assert bool((pi[masked] == 0).all()), "a masked (-inf) expert got a non-zero weight"
    torch.testing.assert_close(pi.sum(-1), torch.ones(T, G), rtol=0, atol=1e-6)
    assert bool((grads["logits"].view(T, G, N)[masked] == 0).all()), \
        "a masked expert's logit got a gradient"


def _large_router_inputs(dtype):
    (x, A, B), gen = _inputs(dtype, seed=2)
    # Each group's rows share one large direction (logits offset by up to ~+-1e4 per token and
    # group) plus their own small part (a spread of a few units): large but not saturated.
    big = torch.randn(G, 1, D_IN, generator=gen) * 3e3 / D_IN**0.5
    W = (big + torch.randn(G, N, D_IN, generator=gen) * 2 / D_IN**0.5).view(G * N, D_IN)
    W = W.to(dtype)
    assert (x.double() @ W.double().T).abs().max() > 5e3  # the logits really are that big
    return dict(x=x, A=A, B=B, W=W)


@pytest.mark.parametrize("scaling", [2.0, 1e-5])
@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
def test_router_offset_shared_by_a_group_cancels_in_dx(backend, dtype, scaling):
    """A group's router rows equal in most columns (an offset of every expert's logit, which
    the softmax does not see) and different in a few: in dx = dz . W_route the shared columns
    cancel exactly only with dz's full fp32 bits, here far more sharply than in
    test_fused_router_with_large_weights, whose shared direction bf16 rounding blurs into the
    rows' own parts. Measured on the emulated cuda backend: in bf16, dx 5.1e-3 off with dz in
    three 16-bit pieces, 0.13 with two (tolerance 3e-2; torch 4.4e-3, plain PyTorch 8.5e-3).
    At scaling 1e-5 every gradient is tiny, so in fp16 the lower pieces of dz need their
    2^11 lift out of the subnormal range (csrc lo_scale): 2.8e-3 off with it, 0.19 with 2^4
    (tolerance 1.1e-2)."""
    (x, A, B), gen = _inputs(dtype, seed=3)
    c = 1e4 if dtype == torch.float16 else 3e4  # the shared columns' scale (fp16: below 65504)
    W = torch.zeros(G, N, D_IN, dtype=torch.float64)
    W[:, :, :4] = torch.randn(G, N, 4, generator=gen, dtype=torch.float64)  # the routing
    W[:, :, 4:] = c * torch.randn(G, 1, D_IN - 4, generator=gen, dtype=torch.float64)
    W = W.view(G * N, D_IN).to(dtype)
    assert torch.isfinite(W).all()
    _compare(backend, dict(x=x, A=A, B=B, W=W), scaling=scaling, what=f"{backend} {dtype}")


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
def test_fused_router_with_large_weights(backend, dtype):
    _compare(backend, _large_router_inputs(dtype), what=f"{backend} {dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_saturated_fused_router(backend, dtype):
    (x, A, B), gen = _inputs(dtype, seed=2)
    # Unrelated rows of norm ~1e4: logit gaps of thousands, the weights are one-hot.
    W = (torch.randn(G * N, D_IN, generator=gen) * 1e4 / D_IN**0.5).to(dtype)
    # dW_route is only checked for finiteness: its exact value is ~1e-90 (measured), the
    # exp(-gap) of the losing experts, far below fp32's range; every backend returns 0.
    pi, _ = _compare(backend, dict(x=x, A=A, B=B, W=W), what=f"{backend} {dtype}",
                     unscored=("W",))
    assert ((pi == 0) | (pi == 1)).float().mean() > 0.9


@pytest.mark.parametrize("backend", BACKENDS)
def test_confident_router_gradient_keeps_fp32_accuracy(backend):
    """A confident router (one expert per group ~9 logits ahead: pi_max = 0.9996): dlogits =
    pi * (dpi - sum pi dpi) is ~(1 - pi_max) times dpi, and the plain formula loses
    u * |dpi| / |dz| ~ 1e-4 of it in fp32, because the rounded pi do not sum to 1. Every
    backend shifts dpi by its value at the largest pi first (ops.mix.softmax_backward) and must
    keep the fp32 table's tolerance, which plain PyTorch (autograd's softmax backward) misses."""
    (x, A, B), gen = _inputs(torch.float32, seed=3)
    top = torch.randint(0, N, (T, G, 1), generator=gen)
    logits = torch.randn(T, G, N, generator=gen).scatter_add(-1, top, torch.full((T, G, 1), 9.0))
    logits = logits.view(T, G * N)
    dy = torch.randn(T, D_OUT, generator=gen)

    def dlogits(backend_or_ref, dtype, device="cpu"):
        v = [t.to(device, dtype).requires_grad_() for t in (x, A, B, logits)]
        if backend_or_ref is None:
            y = mix_reference(v[0], v[1], v[2], None, logits=v[3], groups=G, scaling=2.0)
        else:
            y = mix(v[0], v[1], v[2], logits=v[3], groups=G, scaling=2.0, backend=backend_or_ref)
        (g,) = torch.autograd.grad(y, [v[3]], dy.to(device, dtype))
        return g.cpu().double()

    exact = dlogits(None, torch.float64)
    plain = rel_err(dlogits(None, torch.float32), exact)
    assert plain > 5 * REL_TOL[torch.float32], f"the case does not cancel (plain {plain:.2g})"
    err = rel_err(dlogits(backend, torch.float32, DEVICE), exact)
    assert err <= REL_TOL[torch.float32], f"{backend}: dlogits {err:.3g} off (plain {plain:.3g})"


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy in Triton's interpreter on inf
@pytest.mark.parametrize("backend", BACKENDS)
def test_infinite_dpi_of_the_top_expert_propagates_as_unshifted(backend):
    """The softmax backward's shift is skipped where it is not finite: an expert whose output
    overflows (dpi = +inf) at the largest pi gives NaN at its own logit and -inf at the others,
    as plain PyTorch's softmax backward does, not NaN for the whole group."""
    (x, A, B), gen = _inputs(torch.float32, seed=4)
    x, A = x.abs(), A.abs()  # h > 0, so B_0 = 1e38 overflows its expert's output to +inf
    B = B.clone()
    B[0] = 1e38
    logits = torch.randn(T, G * N, generator=gen)
    logits.view(T, G, N)[..., 0] += 9.0  # expert 0 has the largest weight in every group
    dy = torch.rand(T, D_OUT, generator=gen) + 0.1  # > 0: dpi_0 = +inf, not inf - inf

    def dlogits(fn, device):
        v = [t.to(device).requires_grad_() for t in (x, A, B, logits)]
        y = fn(v[0], v[1], v[2], None, logits=v[3], groups=G, scaling=2.0)
        return torch.autograd.grad(y, [v[3]], dy.to(device))[0].cpu()

    plain = dlogits(mix_reference, "cpu")
    got = dlogits(lambda *a, **k: mix(*a, **k, backend=backend), DEVICE)
    assert plain.view(T, G, N)[..., 0].isnan().all() and (plain.view(T, G, N)[..., 1:] ==
                                                          float("-inf")).all()
    assert torch.equal(got.isnan(), plain.isnan()) and torch.equal(got.isinf(), plain.isinf())
    assert torch.equal(got[got.isinf()], plain[plain.isinf()])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_router_logits_stay_fp32_near_1e3(backend, dtype):
    """SPEC section 3: logits of ~1e3 from low-precision inputs must not be rounded to the input
    dtype before the softmax (bf16 spacing at 1e3 is 8, fp16's is 0.5: the weights would be
    off by tens of percent)."""
    (x, A, B), gen = _inputs(dtype, seed=3)
    x[:, 0] = 1.0
    W = torch.randn(G * N, D_IN, generator=gen) * 0.3
    W[:, 0] = 1000.0  # exact in fp16 and bf16: every logit is 1000 + O(1)
    W = W.to(dtype)
    z64 = x.double() @ W.double().T
    assert z64.min() > 990
    rounded = routing_weights(z64.to(dtype), G, N)  # what rounding the logits would give
    assert rel_err(rounded, routing_weights(z64, G, N)) > 10 * REL_TOL[dtype], \
        "the test cannot tell the two apart"
    _compare(backend, dict(x=x, A=A, B=B, W=W), what=f"{backend} {dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_hot_task_routing_with_minus_inf(backend):
    """Task-id routing as logits 0 / -inf selects exactly one expert per group."""
    (x, A, B), gen = _inputs(torch.float32, seed=4)
    task = torch.randint(0, N, (T, G), generator=gen)
    logits = torch.full((T, G, N), float("-inf"))
    logits.scatter_(-1, task.unsqueeze(-1), 0.0)
    dev = DEVICE
    y = mix(x.to(dev), A.to(dev), B.to(dev), logits=logits.view(T, G * N).to(dev), groups=G,
            scaling=1.5, backend=backend)
    c = D_OUT // G
    per_expert = torch.einsum("ti,ri,ejr->tej", x.double(), A.double(), B.double()) * 1.5
    want = torch.stack([per_expert[t, task[t, j // c], j] for t in range(T)
                        for j in range(D_OUT)]).view(T, D_OUT)
    assert_close_to_reference(y, want, torch.float32, f"{backend} one-hot y")


# --------------------------------------------------------------------------------------------
# The non-finite policy.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_plus_inf_logits_are_rejected(bad):
    (x, A, B), _ = _inputs(torch.float32, seed=5)
    logits = torch.randn(T, G * N)
    logits[3, 2] = bad
    with pytest.raises(ValueError, match=r"logits contain NaN or \+inf"):
        mix(x, A, B, logits=logits, groups=G)


def _same_nonfinite_pattern(y, y64, what):
    """NaN where the reference has NaN, +-inf where it has +-inf, close elsewhere."""
    y, y64 = y.double(), y64.double()
    assert torch.equal(torch.isnan(y), torch.isnan(y64)), f"{what}: NaN pattern differs"
    assert torch.equal(torch.isposinf(y), torch.isposinf(y64)), f"{what}: +inf pattern"
    assert torch.equal(torch.isneginf(y), torch.isneginf(y64)), f"{what}: -inf pattern"
    fin = torch.isfinite(y64)
    assert fin.any() and not fin.all(), f"{what}: the case should mix finite and non-finite"
    return fin


def _poisoned_case(where, bad, dtype, gen):
    (x, A, B), _ = _inputs(dtype, seed=6)
    W = (torch.randn(G * N, D_IN, generator=gen) / D_IN**0.5).to(dtype)
    residual = torch.randn(T, D_OUT, generator=gen).to(dtype)
    logits = None
    if where == "x":
        x[4, 5] = bad
    elif where == "lora_B":
        B[1, 7, 2] = bad
    elif where == "route_weight":
        W[3, 9] = bad
    elif where == "residual":
        residual[2, 11] = bad
    elif where == "masked_group":  # every expert of group 1 of token 8 masked
        logits = torch.randn(T, G, N, generator=gen)
        logits[8, 1, :] = float("-inf")
        logits, W = logits.view(T, G * N), None
    return x, A, B, W, logits, residual


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy in Triton's interpreter on NaN
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("where,bad", [
    *[(w, v) for w in ("x", "lora_B", "route_weight", "residual")
      for v in (float("nan"), float("inf"))],
    ("masked_group", None),
])
def test_nonfinite_inputs_propagate_like_the_reference(backend, dtype, where, bad):
    gen = torch.Generator().manual_seed(8)
    x, A, B, W, logits, residual = _poisoned_case(where, bad, dtype, gen)
    dev = DEVICE
    y = mix(*(t.to(dev) if t is not None else None for t in (x, A, B, W)),
            logits=logits.to(dev) if logits is not None else None, residual=residual.to(dev),
            groups=G, scaling=2.0, backend=backend).cpu()
    y64 = mix_reference(x.double(), A.double(), B.double(),
                        W.double() if W is not None else None,
                        logits=logits.double() if logits is not None else None, groups=G,
                        scaling=2.0) + residual.double()
    fin = _same_nonfinite_pattern(y, y64, f"{backend} {dtype} {where}")
    assert_close_to_reference(y.double()[fin], y64[fin], dtype, f"{backend} finite part")


# --------------------------------------------------------------------------------------------
# Huge scaling and rank 1.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,scaling,b_scale", [
    (torch.float32, 1e30, 1e-30),  # s near fp32's top, B near its bottom: y = O(1)
    (torch.float32, -1e4, 1e-3),
    (torch.float16, 1e4, 1e-3),  # every value and gradient < 65504 with room to spare
    (torch.bfloat16, -1e4, 1e-3),
])
@pytest.mark.parametrize("r,n", [(1, 1), (1, N)])
def test_huge_scaling_and_rank_one_stay_finite(backend, dtype, scaling, b_scale, r, n):
    (x, A, B), gen = _inputs(dtype, seed=9, b_scale=b_scale, x_scale=1e-2, r=r, n=n)
    inputs = dict(x=x, A=A, B=B)
    if n > 1:
        inputs["W"] = (torch.randn(G * n, D_IN, generator=gen) / D_IN**0.5).to(dtype)
    y64 = mix_reference(*(t.double() for t in inputs.values()), groups=G, scaling=scaling)
    assert y64.abs().max() > 1e-2, "the case should not be trivially small"
    _compare(backend, inputs, scaling=scaling, what=f"{backend} {dtype} s={scaling}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("groups", [G, 8])  # g*N*r = 32 <= d_out: the grouped form; 128: not
def test_huge_scaling_with_a_large_upstream_gradient(backend, groups):
    """s = 1e30 and |dy| ~ 1e9: s * dy is past fp32's range, every gradient within it. The
    torch backend's per-expert form once multiplied dy by s before its sums: all NaN."""
    (x, A, B), gen = _inputs(torch.float32, seed=9, b_scale=1e-30, x_scale=1e-2)
    W = torch.randn(groups * N, D_IN, generator=gen) / D_IN**0.5
    _compare(backend, dict(x=x, A=A, B=B, W=W), groups=groups, scaling=1e30, dy_scale=1e9,
             what=f"{backend} g={groups}")
