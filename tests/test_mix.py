"""The op on the torch backend against the reference: forward and every gradient, the axes of
SPEC section 5, gradcheck, dropout, residual, external logits, memory, torch.compile."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_to_reference, grads_of, random_inputs
from torch.profiler import ProfilerActivity, profile

import mtlora_kernels as mk
from mtlora_kernels.ops import mix as mix_mod
from mtlora_kernels.ops.mix import dropout_keep_mask, mix
from mtlora_kernels.reference import mix_reference


def make_inputs(T, d_in, d_out, r, N, g, dtype, *, lead=(), seed=0, external=False):
    """x, A, B, W (None with external logits or N = 1), logits: fresh, ``dtype``, with grad."""
    ins = random_inputs(T, d_in, d_out, r, N, g, seed=seed, lead=lead,
                        route="logits" if external else "weight")[:5]
    return [None if t is None else t.to(dtype).requires_grad_() for t in ins]


CASES = [  # T, d_in, d_out, r, N, g
    (0, 12, 10, 4, 2, 2),
    (0, 12, 32, 2, 4, 2),  # T = 0 in the grouped form
    (1, 12, 10, 4, 2, 2),
    (7, 12, 10, 1, 2, 1),
    (7, 9, 20, 16, 16, 2),
    (133, 24, 18, 16, 2, 18),  # g = d_out
    (133, 24, 18, 1, 16, 3),
    (7, 12, 10, 4, 1, 1),  # N = 1: plain LoRA, no router
    (7, 12, 10, 4, 1, 5),
    (7, 12, 32, 2, 4, 2),  # g*N*r = 16 <= d_out: the grouped (folded) form with g > 1
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("T,d_in,d_out,r,N,g", CASES)
@pytest.mark.parametrize("external", [False, True])
def test_torch_backend_matches_reference(T, d_in, d_out, r, N, g, dtype, external):
    x, A, B, W, L = make_inputs(T, d_in, d_out, r, N, g, dtype, seed=T + N + g,
                                external=external)
    y = mix(x, A, B, W, logits=L, groups=g, scaling=2.5, backend="torch")
    ref_in = [None if t is None else t.detach().double().requires_grad_() for t in
              (x, A, B, W, L)]
    y_ref = mix_reference(*ref_in[:4], logits=ref_in[4], groups=g, scaling=2.5)
    assert y.shape == (T, d_out) and y.dtype == dtype
    assert_close_to_reference(y, y_ref, dtype, "y")
    dy = torch.randn(T, d_out, dtype=torch.float64)
    got = grads_of(y, (x, A, B, W, L), dy.to(dtype))
    want = grads_of(y_ref, ref_in, dy)
    for name, a, b in zip(("dx", "dA", "dB", "dW_route", "dlogits"), got, want):
        if b is not None:
            assert_close_to_reference(a, b, dtype, name)


@pytest.mark.parametrize("lead", [(3,), (2, 3)])
def test_leading_shapes_and_noncontiguous_input(lead):
    x, A, B, W, _ = make_inputs(5, 16, 12, 4, 3, 2, torch.float64, lead=lead)
    xt = x.detach().transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_()
    assert not xt.is_contiguous()
    xs = torch.randn(*lead, 5, 32, dtype=torch.float64)[..., ::2].requires_grad_()  # sliced
    for xin in (xt, xs):
        y = mix(xin, A, B, W, groups=2, scaling=1.5, backend="torch")
        y_ref = mix_reference(xin, A, B, W, groups=2, scaling=1.5)
        assert_close_to_reference(y, y_ref, torch.float64, "y")
        dy = torch.randn_like(y)
        for name, a, b in zip(("dx", "dA", "dB", "dW_route"),
                              torch.autograd.grad(y, (xin, A, B, W), dy),
                              torch.autograd.grad(y_ref, (xin, A, B, W), dy)):
            assert_close_to_reference(a, b, torch.float64, name)


@pytest.mark.parametrize("d_out,r,g,grouped", [
    (6, 3, 1, False), (6, 3, 2, False), (6, 3, 6, False),  # g*N*r > d_out: per-expert form
    (12, 1, 1, True), (12, 1, 4, True),  # g*N*r <= d_out: the grouped (folded) form
])
@pytest.mark.parametrize("external", [False, True])
def test_gradcheck_float64(d_out, r, g, grouped, external):
    """Both forms of the torch backward, with dropout, a residual and a gradient on pi."""
    assert mix_mod._use_grouped(g, 3, r, d_out) == grouped
    x, A, B, W, L = make_inputs(5, 7, d_out, r, 3, g, torch.float64, seed=g,
                                external=external)
    args = tuple(t for t in (x, A, B, W, L) if t is not None)

    def f(*ts):
        it = iter(ts)
        xx, aa, bb = next(it), next(it), next(it)
        ww = None if external else next(it)
        ll = next(it) if external else None
        res = torch.ones(5, d_out, dtype=torch.float64)
        y, pi = mix(xx, aa, bb, ww, logits=ll, groups=g, scaling=1.3, dropout_p=0.25, seed=11,
                    residual=res, backend="torch", return_routing=True)
        return y, pi  # pi is differentiable: the balance loss reaches the router

    assert torch.autograd.gradcheck(f, args)


def test_dropout_uses_one_mask_shared_by_experts_and_regenerated_in_backward():
    x, A, B, W, _ = make_inputs(9, 16, 12, 4, 4, 2, torch.float64, seed=5)
    p, seed = 0.4, 1234
    keep = dropout_keep_mask(seed, (9, 16), p, "cpu", "torch")
    assert keep.dtype == torch.bool and 0 < keep.float().mean() < 1
    torch.testing.assert_close(keep, dropout_keep_mask(seed, (9, 16), p, "cpu", "torch"))
    y = mix(x, A, B, W, groups=2, scaling=2.0, dropout_p=p, seed=seed, backend="torch")
    y_ref = mix_reference(x, A, B, W, groups=2, scaling=2.0, dropout_mask=keep, dropout_p=p)
    assert_close_to_reference(y, y_ref, torch.float64, "y")
    dy = torch.randn_like(y)
    for name, a, b in zip(("dx", "dA", "dB", "dW_route"),
                          torch.autograd.grad(y, (x, A, B, W), dy),
                          torch.autograd.grad(y_ref, (x, A, B, W), dy)):
        assert_close_to_reference(a, b, torch.float64, name)
    # Not training: no dropout at all.
    y_eval = mix(x, A, B, W, groups=2, scaling=2.0, dropout_p=p, training=False)
    assert_close_to_reference(y_eval, mix_reference(x, A, B, W, groups=2, scaling=2.0),
                              torch.float64, "eval")


def test_backward_regenerates_the_mask_of_the_seed_the_forward_drew():
    """Dropout with no seed: the forward op draws one, and the backward must regenerate that
    seed's mask. Each gradcheck forward starts from the same torch.manual_seed, so all of them
    draw one seed and the numerical gradient is that mask's."""
    x, A, B, W, _ = make_inputs(4, 6, 6, 3, 3, 2, torch.float64, seed=2)

    def f(x):  # dx carries the mask
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return mix(x, A, B, W, groups=2, scaling=1.3, dropout_p=0.4, backend="torch")

    assert torch.autograd.gradcheck(f, (x,))


def test_spec_positional_signature():
    """SPEC section 3's ``mix(x, A, B, W_route, groups, scaling, dropout_p, training)``, by
    position: the same result as by keyword, the dropout on while training and off when not."""
    x, A, B, W, _ = make_inputs(6, 16, 12, 4, 3, 2, torch.float64, seed=11)
    p, seed = 0.3, 77
    keep = dropout_keep_mask(seed, (6, 16), p, "cpu", "torch")
    y = mix(x, A, B, W, 2, 1.5, p, True, seed=seed, backend="torch")
    y_ref = mix_reference(x, A, B, W, groups=2, scaling=1.5, dropout_mask=keep, dropout_p=p)
    assert_close_to_reference(y, y_ref, torch.float64, "training")
    y_eval = mix(x, A, B, W, 2, 1.5, p, False, backend="torch")
    assert_close_to_reference(y_eval, mix_reference(x, A, B, W, groups=2, scaling=1.5),
                              torch.float64, "eval")


@pytest.mark.parametrize("external", [False, True])
def test_residual_is_added_in_the_same_pass(external):
    """y = residual + delta, and every gradient (the residual's is dy itself) against the
    reference on a random dy: with dy = ones a residual gradient of ones passed too."""
    x, A, B, W, L = make_inputs(6, 8, 10, 2, 3, 5, torch.float32, seed=8, external=external)
    res = torch.randn(6, 10, requires_grad=True)
    y = mix(x, A, B, W, logits=L, groups=5, scaling=1.5, residual=res, backend="torch")
    ins64 = [None if t is None else t.detach().double().requires_grad_()
             for t in (x, A, B, W, L, res)]
    y64 = ins64[5] + mix_reference(*ins64[:4], logits=ins64[4], groups=5, scaling=1.5)
    assert_close_to_reference(y, y64, torch.float32, "y")
    dy = torch.randn(6, 10, dtype=torch.float64)
    got = grads_of(y, (x, A, B, W, L, res), dy.float())
    want = grads_of(y64, ins64, dy)
    for name, a, b in zip(("dx", "dA", "dB", "dW_route", "dlogits", "dresidual"), got, want):
        assert (a is None) == (b is None), name
        if b is not None:
            assert_close_to_reference(a, b, torch.float32, name)


def test_autocast_leaves_fp64_inputs_in_fp64():
    """Under torch.autocast mix casts fp16 / bf16 / fp32 inputs to the region's dtype, as a
    linear layer does, but never fp64 ones (autocast keeps fp64): y is the fp64 reference."""
    x, A, B, W = random_inputs(7, 12, 8, 3, 2, 2, seed=21)[:4]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mix(x, A, B, W, groups=2, scaling=1.5, backend="torch")
    assert y.dtype == torch.float64
    ref = mix_reference(x, A, B, W, groups=2, scaling=1.5)
    assert_close_to_reference(y, ref, torch.float64, "fp64 under a bf16 autocast")


def test_task_id_one_hot_routing_selects_one_expert():
    x, A, B, _, _ = make_inputs(4, 8, 6, 2, 3, 1, torch.float64)
    task = torch.tensor([0, 2, 1, 2])
    logits = torch.full((4, 3), float("-inf"), dtype=torch.float64)
    logits[torch.arange(4), task] = 0.0  # masked experts: -inf, the task's expert: 0
    y = mix(x, A, B, logits=logits, groups=1, scaling=1.0)
    want = torch.stack([x[t] @ A.T @ B[task[t]].T for t in range(4)])
    torch.testing.assert_close(y, want)


def _largest_allocation(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(e.self_cpu_memory_usage for e in prof.events())


def _fwd_bwd(T, d, N, r, g):
    x, A, B, W, _ = make_inputs(T, d, d, r, N, g, torch.float32, seed=1)
    return lambda: mix(x, A, B, W, groups=g, scaling=1.0, backend="torch").sum().backward()


@pytest.mark.parametrize("d,N,r,g", [
    (32, 8, 4, 2),  # g*N*r = 64 > d: the per-expert form
    (64, 4, 4, 2),  # g*N*r = 32 <= d: the grouped form (H~ [g, T, N*r] no larger than y)
    (32, 8, 4, 32),  # g = d_out
])
def test_memory_no_TgNr_nor_TNdout_intermediate(d, N, r, g):
    """No allocation as large as [T, g, N*r] (g = d_out) or [T, N, d_out] (small g): the largest
    single allocation stays within the tensors the layer must hold anyway (x, y, pi)."""
    T = 256
    assert mix_mod._use_grouped(g, N, r, d) == (g * N * r <= d)
    inherent = 4 * T * max(d, g * N)  # bytes of x / y / dy, or of pi [T, g, N] in fp32
    largest = _largest_allocation(_fwd_bwd(T, d, N, r, g))
    assert largest <= inherent, f"{largest} bytes allocated at once, bound {inherent}"
    # At g = d_out, pi [T, g, N] is itself T*N*d_out: the forbidden one is then [T, g, N*r].
    forbidden = 4 * T * (g * N * r if g == d else N * d)
    assert largest < forbidden


def test_memory_probe_detects_the_big_intermediate(monkeypatch):
    """The probe above can fail: forcing the grouped form at g = d_out allocates [g, T, N*r]."""
    T, d, N, r = 256, 32, 8, 4
    monkeypatch.setattr(mix_mod, "_use_grouped", lambda *a: True)
    assert _largest_allocation(_fwd_bwd(T, d, N, r, d)) >= 4 * T * d * N * r


@pytest.mark.parametrize("g,external", [(2, False), (2, True), (24, False), (24, True)])
def test_row_chunked_torch_backend_matches_reference(monkeypatch, g, external):
    """Chunks of 16 rows (T = 37: two full and a partial one) in every row-chunked product, the
    grouped form (g = 2) and the per-expert one (g = 24), with dropout and a residual."""
    monkeypatch.setattr(mix_mod, "_CHUNK_ELEMS", 16 * 24)
    T, d, r, N, p, seed = 37, 24, 4, 3, 0.3, 99
    x, A, B, W, L = make_inputs(T, d, d, r, N, g, torch.float64, seed=g, external=external)
    res = torch.randn(T, d, dtype=torch.float64, requires_grad=True)
    y = mix(x, A, B, W, logits=L, groups=g, scaling=1.5, dropout_p=p, seed=seed, residual=res,
            backend="torch")
    keep = dropout_keep_mask(seed, (T, d), p, "cpu", "torch")
    y_ref = res + mix_reference(x, A, B, W, logits=L, groups=g, scaling=1.5, dropout_mask=keep,
                                dropout_p=p)
    assert_close_to_reference(y, y_ref, torch.float64, "y")
    dy = torch.randn(T, d, dtype=torch.float64)
    ins = (x, A, B, W, L, res)
    for name, a, b in zip(("dx", "dA", "dB", "dW_route", "dlogits", "dres"),
                          grads_of(y, ins, dy), grads_of(y_ref, ins, dy)):
        if b is not None:
            assert_close_to_reference(a, b, torch.float64, name)


def test_keep_mask_drawn_in_row_chunks_is_one_draw_on_the_cpu(monkeypatch):
    monkeypatch.setattr(mix_mod, "_CHUNK_ELEMS", 5 * 13)
    gen = torch.Generator().manual_seed(7)
    whole = torch.rand(23, 13, generator=gen) >= 0.4
    torch.testing.assert_close(dropout_keep_mask(7, (23, 13), 0.4, "cpu", "torch"), whole)


@pytest.mark.parametrize("T,r,N,g,dtype,p,backward,bound", [
    (1024, 4, 4, 2, torch.float32, 0.0, False, 1.5),  # was 2.1: y written in place of a copy
    (1024, 4, 4, 2, torch.bfloat16, 0.1, True, 4.0),  # was 6.4: x, dx up-cast whole, dropout
    (1024, 4, 8, 32, torch.bfloat16, 0.0, True, 8.0),  # was 12.6: per-expert [T, d] in bf16
    # B as large as x (N*r = d, T = d / 2), the grouped form: dB, its [g, N*r, c] product, Bcat
    # and H~ are 1 unit each. Was 6.2 / 10.4 with the product and Bcat kept to the end.
    (256, 16, 16, 2, torch.float32, 0.0, True, 5.5),
    (256, 16, 16, 2, torch.bfloat16, 0.0, True, 8.0),
])
def test_peak_memory_of_the_torch_backend(monkeypatch, T, r, N, g, dtype, p, backward, bound):
    """Peak extra memory (bench's CPU probe) in units of one [T, d] tensor of x's dtype. The
    forward's inherent part is y (1 unit); forward+backward adds dx (2 units) and at g = 32 pi,
    its gradient and the softmax backward's product ([T, g, N] fp32: 1 unit each)."""
    from mtlora_kernels import bench

    monkeypatch.setattr(mix_mod, "_CHUNK_ELEMS", 1 << 15)
    d = 512
    x, A, B, W, _ = make_inputs(T, d, d, r, N, g, dtype, seed=4)
    dy = torch.randn(T, d, dtype=dtype)

    def run():
        with torch.set_grad_enabled(backward):
            y = mix(x, A, B, W, groups=g, scaling=2.0, dropout_p=p, seed=3, backend="torch")
            if backward:
                y.backward(dy)

    unit = T * d * x.element_size()
    peak = bench.peak_bytes(run, torch.device("cpu"))
    assert peak <= bound * unit, f"peak {peak / unit:.2f} units > {bound}"


def test_unused_pi_gets_no_zero_gradient(monkeypatch):
    """y alone used downstream: the backward is given no dpi (it was materialized as zeros of
    pi's shape, [T, g, N] fp32, and added to the mix's own)."""
    seen = []
    real = mix_mod.TORCH_BACKEND.backward

    def spy(*args):
        seen.append(args[7])
        return real(*args)

    monkeypatch.setattr(mix_mod.TORCH_BACKEND, "backward", spy)
    x, A, B, W, _ = make_inputs(7, 12, 10, 4, 2, 2, torch.float32)
    mix(x, A, B, W, groups=2, backend="torch").sum().backward()
    assert seen == [None]
    y, pi = mix(x, A, B, W, groups=2, backend="torch", return_routing=True)
    (y.sum() + pi[..., 0].sum()).backward()
    assert seen[1] is not None and seen[1].abs().sum() > 0


def test_torch_compile_traces_the_custom_op():
    layer = mk.MTLoRAAdapter(16, 12, r=4, num_experts=3, groups=2, dropout=0.0)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 5, 16, requires_grad=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y_c = compiled(x)
    y_e = layer(x)
    torch.testing.assert_close(y_c, y_e)
    wrt = (x, *layer.parameters())  # x, A, B, W_route: every gradient of the compiled op
    dy = torch.randn_like(y_e)
    for a, b in zip(torch.autograd.grad(y_c, wrt, dy), torch.autograd.grad(y_e, wrt, dy)):
        torch.testing.assert_close(a, b)


def test_torch_compile_fullgraph_with_a_scaling_that_changes_between_calls():
    """A Python float scaling that changes between calls: dynamo makes it a SymFloat at the
    second, which the finiteness check (math.isfinite) could not trace, so fullgraph=True
    failed. Each compiled call gives the reference's output; inf is still refused, compiled
    (the check's ValueError, inside dynamo's error) and eager (NaN too: test_errors).
    Each distinct value compiles its own graph (the op's float argument is specialized, as
    mix's docstring says); a scale applied outside the op, as the docstring suggests for one
    that changes every step, compiles once more and then stays symbolic."""
    from torch._dynamo.testing import CompileCounter

    x, A, B, W, _ = make_inputs(6, 8, 10, 2, 3, 2, torch.float64)
    scalings = (0.5, 0.75, 2.0)

    def op(s):
        return mix(x, A, B, W, groups=2, scaling=s, backend="torch")

    def outside(s):
        return s * mix(x, A, B, W, groups=2, scaling=1.0, backend="torch")

    torch._dynamo.reset()
    for fn, graphs in ((op, len(scalings)), (outside, 2)):
        counter = CompileCounter()
        compiled = torch.compile(fn, fullgraph=True, backend=counter)
        for s in scalings:
            torch.testing.assert_close(compiled(s), mix_reference(x, A, B, W, groups=2,
                                                                  scaling=s))
        assert counter.frame_count == graphs, (fn.__name__, counter.frame_count)
    compiled = torch.compile(op, fullgraph=True, backend="eager")
    for fn in (compiled, op):
        with pytest.raises(Exception, match="scaling must be finite, got inf"):
            fn(float("inf"))


def test_torch_compile_in_training_with_dropout_in_one_graph():
    """Training with dropout (the adapter's default): the seed is drawn inside the forward op,
    so the compiled layer is one graph (drawn in the traced Python, `.item()` broke the graph
    twice per layer and fullgraph=True failed), and it draws the same seeds as eager from
    torch's generator: same outputs and gradients after the same torch.manual_seed."""
    layer = mk.MTLoRAAdapter(16, 12, r=4, num_experts=3, groups=2, dropout=0.3)
    torch.nn.init.normal_(layer.lora_B)
    layer.train()
    x = torch.randn(2, 5, 16, requires_grad=True)
    torch._dynamo.reset()
    assert torch._dynamo.explain(layer)(x).graph_break_count == 0
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    outs = {}
    for name, fn in (("compiled", compiled), ("eager", layer)):
        torch.manual_seed(7)
        y1, y2 = fn(x), fn(x)
        outs[name] = (y1, y2, *torch.autograd.grad((y1 + y2).sum(), (x, layer.lora_A)))
    assert not torch.equal(outs["eager"][0], outs["eager"][1])  # a fresh mask per call
    for a, b in zip(outs["compiled"], outs["eager"]):
        torch.testing.assert_close(a, b)


def test_compiled_checkpoint_with_dropout_keeps_the_forward_mask():
    """A compiled non-reentrant checkpoint region recomputes its forward in the backward graph
    without restoring torch's generator: the op drew a new seed there, so the backward used
    another dropout mask than the forward (gradients off by O(1) at p = 0.5). The op is tagged
    nondeterministic_seeded, so the compiler keeps its outputs instead of recomputing it; the
    gradients equal eager checkpointing's (themselves the uncheckpointed ones)."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    x = torch.randn(8, 16, requires_grad=True)
    A = torch.randn(4, 16, requires_grad=True)
    B, W = torch.randn(3, 16, 4), torch.randn(6, 16)

    def loss(x):
        def layer(x):
            return torch.tanh(mix(x, A, B, W, groups=2, dropout_p=0.5))
        return checkpoint(layer, x, use_reentrant=False).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    for seed in range(2):
        grads = []
        for fn in (loss, compiled):
            torch.manual_seed(seed)
            grads.append(torch.autograd.grad(fn(x), (x, A)))
        for got, want in zip(grads[1], grads[0]):
            torch.testing.assert_close(got, want)


def test_forward_op_puts_a_cpu_tensor_in_the_graph_only_when_it_draws_the_seed():
    """The seed output (read by the backward op) is a CPU tensor only when the op drew the seed
    (training with dropout and no seed): inference graphs keep every tensor on the GPU, which
    CUDA graphs (torch.compile's reduce-overhead, decode serving) need. Fake CUDA tensors: no
    GPU needed to check the op's device contract."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, A = torch.empty(4, 8, device="cuda"), torch.empty(2, 8, device="cuda")
        B, W = torch.empty(3, 6, 2, device="cuda"), torch.empty(6, 8, device="cuda")
        for seed, last in ((0, "cuda"), (5, "cuda"), (-1, "cpu")):
            out = torch.ops.mtlora.mix_forward(x, A, B, W, None, None, 2, 1.0, 0.1, seed,
                                               "cuda", False)
            assert [o.device.type for o in out] == ["cuda", "cuda", "cuda", last], seed


def test_opcheck_custom_ops():
    x, A, B, W, _ = make_inputs(5, 8, 6, 2, 3, 2, torch.float32)
    args = (x.detach(), A.detach(), B.detach(), W.detach(), None, None, 2, 1.5, 0.0, 0,
            "torch", False)
    torch.library.opcheck(torch.ops.mtlora.mix_forward.default, args)


def test_low_precision_within_twice_plain_pytorch_error():
    for dtype in (torch.float16, torch.bfloat16):
        x, A, B, W, _ = make_inputs(33, 64, 48, 8, 4, 2, dtype, seed=3)
        y = mix(x, A, B, W, groups=2, scaling=2.0, backend="torch")
        ref = mix_reference(*(t.double() for t in (x, A, B, W)), groups=2, scaling=2.0)
        plain = mix_reference(x, A, B, W, groups=2, scaling=2.0)  # plain PyTorch, same dtype
        assert_close_to_reference(y, ref, dtype, f"y {dtype}", baseline=plain)


def test_per_expert_backward_at_one_token_keeps_plain_pytorch_accuracy():
    # Decode-shaped steps (T = 1) in the per-expert form (g*N*r > d_out), fp32: dh summed
    # over experts with addmm_ into its running value was 2x to 6x less accurate than plain
    # PyTorch's separate products; dA = dh^T x shows it. Four steps, errors pooled.
    errs = {"ours": [], "plain": []}
    refs = []
    for seed in range(4):
        x, A, B, W = (t.requires_grad_() for t in random_inputs(1, 64, 4096, 16, 16, 64,
                                                                seed=seed)[:4])
        dy = torch.randn(1, 4096, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(seed + 100))
        refs.append(grads_of(mix_reference(x, A, B, W, groups=64, scaling=4.0), [A], dy)[0])
        for name, fn in (("ours", lambda *t: mix(*t, groups=64, scaling=4.0, backend="torch")),
                         ("plain", lambda *t: mix_reference(*t, groups=64, scaling=4.0))):
            ins = [t.detach().float().requires_grad_() for t in (x, A, B, W)]
            errs[name].append(grads_of(fn(*ins), ins[1:2], dy.float())[0].double() - refs[-1])
    norm = torch.stack(refs).norm()
    ours, plain = (torch.stack(errs[k]).norm() / norm for k in ("ours", "plain"))
    assert ours <= 1.5 * plain, f"dA relative error {ours:.3g} vs plain PyTorch {plain:.3g}"
