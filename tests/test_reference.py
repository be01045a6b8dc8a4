"""The oracle against an independent, element-by-element loop in float64, against values
computed by hand, and its gradients against finite differences (gradcheck)."""

import itertools
import math

import pytest
import torch

from mtlora_kernels import mix
from mtlora_kernels.reference import (
    balance_loss_reference,
    hydralora_reference,
    mix_reference,
    routing_weights,
)


def naive_loop(x, A, B, W, groups, scaling, keep=None, p=0.0, L=None):
    """SPEC section 2 per token, per output column: no batching, no repeat_interleave.
    ``L``: external logits [T, g*N] in place of the router ``W @ x``."""
    T, d_in = x.shape
    N, d_out, r = B.shape
    c = d_out // groups
    y = torch.zeros(T, d_out, dtype=torch.float64)
    for t in range(T):
        xd = x[t] if keep is None else torch.where(keep[t], x[t] / (1 - p), torch.zeros(()))
        h = [sum(A[k, i] * xd[i] for i in range(d_in)) for k in range(r)]
        z = (W @ x[t] if L is None else L[t]).view(groups, N)
        pi = torch.exp(z - z.max(-1, keepdim=True).values)
        pi = pi / pi.sum(-1, keepdim=True)
        for j, e in itertools.product(range(d_out), range(N)):
            y[t, j] += scaling * pi[j // c, e] * sum(B[e, j, k] * h[k] for k in range(r))
    return y


@pytest.mark.parametrize("groups", [1, 2, 6])
@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("external", [False, True])
def test_reference_matches_naive_loop(groups, dropout, external):
    g = torch.Generator().manual_seed(100 + groups)
    T, d_in, d_out, r, N = 5, 7, 6, 3, 4
    x = torch.randn(T, d_in, dtype=torch.float64, generator=g)
    A = torch.randn(r, d_in, dtype=torch.float64, generator=g)
    B = torch.randn(N, d_out, r, dtype=torch.float64, generator=g)
    W = torch.randn(groups * N, d_in, dtype=torch.float64, generator=g)
    L = 3 * torch.randn(T, groups * N, dtype=torch.float64, generator=g) if external else None
    p = 0.3 if dropout else 0.0
    keep = torch.rand(T, d_in, generator=g) >= p if dropout else None
    y = mix_reference(x, A, B, None if external else W, logits=L, groups=groups, scaling=1.7,
                      dropout_mask=keep, dropout_p=p)
    torch.testing.assert_close(y, naive_loop(x, A, B, W, groups, 1.7, keep, p, L),
                               rtol=1e-12, atol=1e-12)


# T = 1, d_in = 2, r = 1, N = 2, g = 2 (c = 2), s = 2. x = [1, 2], A = [1, 1]: h = 3, or 2 with
# x[1] dropped at p = 0.5 (x[0] / 0.5). The router rows G*N + e read only x[0] = 1, so the
# logits are z = [ln 3, 0 | ln 3, ln 9] with or without dropout: pi = [3/4, 1/4 | 1/4, 3/4].
# Columns j = 0, 1 are group 0, j = 2, 3 group 1: y[j] = s * h * sum_e pi[j // 2, e] * B[e, j]
# = s * h * [3/4 + 5/4, 6/4 + 6/4, 3/4 + 21/4, 4/4 + 24/4] = s * h * [2, 3, 6, 7].
HAND_Z = [math.log(3), 0.0, math.log(3), math.log(9)]


@pytest.mark.parametrize("external", [False, True])
@pytest.mark.parametrize("dropout", [False, True])
def test_reference_hand_computed_values(external, dropout):
    x = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    A = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    B = torch.tensor([[[1.0], [2.0], [3.0], [4.0]], [[5.0], [6.0], [7.0], [8.0]]],
                     dtype=torch.float64)
    W = torch.tensor([[z, 0.0] for z in HAND_Z], dtype=torch.float64)
    keep = torch.tensor([[True, False]]) if dropout else None
    # Given both, the external logits are used ("instead of route_weight"): a router that
    # would give other weights must not count.
    route, logits = (-W, torch.tensor([HAND_Z], dtype=torch.float64)) if external else (W, None)
    y = mix_reference(x, A, B, route, logits=logits, groups=2, scaling=2.0, dropout_mask=keep,
                      dropout_p=0.5 if dropout else 0.0)
    h = 2.0 if dropout else 3.0
    want = torch.tensor([[2.0, 3.0, 6.0, 7.0]], dtype=torch.float64) * 2.0 * h
    torch.testing.assert_close(y, want, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("external", [False, True])
def test_reference_gradients_pass_gradcheck(external):
    """The oracle's gradients are what every backend's backward is compared with: they must be
    the true derivatives of its forward (dropout on, groups > 1), in every input."""
    g = torch.Generator().manual_seed(7)
    T, d_in, d_out, r, N, groups, p = 3, 5, 4, 2, 3, 2, 0.4

    def leaf(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=g).requires_grad_()

    x, A, B = leaf(T, d_in), leaf(r, d_in), leaf(N, d_out, r)
    route = leaf(T, groups * N) if external else leaf(groups * N, d_in)
    keep = torch.rand(T, d_in, generator=g) >= p

    def f(x, A, B, route):
        W, L = (None, route) if external else (route, None)
        return mix_reference(x, A, B, W, logits=L, groups=groups, scaling=1.5,
                             dropout_mask=keep, dropout_p=p)

    assert torch.autograd.gradcheck(f, (x, A, B, route))


def test_reference_g1_is_hydralora_semantics():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 8, dtype=torch.float64, generator=g)
    A = torch.randn(4, 8, dtype=torch.float64, generator=g)
    B = torch.randn(3, 9, 4, dtype=torch.float64, generator=g)
    W = torch.randn(3, 8, dtype=torch.float64, generator=g)
    ours = mix_reference(x, A, B, W, groups=1, scaling=0.5)
    torch.testing.assert_close(ours, hydralora_reference(x, A, B, W, scaling=0.5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_hydralora_reference_rounds_pi_to_x_dtype(dtype):
    """HydraLoRA computes its softmax in fp32 and casts pi to x's dtype before weighing the
    experts. One token, x = 1, A = B_0 = 1, B_1 = 0: the delta is pi_0 = sigmoid(a) exactly
    as x's dtype rounds it (the fp32 value is not representable there)."""
    a = 0.3
    x = torch.ones(1, 1, dtype=dtype)
    A = torch.ones(1, 1, dtype=dtype)
    B = torch.tensor([[[1.0]], [[0.0]]], dtype=dtype)
    W = torch.tensor([[a], [0.0]], dtype=dtype)
    pi0 = torch.sigmoid(W[0, 0].float())
    assert pi0.to(dtype).float() != pi0
    out = hydralora_reference(x, A, B, W, scaling=1.0)
    assert out.dtype == dtype and out.item() == pi0.to(dtype).item()


@pytest.mark.parametrize("kw,pattern", [
    ({"groups": 3}, "positive divisor of d_out=8"),
    ({"groups": 0}, "positive divisor"),
    ({"route": None}, "N=2 experts need"),
])
def test_reference_refuses_what_mix_refuses(kw, pattern):
    """Where the formula is undefined the oracle raises, as ``mix`` does, instead of computing
    something: g not dividing d_out (c = d_out // g would drop columns), N > 1 experts without
    a router (pi = 1 would sum them). (Given both a router and logits, the oracle uses the
    logits: test_reference_hand_computed_values.)"""
    g = torch.Generator().manual_seed(5)
    x, A = torch.randn(3, 4, generator=g), torch.randn(2, 4, generator=g)
    B, W = torch.randn(2, 8, 2, generator=g), torch.randn(2, 4, generator=g)
    route, groups = kw.get("route", W), kw.get("groups", 1)
    with pytest.raises(ValueError, match=pattern):
        mix_reference(x, A, B, route, groups=groups)
    with pytest.raises(ValueError):
        mix(x, A, B, route, groups=groups)


def test_reference_plain_lora_when_one_expert():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 8, dtype=torch.float64, generator=g)
    A = torch.randn(2, 8, dtype=torch.float64, generator=g)
    B = torch.randn(1, 5, 2, dtype=torch.float64, generator=g)
    torch.testing.assert_close(mix_reference(x, A, B, scaling=3.0), 3.0 * x @ A.T @ B[0].T)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_routing_weights_promote_low_precision_logits_to_fp32(dtype):
    """The oracle's own promise (SPEC section 3): the softmax runs on fp32 logits, never on
    the input dtype. With bf16 / fp16 inputs the reference in that dtype is the plain-PyTorch
    baseline of the 2x rule, so a softmax in bf16 would loosen every such tolerance."""
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(5, 2 * 3, generator=gen) * 30).to(dtype)
    pi = routing_weights(logits, 2, 3)
    assert pi.dtype == torch.float32 and pi.shape == (5, 2, 3)
    want = torch.softmax(logits.double().view(5, 2, 3), -1)  # exact on the same values
    torch.testing.assert_close(pi.double(), want, rtol=1e-6, atol=1e-7)
    if dtype != torch.float32:  # the check can tell: a softmax in the input dtype is far off
        assert (torch.softmax(logits.view(5, 2, 3), -1).double() - want).abs().max() > 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_router_logits_stay_fp32_in_low_precision(dtype):
    """In fp16 / bf16 the oracle is the plain-PyTorch baseline of the 2x rule: its logits are
    accumulated in fp32 (SPEC section 3), and y comes back in x's dtype. Logits of 1000 + O(1)
    rounded to bf16 (steps of 4 there) or fp16 (0.5) scramble pi: y off by ~35% in bf16."""
    gen = torch.Generator().manual_seed(11)
    T, d_in, d_out, r, N, g = 16, 8, 8, 4, 4, 2
    x = torch.randn(T, d_in, generator=gen)
    W = torch.randn(g * N, d_in, generator=gen)
    x[:, 0], W[:, 0] = 1.0, 1000.0  # exact in both dtypes
    x, W = x.to(dtype), W.to(dtype)
    A = torch.randn(r, d_in, generator=gen).to(dtype)
    B = torch.randn(N, d_out, r, generator=gen).to(dtype)
    y = mix_reference(x, A, B, W, groups=g, scaling=2.0)
    y64 = mix_reference(*(t.double() for t in (x, A, B, W)), groups=g, scaling=2.0)
    assert y.dtype == dtype
    assert (y.double() - y64).norm() / y64.norm() < 0.02


def test_balance_loss_hand_computed_value():
    """p = mean of pi over tokens and groups = [1/2, 1/4, 1/4]; unbiased var(p) = 1/48,
    mean(p)^2 = 1/9: L = 9/48 = 3/16."""
    pi = torch.tensor([[[0.75, 0.125, 0.125], [0.5, 0.25, 0.25]],
                       [[0.25, 0.375, 0.375], [0.5, 0.25, 0.25]]], dtype=torch.float64)
    want = torch.tensor(3 / 16, dtype=torch.float64)
    torch.testing.assert_close(balance_loss_reference(pi), want, rtol=1e-8, atol=0)


def test_routing_weights_hand_values_near_1e4():
    """Per group, over experts, row G*N + e: z = [1e4, 1e4 - ln 3 | -1e4, -1e4 + ln 3] gives
    pi = [3/4, 1/4 | 1/4, 3/4]; a softmax not shifted by its max overflows or underflows here."""
    z = torch.tensor([[1e4, 1e4 - math.log(3), -1e4, -1e4 + math.log(3)]], dtype=torch.float64)
    want = torch.tensor([[[0.75, 0.25], [0.25, 0.75]]], dtype=torch.float64)
    torch.testing.assert_close(routing_weights(z, 2, 2), want, rtol=1e-9, atol=0)
