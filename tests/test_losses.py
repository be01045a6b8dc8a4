"""The auxiliary losses: the paper regularizer against Eq. 2 written out from full SVDs (value and
gradient), the official one against the released formula written out here, caching, sampling,
determinism, DDP, the balance loss, auxiliary_loss, and a short training run."""

from __future__ import annotations

import copy
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from conftest import REL_TOL, rel_err
from mtlora_kernels import MTLoRAAdapter, MTLoRAConfig, MTLoRALinear
from mtlora_kernels.losses import (SpectralRegularizer, auxiliary_loss, balance_loss,
                                   find_adapters, official_spectral_terms, paper_spectral_loss,
                                   spectral_weighting)

F64 = torch.float64
TOL = REL_TOL[F64]


class Tiny(nn.Module):
    """Two block adapters, one routed Linear wrapper and one plain-LoRA (N = 1) wrapper."""

    def __init__(self, d=12, experts=(3, 4, 2), r=3, dtype=F64, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.a1 = MTLoRAAdapter(d, config=MTLoRAConfig(r=r, num_experts=experts[0], groups=1,
                                                       dropout=0.0))
        self.a2 = MTLoRAAdapter(d, d + 4, MTLoRAConfig(r=r, num_experts=experts[1], groups=2,
                                                       dropout=0.0))
        self.lin = MTLoRALinear(nn.Linear(d + 4, d), r=r, num_experts=experts[2], groups=1,
                                dropout=0.0)
        self.plain = MTLoRALinear(nn.Linear(d, d), r=r, num_experts=1, dropout=0.0)
        self.to(dtype)
        with torch.no_grad():  # B starts at zero; give the regularizer something to act on
            for a in find_adapters(self):
                a.lora_B.normal_()

    def forward(self, x):
        return self.plain(self.lin(self.a2(x + self.a1(x))))


def _eq2_direct(B):
    """sum_{i<j} ||B'_i^T B'_j||_F^2 with B'_i = U_i diag(sqrt(w_i) sigma_i) V_i^T (full SVD)."""
    bp = []
    for Bi in B:
        U, S, Vh = torch.linalg.svd(Bi, full_matrices=True)
        w = torch.exp(-S / S.mean())
        core = torch.zeros(Bi.shape, dtype=Bi.dtype)
        core[range(len(S)), range(len(S))] = w.sqrt() * S
        bp.append(U @ core @ Vh)
    return sum((bp[i].T @ bp[j]).square().sum()
               for i in range(len(bp)) for j in range(i + 1, len(bp)))


def _routed(model):
    return [a for a in find_adapters(model) if a.config.num_experts > 1]


def test_adapters_are_found_inside_wrappers():
    model = Tiny()
    assert find_adapters(model) == [model.a1, model.a2, model.lin.adapter, model.plain.adapter]


# ---------------------------------------------------------------------------- paper variant


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_paper_equals_eq2_from_full_svds(reduction):
    model = Tiny()
    got = SpectralRegularizer(reduction=reduction)(model)
    per_adapter = torch.stack([_eq2_direct(a.lora_B.detach()) for a in _routed(model)])
    want = per_adapter.mean() if reduction == "mean" else per_adapter.sum()
    assert rel_err(got, want) <= TOL


def test_paper_gradient_is_autograd_of_the_direct_formula_with_m_fixed():
    model = Tiny(seed=1)
    SpectralRegularizer()(model).backward()
    for a in _routed(model):
        B = a.lora_B.detach().clone().requires_grad_(True)
        M = []
        for Bi in B.detach():  # M_i = V diag(sqrt(w)) V^T, written out
            _, S, Vh = torch.linalg.svd(Bi, full_matrices=False)
            M.append(Vh.T @ torch.diag(torch.exp(-S / S.mean()).sqrt()) @ Vh)
        bp = [B[i] @ M[i] for i in range(len(M))]
        direct = sum((bp[i].T @ bp[j]).square().sum()
                     for i in range(len(bp)) for j in range(i + 1, len(bp)))
        (direct / len(_routed(model))).backward()
        assert rel_err(a.lora_B.grad, B.grad) <= TOL
    assert model.a1.lora_A.grad is None  # only B enters the regularizer


def test_paper_is_zero_for_pairwise_orthogonal_column_spaces():
    N, d, r = 4, 20, 3
    Q, _ = torch.linalg.qr(torch.randn(d, N * r, dtype=F64))
    B = torch.stack([Q[:, i * r:(i + 1) * r] @ torch.randn(r, r, dtype=F64) for i in range(N)])
    value = paper_spectral_loss(B, spectral_weighting(B))
    scale = sum(b.norm() ** 4 for b in B)
    assert value.abs() <= TOL * scale
    B2 = B.clone()
    B2[1, :, 0] += Q[:, 0]  # make expert 1 overlap expert 0: the loss turns clearly positive
    assert paper_spectral_loss(B2, spectral_weighting(B2)) > 1e-5 * scale


def test_paper_weighting_of_a_zero_b_is_the_identity():
    M = spectral_weighting(torch.zeros(2, 8, 3))
    assert torch.isfinite(M).all()
    assert rel_err(M, torch.eye(3).expand(2, 3, 3)) <= REL_TOL[torch.float32]


def test_svd_never_sits_on_the_autograd_path():
    loss = SpectralRegularizer()(Tiny())
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        assert "svd" not in type(node).__name__.lower(), type(node).__name__
        stack.extend(nxt for nxt, _ in node.next_functions)
    assert len(seen) > 5


@pytest.mark.parametrize("dtype", [F64, torch.bfloat16])  # 16-bit B: an fp32 weighting
@pytest.mark.parametrize("schedule", [{"refresh_every": 3},
                                      {"refresh_every": "epoch", "steps_per_epoch": 3}])
def test_weighting_is_cached_for_refresh_every_steps(schedule, dtype):
    model = Tiny(seed=2, dtype=dtype)
    reg = SpectralRegularizer(**schedule)
    old = {a: spectral_weighting(a.lora_B) for a in _routed(model)}
    reg(model)  # step 0 computes M
    with torch.no_grad():
        for a in _routed(model):
            a.lora_B.mul_(1.5).add_(0.3)
    stale = torch.stack([paper_spectral_loss(a.lora_B, old[a]) for a in _routed(model)]).mean()
    fresh = torch.stack([paper_spectral_loss(a.lora_B, spectral_weighting(a.lora_B))
                         for a in _routed(model)]).mean()
    assert rel_err(fresh, stale) > 1e-3  # the two really differ
    assert rel_err(reg(model), stale) <= TOL  # step 1: the M of step 0
    assert rel_err(reg(model), stale) <= TOL  # step 2
    assert rel_err(reg(model), fresh) <= TOL  # step 3: refreshed


def _eq2_with_weighting_of(B, B_then):
    """sum_{i<j} ||(B_i M_i)^T (B_j M_j)||_F^2 with M_i = V diag(sqrt(w)) V^T taken from the
    full SVD of ``B_then`` (the B of the last refresh), written out."""
    M = []
    for Bi in B_then:
        _, S, Vh = torch.linalg.svd(Bi, full_matrices=False)
        M.append(Vh.T @ torch.diag(torch.exp(-S / S.mean()).sqrt()) @ Vh)
    bp = [B[i] @ M[i] for i in range(len(M))]
    return sum((bp[i].T @ bp[j]).square().sum()
               for i in range(len(bp)) for j in range(i + 1, len(bp)))


def test_refresh_follows_the_multiples_of_refresh_every_when_steps_jump():
    """refresh_every=K refreshes at a first call and whenever step // K changes ("at the steps
    that are its multiples"), not K steps after the last refresh. Steps 0, 4, 5, 6 with K = 3:
    refreshed at 0 and 4 (windows 0 and 1), not at 5, again at 6 (window 2) although only 2
    steps passed since 4. B moves before every call."""
    model, K = Tiny(seed=12), 3
    reg = SpectralRegularizer(refresh_every=K)
    refreshed_with = None
    for step, refreshes in ((0, True), (4, True), (5, False), (6, True)):
        with torch.no_grad():
            for a in _routed(model):
                a.lora_B.mul_(1.2).add_(0.1 * step)
        now = [a.lora_B.detach().clone() for a in _routed(model)]
        if refreshes:
            refreshed_with = now
        want = torch.stack([_eq2_with_weighting_of(B, B_then)
                            for B, B_then in zip(now, refreshed_with)]).mean()
        assert rel_err(reg(model, step=step), want) <= TOL, step
        if not refreshes:  # the stale weighting really differs from a fresh one here
            fresh = torch.stack([_eq2_direct(B) for B in now]).mean()
            assert rel_err(fresh, want) > 1e-3


def test_refresh_with_apply_every_happens_at_the_first_applied_step_of_each_window():
    """refresh_every=4 with apply_every=3: the term is computed at steps 2, 5, 8, 11 (skipped
    steps compute nothing, no refresh either), so the weighting comes from B at step 2 (first
    call), 5 (first applied step of window [4, 8), not B at step 4), 8 (window [8, 12)) and
    again 8 at step 11. B moves before every step."""
    model = Tiny(seed=5)
    reg = SpectralRegularizer(refresh_every=4, apply_every=3)
    seen = {}
    for step in range(12):
        with torch.no_grad():
            for a in _routed(model):
                a.lora_B.mul_(1.1).add_(0.05 * step)
        seen[step] = [a.lora_B.detach().clone() for a in _routed(model)]
        got = reg(model)
        if step in (2, 5, 8, 11):
            src = {2: 2, 5: 5, 8: 8, 11: 8}[step]
            want = torch.stack([_eq2_with_weighting_of(B, B_then)
                                for B, B_then in zip(seen[step], seen[src])]).mean()
            assert rel_err(got, want) <= TOL, step
            if step == 5:  # B at step 4 gives a visibly different weighting
                other = torch.stack([_eq2_with_weighting_of(B, B_then)
                                     for B, B_then in zip(seen[step], seen[4])]).mean()
                assert rel_err(other, want) > 1e-3
        else:
            assert got == 0


def test_auxiliary_loss_passes_the_optimizer_step_on():
    """With gradient accumulation the micro-batches of one optimizer step share its step: the
    regularizer counts optimizer steps (its refreshes, the official variant's sample)."""
    model = Tiny(seed=3)
    reg = SpectralRegularizer("official", max_samples=2)

    def spectral(step):
        return auxiliary_loss(model, balance_weight=0.0, regularizer=reg, step=step)

    micro = [spectral(0) for _ in range(3)]
    assert reg.step == 1 and micro[0] == micro[1] == micro[2]
    for step in (0, 1, 7):
        assert spectral(step) == SpectralRegularizer("official", max_samples=2)(model, step)
    assert spectral(0) != spectral(1)  # the sample depends on the step


def test_a_compiled_training_step_with_the_regularizer_compiles_once():
    """The regularizer's step count is Python state: traced, it made dynamo recompile the step
    at every call until the recompile limit turned the whole step eager. It runs eagerly
    instead (a graph break), and the values stay those of the eager step."""
    model = Tiny(seed=6, dtype=torch.float32)
    x = torch.randn(4, 12)
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(1)
        return gm.forward

    def step(reg):
        return model(x).square().mean() + auxiliary_loss(model, regularizer=reg)

    torch._dynamo.reset()
    compiled = torch.compile(step, backend=backend)
    reg, eager_reg = SpectralRegularizer(refresh_every=2), SpectralRegularizer(refresh_every=2)
    for i in range(10):
        assert rel_err(compiled(reg), step(eager_reg)) <= REL_TOL[torch.float32]
        if i == 0:
            first = len(compiles)
    assert len(compiles) == first and reg.step == 10


def test_a_used_regularizer_pickles_and_resumes_at_its_step():
    import pickle

    model = Tiny(seed=7)
    reg = SpectralRegularizer(refresh_every=3)
    reg(model)
    reg(model)
    back = pickle.loads(pickle.dumps(reg))
    assert back.step == 2 and back.refresh_every == 3
    # the restored weighting (B unchanged since: equal to a fresh one)
    assert rel_err(back(model), SpectralRegularizer()(model)) <= TOL


@pytest.mark.parametrize("twice", [False, True], ids=["pickled", "pickled-twice"])
def test_a_resumed_regularizer_computes_what_the_uninterrupted_one_does(twice):
    """Restored from a pickle after step 1 of a refresh_every=3 window, the regularizer keeps
    the weighting of step 0 until step 3, as the uninterrupted one does. (It once dropped the
    cache: the resumed run refreshed at step 2 and differed there; before that it also counted
    its refreshes from the restore and drifted apart for good.)"""
    import pickle

    def run(resume_after=None):
        model, reg, out = Tiny(seed=8), SpectralRegularizer(refresh_every=3), []
        for step in range(7):
            out.append(reg(model).item())
            if step == resume_after:
                reg = pickle.loads(pickle.dumps(reg))
                if twice:  # pickled again before its next call
                    reg = pickle.loads(pickle.dumps(reg))
            with torch.no_grad():
                for a in _routed(model):
                    a.lora_B.mul_(1.3).add_(0.2)
        return out

    assert run(resume_after=1) == run()


def test_a_restored_cache_that_does_not_fit_the_model_is_recomputed():
    import pickle

    reg = SpectralRegularizer(refresh_every=100)
    reg(Tiny(seed=5, experts=(3, 4, 2)))
    other = Tiny(seed=6, experts=(2, 5, 3))  # same adapters, other expert counts
    back = pickle.loads(pickle.dumps(reg))
    assert rel_err(back(other), SpectralRegularizer()(other)) <= TOL


def test_weighting_cached_in_one_dtype_is_redone_for_another():
    model = Tiny(seed=9, dtype=torch.float32)
    reg = SpectralRegularizer(refresh_every=100)
    assert reg(model).dtype == torch.float32
    model.double()
    out = reg(model)
    assert out.dtype == torch.float64
    assert rel_err(out, SpectralRegularizer()(model)) <= REL_TOL[torch.float64]


def test_a_weighting_cached_under_inference_mode_serves_the_training_steps_after_it():
    """Logged under torch.inference_mode() (an evaluation between training steps), the paper
    regularizer caches its weighting for the steps that follow: cached as an inference tensor it
    failed their backward ('Inference tensors cannot be saved for backward'). Value and gradient
    are those of a regularizer that cached outside inference mode (the cached M, of the B before
    a training step moved it)."""
    model = Tiny(seed=11)
    reg, plain = SpectralRegularizer(refresh_every=100), SpectralRegularizer(refresh_every=100)
    with torch.inference_mode():
        logged = reg(model)
    assert torch.equal(logged, plain(model))
    Bs = [a.lora_B for a in _routed(model)]
    g = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for B in Bs:
            B.add_(0.1 * torch.randn(B.shape, generator=g, dtype=B.dtype))
    out, want = reg(model), plain(model)
    assert torch.equal(out, want)
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(out, Bs),
                                                 torch.autograd.grad(want, Bs)))


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_autocast_leaves_the_regularizer_in_the_weights_dtype(variant):
    """A bf16 autocast region around the training step (the usual mixed-precision loop) must
    not run the regularizer's GEMMs in bf16: they were 1e-3 to 2e-3 off the fp64 value."""
    model = Tiny(seed=10, dtype=torch.float32)
    exact = SpectralRegularizer(variant)(copy.deepcopy(model).double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = SpectralRegularizer(variant)(model)
    assert out.dtype == torch.float32
    assert rel_err(out, exact) <= REL_TOL[torch.float32]


def test_integer_steps_and_seeds_of_any_integer_type_sample_alike():
    model = Tiny(seed=4)
    want = SpectralRegularizer(max_samples=1, seed=7)(model, step=5)
    for step in (np.int64(5), torch.tensor(5)):
        got = SpectralRegularizer(max_samples=1, seed=np.int64(7))(model, step=step)
        assert torch.equal(got, want)
    with pytest.raises(TypeError, match="step must be an integer, got float 5.0"):
        SpectralRegularizer(max_samples=1)(model, step=5.0)


def test_sampling_is_seeded_by_step_and_identical_across_ranks():
    model = Tiny(seed=4)
    ranks = [SpectralRegularizer(max_samples=1, seed=7), SpectralRegularizer(max_samples=1, seed=7)]
    replicas = [model, copy.deepcopy(model)]
    per_adapter = [paper_spectral_loss(a.lora_B, spectral_weighting(a.lora_B)).item()
                   for a in _routed(model)]
    picked = set()
    for step in range(6):
        v0, v1 = (reg(m) for reg, m in zip(ranks, replicas))
        assert torch.equal(v0, v1)
        (i,) = random.Random(7 + step).sample(range(len(per_adapter)), 1)
        picked.add(i)
        assert v0.item() == pytest.approx(per_adapter[i], rel=TOL)
    assert len(picked) > 1


def test_ddp_wrapper():
    # One rank (no processes to spawn): adapters are found through the wrapper, and the extra
    # gradient path of the regularizer goes through DDP's reducer. Constructing the first DDP
    # module takes ~3 s here (one-off imports).
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = Tiny(seed=5)
        plain = copy.deepcopy(model)
        wrapped = DDP(model)
        x = torch.randn(5, 12, dtype=F64)
        out = wrapped(x).square().mean() + auxiliary_loss(wrapped)
        ref = plain(x).square().mean() + auxiliary_loss(plain)
        out.backward()
        ref.backward()
        assert rel_err(out, ref) <= TOL
        for p, q in zip(model.parameters(), plain.parameters()):
            if q.grad is not None:
                assert rel_err(p.grad, q.grad) <= TOL
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------- official variant


def _released_official(model, step):
    """The released trainer's formula, written out as it computes it (one matrix at a time)."""
    mats = [a.lora_B[e] for a in find_adapters(model) for e in range(a.config.num_experts)]
    if len(mats) > 64:
        state = random.getstate()
        random.seed(step)
        mats = random.sample(mats, 64)
        random.setstate(state)
    return sum(_released_official_term(b) for b in mats) / len(mats)


def _released_official_term(b):
    """The released code's term of one matrix b [d_out, r], as it computes it."""
    rank = b.shape[1]
    gram = b.t() @ b
    with torch.no_grad():
        S = torch.linalg.svdvals(b.detach())
        weights = torch.exp(-S / (S.mean() + 1e-8))
        scale = torch.linalg.norm(b.detach()).item() / rank ** 0.5 + 1e-8
    diff = gram - torch.eye(rank, dtype=b.dtype) * scale ** 2
    return (diff * weights.unsqueeze(0) * weights.unsqueeze(1)).square().sum()


@pytest.mark.parametrize("experts", [(3, 4, 2), (16, 30, 20)])  # 10 and 67 matrices (> 64)
def test_official_equals_the_released_formula(experts):
    model = Tiny(experts=experts, seed=6)
    twin = copy.deepcopy(model)
    reg = SpectralRegularizer("official")
    for step in range(3):
        got = reg(model)
        want = _released_official(twin, step)
        assert rel_err(got, want) <= TOL, step
    got.backward()
    want.backward()
    for p, q in zip(find_adapters(model), find_adapters(twin)):
        assert rel_err(p.lora_B.grad, q.lora_B.grad) <= TOL


def test_official_term_of_square_matrices_is_the_released_formula():
    """d_out == r is the smallest B the official variant takes (w has min(d_out, r) = r values,
    one per column): fresh random square matrices give the released formula, term by term."""
    mats = torch.randn(3, 5, 5, dtype=F64, generator=torch.Generator().manual_seed(13))
    got = official_spectral_terms(mats)
    want = torch.stack([_released_official_term(b) for b in mats])
    assert got.shape == (3,) and rel_err(got, want) <= TOL


def test_official_needs_d_out_at_least_r():
    with pytest.raises(ValueError, match="d_out >= r"):
        official_spectral_terms(torch.randn(2, 3, 5))


# ---------------------------------------------------------------------------- balance, total


def test_balance_loss_averages_the_routed_adapters():
    model = Tiny(seed=8)
    with pytest.raises(RuntimeError, match="forward"):
        balance_loss(model)
    out = model(torch.randn(7, 12, dtype=F64))  # kept: the routing lives with its graph
    want = torch.stack([a.balance_loss() for a in _routed(model)]).mean()
    got = balance_loss(model)
    assert rel_err(got, want) <= TOL and got > 0
    got.backward()
    assert model.a1.lora_route.grad.abs().sum() > 0


def test_balance_loss_leaves_out_an_adapter_switched_off():
    """An ablation: one adapter switched off adds nothing, and the routing it holds is an
    older forward's (a no-grad forward keeps it): the mean is over the others."""
    model = Tiny(seed=9)
    with torch.no_grad():
        model(torch.randn(7, 12, dtype=F64))
        model.a1.enabled = False
        model(torch.randn(5, 12, dtype=F64))  # a1 keeps the first forward's routing
        want = torch.stack([a.balance_loss() for a in _routed(model) if a is not model.a1]).mean()
        assert rel_err(balance_loss(model), want) <= TOL
        for a in _routed(model):
            a.enabled = False
        with pytest.raises(RuntimeError, match="every routed adapter is disabled"):
            balance_loss(model)


class _FeatureLayer(nn.Module):
    """Two adapted layers, of which the output of the first is returned and the second's is
    dropped, as LLaVA does with its vision tower (vision_feature_layer=-2)."""

    def __init__(self, d=12):
        super().__init__()
        self.a1, self.a2 = (MTLoRAAdapter(d, r=3, num_experts=3, groups=2, dropout=0.0).double()
                            for _ in range(2))

    def forward(self, x):
        h1 = x + self.a1(x)
        self.a2(h1)  # run, its output dropped
        return h1


def test_the_balance_loss_leaves_out_an_adapter_whose_output_reached_nothing_kept():
    """An adapter whose output the model drops (the last layer of LLaVA's vision tower) has no
    graph left once its forward returns: it can change nothing the caller holds, and the
    model's balance loss is the others'. It raised, so that `model(**batch).loss +
    handle.aux_loss()` failed on such a model. With every output dropped it still raises."""
    torch.manual_seed(13)
    model = _FeatureLayer()
    out = model(torch.randn(2, 5, 12, dtype=F64))
    with pytest.raises(RuntimeError, match="last forward's output"):
        model.a2.balance_loss()
    want = model.a1.balance_loss()
    got = balance_loss(model)
    assert rel_err(got, want) <= TOL and got > 0
    (g_got,) = torch.autograd.grad(got, model.a1.lora_route, retain_graph=True)
    (g_want,) = torch.autograd.grad(want, model.a1.lora_route)
    torch.testing.assert_close(g_got, g_want)
    del out
    with pytest.raises(RuntimeError, match="last forward's output"):
        balance_loss(model)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_a_balance_loss_after_a_forward_without_autograd_names_it(mode):
    """A forward under no_grad / inference_mode (a serving process that starts training) left
    routing the loss cannot reach the router from; the error led with reentrant checkpointing
    only. Under the same mode the loss is a value to log."""
    model = Tiny(seed=8)
    with mode():
        model(torch.randn(7, 12, dtype=F64))
        assert balance_loss(model) > 0
    with pytest.raises(RuntimeError, match=r"under torch\.no_grad\(\) or torch\.inference_mode"):
        balance_loss(model)


def test_balance_loss_and_auxiliary_loss_count_only_the_masked_tokens():
    """balance_loss(model, mask) and auxiliary_loss(mask=...) hand the mask to every routed
    adapter. Each term written out (SPEC section 2): pi = softmax over e of the router logits of
    the adapter's input (captured by a hook), p_e = mean of pi[..., e] over the unmasked tokens
    and the groups, var(p) unbiased, / (mean(p)^2 + 1e-10); averaged over the routed adapters."""
    model = Tiny(seed=11)
    inputs = {}
    for a in _routed(model):
        a.register_forward_pre_hook(lambda mod, args: inputs.__setitem__(mod, args[0].detach()))
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 5, 12, dtype=F64, generator=g)
    mask = (torch.rand(3, 5, generator=g) > 0.4).long()  # an attention_mask: 1 = real token
    mask[:, 0] = 1
    mask[1, 3] = 0
    out = model(x)  # kept: the routing lives with its graph

    def by_hand(a, keep):
        n, groups = a.config.num_experts, a.config.groups
        logits = inputs[a] @ a.lora_route.detach().T  # [3, 5, g*N], row G*N + e
        pi = torch.softmax(logits.reshape(3, 5, groups, n), -1)[keep]  # [kept, g, N]
        p = pi.reshape(-1, n).mean(0)
        var = (p - p.mean()).square().sum() / (n - 1)
        return var / (p.mean() ** 2 + 1e-10)

    keep, everything = mask.bool(), torch.ones(3, 5, dtype=torch.bool)
    want = torch.stack([by_hand(a, keep) for a in _routed(model)]).mean()
    unmasked = torch.stack([by_hand(a, everything) for a in _routed(model)]).mean()
    assert rel_err(want, unmasked) > 1e-2  # the padding would count
    assert rel_err(balance_loss(model, mask), want) <= TOL
    assert rel_err(balance_loss(model), unmasked) <= TOL
    got = auxiliary_loss(model, balance_weight=0.3, spectral_weight=0.0, mask=mask)
    assert rel_err(got, 0.3 * want) <= TOL
    # A decoder's mask is an encoder-decoder's (test_trainer has T5's); refused here, by name.
    with pytest.raises(ValueError, match="decoder_mask is for an encoder-decoder's decoder "
                                         "adapters, and Tiny is no encoder-decoder"):
        balance_loss(model, mask, decoder_mask=mask)


def test_a_balance_mask_holds_only_0_and_1():
    """A mask of numbers counts its tokens as the same bool mask does (an attention_mask); a
    value other than 0 and 1 is refused, by the argument's name, at the model's balance loss and
    an adapter's (taken as a token weight, NaN or inf made the loss NaN and -1 flipped a token's
    pull: a wrong loss, silently)."""
    model = Tiny(seed=12)
    g = torch.Generator().manual_seed(12)
    keep = torch.rand(3, 5, generator=g) > 0.3
    keep[:, 0] = True
    out = model(torch.randn(3, 5, 12, dtype=F64, generator=g))  # kept: holds the routing
    want = balance_loss(model, keep)
    assert rel_err(want, balance_loss(model)) > 1e-3  # the mask counts
    for numbers in (keep.long(), keep.to(F64), keep.half()):
        assert rel_err(balance_loss(model, numbers), want) <= TOL
    model.config = SimpleNamespace(is_encoder_decoder=True)  # a decoder_mask is taken
    for bad in (float("nan"), float("inf"), -1.0, 2.0, 0.5):
        mask = keep.to(F64)
        mask[1, 2] = bad
        message = rf"must be bool or hold only 0 and 1 \(1: the token counts\); got {bad} "
        with pytest.raises(ValueError, match="^mask " + message):
            balance_loss(model, mask)
        with pytest.raises(ValueError, match="^mask " + message):
            model.a2.balance_loss(mask)
        with pytest.raises(ValueError, match="^decoder_mask " + message):
            balance_loss(model, keep, decoder_mask=mask)
    with pytest.raises(ValueError, match=r"got -3 \(torch.int64\)"):
        auxiliary_loss(model, mask=keep.long() - 3 * (~keep).long())


def test_auxiliary_loss_adds_the_weighted_terms():
    model = Tiny(seed=9)
    out = model(torch.randn(6, 12, dtype=F64))  # kept: the routing lives with its graph
    bal, spec = balance_loss(model), SpectralRegularizer()(model)
    assert rel_err(auxiliary_loss(model), 0.01 * bal + 1.0 * spec) <= TOL
    assert rel_err(auxiliary_loss(model, balance_weight=0.5, spectral_weight=0.0), 0.5 * bal) \
        <= TOL
    official = SpectralRegularizer("official")
    assert rel_err(auxiliary_loss(model, balance_weight=0.0, regularizer=official),
                   SpectralRegularizer("official")(model)) <= TOL


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_apply_every_adds_the_term_where_the_released_trainer_does(variant):
    """With apply_every=K the term enters at steps K-1, 2K-1, ... (the released trainer's
    spectral_reg_steps=K: its first trigger is when global_step - (-1) >= K), computed as an
    every-step regularizer computes it there; the other steps give a constant zero. Step-counted
    and step= calls agree."""
    model, K = Tiny(seed=10), 3
    gated = SpectralRegularizer(variant, apply_every=K)
    by_step = SpectralRegularizer(variant, apply_every=K)
    every = SpectralRegularizer(variant)
    fired = []
    for step in range(8):
        got, want = gated(model), every(model)
        assert torch.equal(by_step(model, step=step), got)
        if step % K == K - 1:
            fired.append(step)
            assert got.requires_grad and rel_err(got, want) <= TOL
        else:
            assert not got.requires_grad and got.item() == 0.0
        with torch.no_grad():  # training moves B between steps
            for a in _routed(model):
                a.lora_B.mul_(1.1).add_(0.05)
    assert fired == [2, 5]


@pytest.mark.parametrize("call,exc,match", [
    (lambda: auxiliary_loss(nn.Linear(3, 3)), ValueError, "no MTLoRAAdapter"),
    (lambda: auxiliary_loss([nn.Linear(3, 3)]), TypeError, "nn.Module"),
    (lambda: SpectralRegularizer("uniform"), ValueError, "variant"),
    (lambda: SpectralRegularizer(reduction="max"), ValueError, "reduction"),
    (lambda: SpectralRegularizer(refresh_every=0), ValueError, "refresh_every"),
    (lambda: SpectralRegularizer(refresh_every="epoch"), ValueError, "steps_per_epoch"),
    (lambda: SpectralRegularizer(max_samples=0), ValueError, "max_samples"),
    (lambda: SpectralRegularizer(apply_every=0), ValueError, "apply_every"),
    (lambda: SpectralRegularizer(apply_every=2.0), TypeError, "apply_every"),
    (lambda: SpectralRegularizer(max_samples=True), TypeError, "max_samples"),
    (lambda: SpectralRegularizer(seed=None), TypeError, "seed must be an integer, got NoneType"),
])
def test_bad_arguments_are_named(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# The counts and seeds take any integer type (numpy, a 0-d tensor) as a Python int, never a
# bool: refresh_every=True or seed=True is a mistake, not a 1.
@pytest.mark.parametrize("value", [np.int64(3), torch.tensor(3)], ids=["np.int64", "tensor"])
def test_counts_of_any_integer_type_are_taken_as_python_ints(value):
    reg = SpectralRegularizer(refresh_every=value, max_samples=value, seed=value)
    epoch = SpectralRegularizer(refresh_every="epoch", steps_per_epoch=value)
    got = (reg.refresh_every, reg.max_samples, reg.seed, epoch.refresh_every)
    assert [(v, type(v)) for v in got] == [(3, int)] * 4


@pytest.mark.parametrize("value", [True, np.True_, torch.tensor(True)],
                         ids=["bool", "np.bool", "bool-tensor"])
@pytest.mark.parametrize("name", ["refresh_every", "steps_per_epoch", "max_samples", "seed",
                                  "step"])
def test_bools_are_refused_as_integers(name, value):
    with pytest.raises(TypeError, match=f"{name} must be an integer, got"):
        if name == "step":
            SpectralRegularizer()(Tiny(), step=value)
        elif name == "steps_per_epoch":
            SpectralRegularizer(refresh_every="epoch", steps_per_epoch=value)
        else:
            SpectralRegularizer(**{name: value})


# ---------------------------------------------------------------------------- training smoke


def _train(spectral_weight, steps=3):
    torch.manual_seed(0)
    # alpha = r (scaling 1): the official alpha = 64 at r = 4 makes the task gradient drown
    # everything in three steps.
    cfg = MTLoRAConfig(r=4, num_experts=4, groups=2, alpha=4.0, dropout=0.0)
    model = nn.Sequential(MTLoRALinear(nn.Linear(16, 32), cfg), nn.GELU(),
                          MTLoRALinear(nn.Linear(32, 8), cfg))
    with torch.no_grad():
        for a in find_adapters(model):
            a.lora_B.normal_(std=0.3)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    x, y = torch.randn(64, 16), torch.randn(64, 8)
    reg = SpectralRegularizer()
    for _ in range(steps):
        task = nn.functional.mse_loss(model(x), y)
        loss = task + auxiliary_loss(model, spectral_weight=spectral_weight, regularizer=reg)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(task)
    return model


def test_training_with_the_regularizer_reduces_low_sv_overlap():
    # The overlap is Eq. 2 with a fresh weighting; measured 2.23 without and 0.23 with.
    overlap = {w: SpectralRegularizer()(_train(w)).item() for w in (0.0, 1.0)}
    assert overlap[1.0] < 0.5 * overlap[0.0], overlap


def test_official_gradient_in_fp32_keeps_to_the_fp64_one_at_a_wide_d_out():
    """scale^2 is ||B||_F^2 / r: taken from matrix_norm, its rounding differed from the Gram
    matrix's diagonal by ~3e-6 relative at d_out = 16384, and gram - scale^2 I multiplied that
    into a gradient 1e-4 off the fp64 one; from the Gram matrix's trace it is 5e-6 off."""
    B = torch.randn(4, 16384, 16, generator=torch.Generator().manual_seed(21)) * 0.02
    b32, b64 = B.clone().requires_grad_(), B.double().requires_grad_()
    official_spectral_terms(b32).sum().backward()
    official_spectral_terms(b64).sum().backward()
    assert rel_err(b32.grad, b64.grad) <= 2e-5
