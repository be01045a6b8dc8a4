"""Analysis metrics: gradient conflict (against gradients taken by hand; -1 / +1 for opposite /
identical tasks; pair sampling) and spectral alignment (against Eq. 7 written out with full SVDs;
synthetic experts whose shared directions sit in a known band)."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
from torch import nn

from conftest import REL_TOL, rel_err
from mtlora_kernels import MTLoRAAdapter, MTLoRAConfig, MTLoRALinear
from mtlora_kernels.metrics import band_edges, gradient_conflict, spectral_alignment

F64 = torch.float64
TOL = REL_TOL[F64]


def _adapter(seed=0, d=10, n_exp=3, r=4):
    torch.manual_seed(seed)
    a = MTLoRAAdapter(d, config=MTLoRAConfig(r=r, num_experts=n_exp, groups=2, dropout=0.0))
    a.double()
    with torch.no_grad():
        a.lora_B.normal_()
    return a


def _regression_batches(seed, rows, n=3, d=10):
    """n fresh (x, target) fp64 pairs of [rows, d] each."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, d, generator=g, dtype=F64),
             torch.randn(rows, d, generator=g, dtype=F64)) for _ in range(n)]


def _mse(model, batch):
    return (model(batch[0]) - batch[1]).square().mean()


def _signed_sum(model, batch):
    x, sign = batch
    return sign * model(x).sum()


# ---------------------------------------------------------------------------- gradient conflict


def test_fp32_gradients_in_chunks_equal_the_fp64_cosines_taken_by_hand(monkeypatch):
    """An fp32 model's gradients stay fp32 in the [T, P] matrix; the Gram product widens
    chunks of its columns to fp64 (here 7 columns, so chunks cut across parameters)."""
    import mtlora_kernels.metrics as metrics

    model = _adapter(seed=3).float()
    batches = [(x.float(), y.float()) for x, y in _regression_batches(seed=3, rows=5, n=4)]
    flat = []
    for batch in batches:
        model.zero_grad(set_to_none=True)
        _mse(model, batch).backward()
        flat.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double())
    model.zero_grad(set_to_none=True)
    monkeypatch.setattr(metrics, "_GRAM_CHUNK", 7)
    res = gradient_conflict(model, batches, _mse)
    for i, j in itertools.combinations(range(4), 2):
        want = (flat[i] @ flat[j] / (flat[i].norm() * flat[j].norm())).item()
        assert res.similarity[i, j].item() == pytest.approx(want, rel=1e-6), (i, j)


def test_opposite_gradients_give_minus_one_identical_give_one():
    model = _adapter()
    x = torch.randn(6, 10, dtype=F64)
    res = gradient_conflict(model, {"a": (x, 1.0), "b": (x, -1.0), "c": (x, 1.0)}, _signed_sum)
    assert res.tasks == ["a", "b", "c"] and res.pairs == [(0, 1), (0, 2), (1, 2)]
    assert res.similarity[0, 1].item() == pytest.approx(-1.0, abs=1e-12)
    assert res.similarity[0, 2].item() == pytest.approx(1.0, abs=1e-12)
    assert res.similarity[1, 2].item() == pytest.approx(-1.0, abs=1e-12)
    assert res.mean == pytest.approx(-1.0 / 3.0, abs=1e-12)


def test_conflict_equals_cosines_of_gradients_taken_by_hand():
    model = _adapter(seed=1)
    batches = _regression_batches(seed=1, rows=5)
    res = gradient_conflict(model, batches, _mse)
    assert all(p.grad is None for p in model.parameters())  # .grad untouched
    flat = []
    for batch in batches:
        model.zero_grad(set_to_none=True)
        _mse(model, batch).backward()
        flat.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    cos = {(i, j): torch.nn.functional.cosine_similarity(flat[i], flat[j], dim=0).item()
           for i, j in itertools.combinations(range(3), 2)}
    for (i, j), want in cos.items():
        assert res.similarity[i, j].item() == pytest.approx(want, rel=1e-10)
    assert res.mean == pytest.approx(sum(cos.values()) / 3, rel=1e-10)
    only_b = gradient_conflict(model, batches, _mse, params=[model.lora_B])
    assert only_b.mean != pytest.approx(res.mean, rel=1e-3)  # a different gradient vector


def test_pairs_are_sampled_with_the_seed_and_only_needed_tasks_run():
    model = _adapter(seed=2)
    x = torch.randn(4, 10, dtype=F64)
    calls = []

    def loss(m, batch):
        calls.append(batch[1])
        return _signed_sum(m, batch)

    batches = [(x, float(s)) for s in (1, -1, 1, 1, -1, 1)]
    res = gradient_conflict(model, batches, loss, num_pairs=2, seed=3)
    again = gradient_conflict(model, batches, loss, num_pairs=2, seed=3)
    assert len(res.pairs) == 2 and res.pairs == again.pairs
    measured = {t for p in res.pairs for t in p}
    assert len(calls) == 2 * len(measured)
    n_nan = torch.isnan(res.similarity).sum().item()
    assert n_nan == 36 - 2 * 2 - len(measured)  # unmeasured pairs and diagonal entries
    for i, j in res.pairs:
        assert res.similarity[i, j].item() == pytest.approx(batches[i][1] * batches[j][1])


def test_sampled_pairs_are_the_seeded_sample_of_all_pairs():
    """num_pairs < T(T-1)/2: the pairs are ``random.Random(seed).sample`` of all i < j pairs in
    order (the documented draw), sorted; at least T(T-1)/2 measures every pair."""
    model = _adapter(seed=8)
    x = torch.randn(3, 10, dtype=F64, generator=torch.Generator().manual_seed(8))
    batches = [(x, float(s)) for s in (1, -1, -1, 1, 1)]
    every = list(itertools.combinations(range(5), 2))
    drawn = set()
    for seed in (0, 3, 11):
        res = gradient_conflict(model, batches, _signed_sum, num_pairs=4, seed=seed)
        assert res.pairs == sorted(random.Random(seed).sample(every, 4)), seed
        drawn.add(tuple(res.pairs))
    assert len(drawn) > 1
    assert gradient_conflict(model, batches, _signed_sum, num_pairs=10).pairs == every


def test_default_params_are_the_trainable_adapter_parameters():
    """Without params=, the gradient vector is every adapter parameter that requires grad: a
    frozen A is left out (taking its gradient would fail), and the cosines are those of the
    B and router gradients taken by hand."""
    model = _adapter(seed=9)
    model.lora_A.requires_grad_(False)
    batches = _regression_batches(seed=9, rows=4)
    res = gradient_conflict(model, batches, _mse)
    flat = [torch.cat([t.reshape(-1) for t in torch.autograd.grad(
        _mse(model, b), [model.lora_B, model.lora_route])]) for b in batches]
    for i, j in itertools.combinations(range(3), 2):
        want = (flat[i] @ flat[j] / (flat[i].norm() * flat[j].norm())).item()
        assert res.similarity[i, j].item() == pytest.approx(want, rel=1e-10)


def test_a_task_without_gradient_has_no_direction():
    model = _adapter(seed=3)
    x = torch.randn(4, 10, dtype=F64)
    res = gradient_conflict(model, [(x, 1.0), (x, 0.0), (x, -1.0)], _signed_sum)
    assert math.isnan(res.similarity[0, 1].item()) and math.isnan(res.similarity[1, 2].item())
    assert math.isnan(res.similarity[1, 1].item()) and res.similarity[0, 0].item() == 1.0
    assert res.mean == pytest.approx(-1.0, abs=1e-12)  # only the measurable pair counts


def test_a_task_with_a_non_finite_loss_is_named():
    """A task whose batch has no example (a mean over nothing: NaN, with a zero gradient) was
    left out of the mean without a word."""
    batches = dict(zip("abc", _regression_batches(4, rows=5)))
    batches["b"] = tuple(t[:0] for t in batches["b"])
    with pytest.raises(ValueError, match=r"non-finite loss \(nan\) for task 'b'"):
        gradient_conflict(_adapter(seed=4), batches, _mse)


@pytest.mark.parametrize("call,match", [
    (lambda m: gradient_conflict(m, [1], _signed_sum), "at least 2 tasks"),
    (lambda m: gradient_conflict(nn.Linear(2, 2), [1, 2], _signed_sum), "no parameters"),
    (lambda m: gradient_conflict(m, [1, 2], _signed_sum, num_pairs=0), "num_pairs"),
])
def test_conflict_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call(_adapter())


def test_conflict_of_a_handle_names_its_model():
    """An attach() handle is no module: it failed on an AttributeError ('modules')."""
    from mtlora_kernels import attach

    torch.manual_seed(0)
    handle = attach(nn.Sequential(nn.Linear(10, 10)), MTLoRAConfig(r=2, num_experts=2),
                    target_modules=["0"])
    with pytest.raises(TypeError, match=r"pass handle\.model\); got MTLoRAHandle"):
        gradient_conflict(handle, [1, 2], _signed_sum)


def test_conflict_num_pairs_is_an_integer():
    with pytest.raises(TypeError, match="num_pairs must be an integer"):
        gradient_conflict(_adapter(), [1, 2, 3], _signed_sum, num_pairs=True)


# ---------------------------------------------------------------------------- spectral alignment


def _eq7_direct(experts, K=None, cuts=(0.2, 0.5)):
    """Eq. 7 over the top K singular indices (default all) from full SVDs, one expert pair and
    index at a time."""
    svds = [torch.linalg.svd(w, full_matrices=False) for w in experts]
    N, K = len(experts), K or min(experts[0].shape)
    per_k = [sum(svds[i][1][k] * svds[j][1][k] * torch.dot(svds[i][0][:, k], svds[j][0][:, k]).abs()
                 for i in range(N) for j in range(N) if i != j) for k in range(K)]
    values = [sum(per_k[a:b]) / ((b - a) * N * (N - 1)) for a, b in band_edges(K, cuts)]
    return torch.stack(values)


def test_alignment_equals_eq7_written_out():
    experts = torch.randn(4, 14, 9, dtype=F64, generator=torch.Generator().manual_seed(4))
    res = spectral_alignment(experts, generator=torch.Generator().manual_seed(0))
    want = _eq7_direct(experts)
    assert rel_err(torch.tensor(res.values, dtype=F64), want) <= TOL
    assert rel_err(torch.tensor(res.shares, dtype=F64), want / want.sum()) <= TOL
    assert res.bands == ((0, 2), (2, 5), (5, 9))  # 0.5 * 9 = 4.5 rounds up


def _experts_sharing(indices, N=4, m=24, r=10, n=16, seed=5):
    """Experts ``U_i diag(sigma) V^T`` (as B_i = U_i diag(sigma), A = V^T) whose left singular
    vectors at ``indices`` are common to all experts; the others are random per expert."""
    g = torch.Generator().manual_seed(seed)
    shared, _ = torch.linalg.qr(torch.randn(m, len(indices), generator=g, dtype=F64))
    others = [k for k in range(r) if k not in indices]
    sigma = torch.linspace(2.0, 1.0, r, dtype=F64)  # mild decay: the band is in the directions
    B = []
    for _ in range(N):
        own = torch.randn(m, r - len(indices), generator=g, dtype=F64)
        Q, _ = torch.linalg.qr(torch.cat([shared, own], 1))  # first columns = +-shared
        U = torch.empty(m, r, dtype=F64)
        U[:, list(indices)], U[:, others] = Q[:, :len(indices)], Q[:, len(indices):]
        B.append(U * sigma)
    V, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=F64))
    return torch.stack(B), V.T


def test_alignment_of_the_top_k_passes_oversample_and_power_iters_on():
    """k below the rank: randomized_svd is exact when k + oversample reaches min(m, n) (a sketch
    of the whole range), so the top-k Eq. 7 equals the one written out from full SVDs; with
    no oversampling a slowly decaying spectrum needs the power iterations asked for."""
    g = torch.Generator().manual_seed(10)
    experts = torch.randn(3, 14, 9, dtype=F64, generator=g)
    res = spectral_alignment(experts, k=4, oversample=5, power_iters=0,
                             generator=torch.Generator().manual_seed(1))
    assert rel_err(torch.tensor(res.values, dtype=F64), _eq7_direct(experts, K=4)) <= TOL
    U, _ = torch.linalg.qr(torch.randn(3, 40, 30, generator=g, dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(3, 30, 30, generator=g, dtype=F64))
    decaying = (U * 0.7 ** torch.arange(30, dtype=F64)) @ V.mT
    errs = [rel_err(torch.tensor(spectral_alignment(
        decaying, k=4, oversample=0, power_iters=q,
        generator=torch.Generator().manual_seed(2)).values, dtype=F64),
        _eq7_direct(decaying, K=4)) for q in (0, 8)]
    assert errs[1] <= 1e-4 and errs[0] > 1e-2, errs  # measured 2.9e-5 and 0.77


def test_shared_top_directions_put_the_top_band_first():
    top = spectral_alignment(_experts_sharing([0, 1]))
    assert top.bands == ((0, 2), (2, 5), (5, 10))
    assert top.shares[0] == max(top.shares) and top.shares[0] > 0.5, top.shares
    assert sum(top.shares) == pytest.approx(1.0, rel=1e-12)
    # The same construction with the shared directions in the bottom band moves the mass there.
    bottom = spectral_alignment(_experts_sharing([5, 6, 7, 8, 9]))
    assert bottom.shares[2] == max(bottom.shares) and bottom.shares[2] > 0.5, bottom.shares


def test_alignment_of_an_adapter_uses_its_expert_updates_and_ignores_scale():
    adapter = _adapter(seed=6, d=20, n_exp=4, r=5)
    res = spectral_alignment(adapter)
    B, A = adapter.lora_B.detach(), adapter.lora_A.detach()
    want = _eq7_direct(B @ A, K=5)  # rank 5: the adapter's default k = r
    assert rel_err(torch.tensor(res.values, dtype=F64), want) <= TOL
    doubled = spectral_alignment((2.0 * B, A))
    assert rel_err(torch.tensor(doubled.values, dtype=F64), 4.0 * want) <= TOL
    shares = [torch.tensor(r.shares, dtype=F64) for r in (doubled, res)]
    assert rel_err(*shares) <= TOL


def test_band_edges():
    assert band_edges(16) == ((0, 3), (3, 8), (8, 16))
    assert band_edges(3) == ((0, 1), (1, 2), (2, 3))
    assert band_edges(4, (0.1, 0.2)) == ((0, 1), (1, 2), (2, 4))
    # Cuts crowding the end: floor(0.8 * 3 + 0.5) = 2 is capped at K - 2 = 1 (two bands must
    # follow), floor(0.9 * 3 + 0.5) = 3 at K - 1 = 2; every band keeps one index.
    assert band_edges(3, (0.8, 0.9)) == ((0, 1), (1, 2), (2, 3))
    # And crowding the start: floor(0.05 * 10 + 0.5) = 1, floor(0.1 * 10 + 0.5) = 1 -> 2.
    assert band_edges(10, (0.05, 0.1, 0.97)) == ((0, 1), (1, 2), (2, 9), (9, 10))
    for K in range(3, 40):  # contiguous, non-empty bands covering 0..K-1, for any cuts
        for cuts in ((0.2, 0.5), (0.01, 0.02), (0.98, 0.99), (0.3, 0.31), (0.5, 0.999)):
            bands = band_edges(K, cuts)
            assert bands[0][0] == 0 and bands[-1][1] == K, (K, cuts, bands)
            assert all(a < b for a, b in bands), (K, cuts, bands)
            assert all(b == a2 for (_, b), (a2, _) in zip(bands, bands[1:])), (K, cuts, bands)
    with pytest.raises(ValueError, match="at least"):
        band_edges(2)
    with pytest.raises(ValueError, match="increasing fractions"):
        band_edges(10, (0.5, 0.2))


@pytest.mark.parametrize("experts,exc,match", [
    (torch.randn(1, 5, 4), ValueError, "N >= 2"),
    (torch.randn(5, 4), ValueError, r"\[N, m, n\]"),
    ((torch.randn(3, 5, 2), torch.randn(2, 4, 4, 4)), ValueError, "product"),
    ([torch.randn(5, 4)], TypeError, "MTLoRAAdapter"),
    (MTLoRALinear(nn.Linear(6, 6), MTLoRAConfig(r=2, num_experts=2)), TypeError,
     r"got MTLoRALinear \(a component-level layer: pass its \.adapter\)"),
])
def test_alignment_bad_input(experts, exc, match):
    with pytest.raises(exc, match=match):
        spectral_alignment(experts)


def test_alignment_of_a_product_takes_k_up_to_its_rank():
    """Past a product's rank r the singular values are zero: k = 2r gave bands over 2r indices,
    the upper half of them zeros (shares of another partition, without a word)."""
    B, A = torch.randn(4, 32, 8, dtype=F64), torch.randn(8, 24, dtype=F64)
    assert spectral_alignment((B, A), k=8).bands == spectral_alignment((B, A)).bands
    with pytest.raises(ValueError, match=r"at most the product's rank min\(m, r, n\) = 8; got 16"):
        spectral_alignment((B, A), k=16)
    adapter = _adapter(r=4)
    with pytest.raises(ValueError, match="rank min"):
        spectral_alignment(adapter, k=5)
