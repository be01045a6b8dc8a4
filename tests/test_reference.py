"""The oracle against an independent, element-by-element loop in float64."""

import itertools

import pytest
import torch

from mtlora_kernels.reference import hydralora_reference, mix_reference, routing_weights


def naive_loop(x, A, B, W, groups, scaling, keep=None, p=0.0):
    """SPEC section 2 per token, per output column: no batching, no repeat_interleave."""
    T, d_in = x.shape
    N, d_out, r = B.shape
    c = d_out // groups
    y = torch.zeros(T, d_out, dtype=torch.float64)
    for t in range(T):
        xd = x[t] if keep is None else torch.where(keep[t], x[t] / (1 - p), torch.zeros(()))
        h = [sum(A[k, i] * xd[i] for i in range(d_in)) for k in range(r)]
        z = (W @ x[t]).view(groups, N)
        pi = torch.exp(z - z.max(-1, keepdim=True).values)
        pi = pi / pi.sum(-1, keepdim=True)
        for j, e in itertools.product(range(d_out), range(N)):
            y[t, j] += scaling * pi[j // c, e] * sum(B[e, j, k] * h[k] for k in range(r))
    return y


@pytest.mark.parametrize("groups", [1, 2, 6])
@pytest.mark.parametrize("dropout", [False, True])
def test_reference_matches_naive_loop(groups, dropout):
    g = torch.Generator().manual_seed(100 + groups)
    T, d_in, d_out, r, N = 5, 7, 6, 3, 4
    x = torch.randn(T, d_in, dtype=torch.float64, generator=g)
    A = torch.randn(r, d_in, dtype=torch.float64, generator=g)
    B = torch.randn(N, d_out, r, dtype=torch.float64, generator=g)
    W = torch.randn(groups * N, d_in, dtype=torch.float64, generator=g)
    p = 0.3 if dropout else 0.0
    keep = torch.rand(T, d_in, generator=g) >= p if dropout else None
    y = mix_reference(x, A, B, W, groups=groups, scaling=1.7, dropout_mask=keep, dropout_p=p)
    torch.testing.assert_close(y, naive_loop(x, A, B, W, groups, 1.7, keep, p),
                               rtol=1e-12, atol=1e-12)


def test_reference_g1_is_hydralora_semantics():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 8, dtype=torch.float64, generator=g)
    A = torch.randn(4, 8, dtype=torch.float64, generator=g)
    B = torch.randn(3, 9, 4, dtype=torch.float64, generator=g)
    W = torch.randn(3, 8, dtype=torch.float64, generator=g)
    ours = mix_reference(x, A, B, W, groups=1, scaling=0.5)
    torch.testing.assert_close(ours, hydralora_reference(x, A, B, W, scaling=0.5))


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
