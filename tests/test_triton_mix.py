"""The triton backend of the fused mix against the fp64 reference: forward and every gradient
(x, A, B, route_weight, logits, residual), the axes of SPEC section 5, the balance loss's extra
dpi, deterministic mode, dropout from the seed, fp32 / fp16 / bf16.

Without a GPU the kernels run in Triton's interpreter on CPU tensors: tests/conftest.py sets
``TRITON_INTERPRET=1`` before anything imports triton (setting it here would be too late when
another test module imported triton first). With a GPU the same tests run the compiled kernels
on it, and the ``cuda_device`` tests add larger shapes and bf16 on the tensor cores.

Every output a kernel writes in full is allocated poisoned with NaN (autouse fixture), so an
element a kernel forgets to write shows up as a non-finite result (``rel_err`` = inf).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import (DEVICE, REL_TOL, assert_close_to_reference, grads_of, random_inputs,
                      rel_err)

from mtlora_kernels.nn import MTLoRAAdapter
from mtlora_kernels.ops.mix import dropout_keep_mask, mix
from mtlora_kernels.reference import balance_loss_reference, mix_reference, routing_weights
from mtlora_kernels.triton import mix as tmix



@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Outputs come out of ``_empty`` filled with NaN instead of whatever memory held."""

    def nan_empty(shape, dtype, device):
        if dtype == torch.bool:
            return torch.zeros(shape, dtype=dtype, device=device)  # no NaN for bool: all False
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(tmix, "_empty", nan_empty)


def make_inputs(T, d_in, d_out, r, N, g, dtype, *, lead=(), seed=0, route="weight",
                residual=True, device=DEVICE):
    """Fresh random inputs (fp64 values cast to ``dtype``), each requiring grad."""
    ins = random_inputs(T, d_in, d_out, r, N, g, seed=seed, lead=lead, route=route,
                        residual=residual, logits_scale=3.0)
    return [None if t is None else t.to(device, dtype).requires_grad_() for t in ins]


def run_both(inputs, g, *, scaling=2.5, dropout_p=0.0, seed=0, deterministic=False,
             balance=False):
    """(kernel outputs, fp64 reference outputs, plain-PyTorch outputs in the inputs' dtype):
    each [y, grad x, grad A, grad B, grad W, grad logits, grad residual] (+ pi)."""
    x, A, B, W, L, R = inputs
    gen = torch.Generator().manual_seed(1234)
    dy = torch.randn(*x.shape[:-1], B.shape[1], generator=gen, dtype=torch.float64)
    keep = None
    if dropout_p > 0.0:
        keep = dropout_keep_mask(seed, (x.reshape(-1, x.shape[-1]).shape[0], x.shape[-1]),
                                 dropout_p, x.device, "triton").view(x.shape).cpu()  # as ref

    def grads(y, pi, tensors):
        loss = (y.double() * dy.to(y.device)).sum()
        if balance:
            loss = loss + 3.0 * balance_loss_reference(pi)
        return grads_of(loss, tensors)

    y, pi = mix(x, A, B, W, logits=L, residual=R, groups=g, scaling=scaling,
                dropout_p=dropout_p, seed=seed, backend="triton", deterministic=deterministic,
                return_routing=True)
    got = [y, *grads(y, pi, inputs[:6]), pi]

    def reference(ts):
        x_, A_, B_, W_, L_, R_ = ts
        y_ = mix_reference(x_, A_, B_, W_, logits=L_, groups=g, scaling=scaling,
                           dropout_mask=keep, dropout_p=dropout_p)
        if R_ is not None:
            y_ = y_ + R_
        acc = torch.promote_types(x_.dtype, torch.float32)
        n_exp = B_.shape[0]
        if W_ is not None:
            pi_ = routing_weights(x_.to(acc) @ W_.to(acc).T, g, n_exp)
        elif L_ is not None:
            pi_ = routing_weights(L_, g, n_exp)
        else:
            pi_ = torch.ones(*x_.shape[:-1], g, 1, dtype=acc, device=x_.device)
        return [y_, *grads(y_, pi_, ts), pi_]

    ref = reference([None if t is None else t.detach().cpu().double().requires_grad_()
                     for t in inputs])
    plain = reference([None if t is None else t.detach().cpu().requires_grad_() for t in inputs])
    return got, ref, plain


NAMES = ("y", "dx", "dA", "dB", "dW_route", "dlogits", "dresidual", "pi")


def check_all(got, ref, dtype, plain=None):
    for i, name in enumerate(NAMES):
        if ref[i] is None:
            assert got[i] is None, name
            continue
        assert got[i] is not None and got[i].shape == ref[i].shape, name
        base = plain[i] if (plain is not None and dtype != torch.float32) else None
        assert_close_to_reference(got[i], ref[i], dtype, name, baseline=base)


CASES = [  # T, d_in, d_out, r, N, g, route
    (0, 24, 40, 16, 2, 2, "weight"),     # no tokens
    (1, 32, 48, 16, 16, 48, "weight"),   # decode; g = d_out: epilogue form, 24 router blocks
    (7, 24, 40, 16, 2, 2, "weight"),     # c = 20: folded, a group spans two column tiles
    (7, 33, 48, 1, 2, 48, "weight"),     # r = 1, g = d_out, odd d_in, 3 router blocks
    (7, 24, 48, 16, 2, 12, "weight"),    # c = 4: 16 whole groups per epilogue tile
    (7, 32, 48, 16, 4, 3, "weight"),     # ALIGNED sizes (d, c multiples of 16, r = 16)
    (7, 24, 40, 16, 1, 1, "none"),       # N = 1: plain LoRA, no router
    (7, 24, 40, 16, 16, 2, "logits"),    # external router logits
    (133, 20, 130, 1, 16, 1, "weight"),  # 3 token blocks, c = 130: 3 folded tiles, K = 16*r
    (9, 160, 160, 32, 4, 16, "weight"),  # c = 10: 16-column groups, not ALIGNED (see below)
]


@pytest.mark.parametrize("T,d_in,d_out,r,N,g,route", CASES)
def test_matches_reference_fp32(T, d_in, d_out, r, N, g, route):
    inputs = make_inputs(T, d_in, d_out, r, N, g, torch.float32, seed=T + N + g, route=route)
    got, ref, _ = run_both(inputs, g)
    check_all(got, ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,d_in,d_out,r,N,g,route", [
    CASES[2], CASES[4], CASES[5], CASES[7],
    (7, 24, 40, 33, 3, 2, "weight"),  # r = 33 (padded to 64), N = 3 (padded to 4)
])
def test_matches_reference_low_precision(T, d_in, d_out, r, N, g, route, dtype):
    """fp16 / bf16 within the table's tolerance or 2x plain PyTorch's error in that dtype.
    (Under the interpreter bf16 products are up-cast to fp32: its bf16 tl.dot is broken.)"""
    inputs = make_inputs(T, d_in, d_out, r, N, g, dtype, seed=5, route=route)
    got, ref, plain = run_both(inputs, g)
    check_all(got, ref, dtype, plain)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_router_with_a_large_shared_direction_keeps_dx_accurate(dtype):
    """Each group's router rows share one large direction (logits ~1e3). Softmax gradients
    cancel it in dz·W_route, but only while dz keeps its fp32 bits: rounded to the input dtype
    first, dx was off by 31% (fp16) / 90% (bf16) in tests/test_extreme.py."""
    x, A, B, _, _, R = make_inputs(7, 32, 48, 16, 4, 3, dtype, seed=8)
    gen = torch.Generator().manual_seed(9)
    big = torch.randn(3, 1, 32, generator=gen, dtype=torch.float64) * 3e2
    W = (big + 0.3 * torch.randn(3, 4, 32, generator=gen, dtype=torch.float64)).view(12, 32)
    W = W.to(DEVICE, dtype).requires_grad_()
    assert (x.detach().double() @ W.detach().double().T).abs().max() > 1e3
    got, ref, plain = run_both([x, A, B, W, None, R], 3)
    check_all(got, ref, dtype, plain)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp32_logits_beside_low_precision_x_keep_their_bits(dtype):
    """External logits may be of any float dtype (an fp32 router beside bf16 layers): the
    kernel reads them as they are and makes pi in fp32. Near 3e3 a rounding to x's dtype would
    move pi by tens of percent; the other tests give logits in x's dtype, where it is exact."""
    x, A, B, _, L, R = make_inputs(7, 24, 40, 16, 4, 2, dtype, seed=12, route="logits")
    L = (3e3 + L.detach().float()).requires_grad_()
    rounded = routing_weights(L.detach().to(dtype), 2, 4)
    assert rel_err(rounded, routing_weights(L.detach(), 2, 4)) > 10 * REL_TOL[dtype]
    got, ref, plain = run_both([x, A, B, None, L, R], 2)
    assert got[5].dtype == torch.float32
    check_all(got, ref, dtype, plain)


@pytest.mark.parametrize("route", ["weight", "logits"])
def test_three_d_noncontiguous_input(route):
    x, A, B, W, L, R = make_inputs(5, 24, 40, 16, 2, 2, torch.float32, lead=(2,), seed=3,
                                   route=route)
    # [2, 5, d] laid out as [5, 2, d]: leading dims that are not contiguous
    xt = x.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    assert not xt.is_contiguous()
    Rt = R.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    got, ref, _ = run_both([xt, A, B, W, L, Rt], 2)
    assert got[0].shape == (2, 5, 40)
    check_all(got, ref, torch.float32)


@pytest.mark.parametrize("g,route", [(2, "weight"), (20, "weight"), (20, "logits")])
def test_balance_loss_extra_dpi_reaches_the_router(g, route):
    """A loss on pi (the balance loss) adds its dpi before the softmax backward: in the dh
    kernel's folded form (g = 2, c = 20) and its epilogue form (g = 20, c = 2), where each adds
    it on its own code path."""
    assert tmix._plan(7, 24, 40, 16, 4, 40 // g, False)["dh"]["GT"] == (1 if g == 2 else 32)
    inputs = make_inputs(7, 24, 40, 16, 4, g, torch.float32, seed=11, route=route)
    got, ref, _ = run_both(inputs, g, balance=True)
    check_all(got, ref, torch.float32)
    without, _, _ = run_both(inputs, g)
    k = 4 if route == "weight" else 5
    assert rel_err(got[k], without[k]) > 1e-3  # the extra term changed dW_route / dlogits


@pytest.mark.parametrize("route", ["weight", "logits"])
def test_deterministic_mode_is_bitwise_reproducible(route):
    """Partial sums per token split, reduced in a fixed order: the same bits on every run (the
    interpreter is sequential, so on a GPU this is the test that matters)."""
    # 2 token splits in both reductions over T (dB, dA / dW_route) at these sizes
    inputs = make_inputs(100, 20, 40, 16, 4, 2, torch.float32, seed=2, route=route)
    first, ref, _ = run_both(inputs, 2, deterministic=True)
    second, _, _ = run_both(inputs, 2, deterministic=True)
    check_all(first, ref, torch.float32)
    atomics, _, _ = run_both(inputs, 2)  # the same splits adding into one buffer
    check_all(atomics, ref, torch.float32)
    for name, a, b in zip(NAMES, first, second):
        assert (a is None) == (b is None), name
        if a is not None:
            assert torch.equal(a, b), f"{name} differs between two deterministic runs"


def test_dropout_mask_comes_from_the_seed():
    m1 = dropout_keep_mask(7, (33, 40), 0.3, DEVICE, "triton")
    m2 = dropout_keep_mask(7, (33, 40), 0.3, DEVICE, "triton")
    m3 = dropout_keep_mask(8, (33, 40), 0.3, DEVICE, "triton")
    assert m1.dtype == torch.bool and m1.shape == (33, 40)
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)
    assert 0.6 < m1.float().mean().item() < 0.8  # keep rate 1 - p over 1320 draws
    # the offset is the logical index t*d_in + k: a prefix of rows is the same mask
    assert torch.equal(dropout_keep_mask(7, (5, 40), 0.3, DEVICE, "triton"), m1[:5])


@pytest.mark.parametrize("T,N,g", [(7, 2, 2), (70, 4, 40)])
def test_dropout_forward_and_backward_use_the_seeded_mask(T, N, g):
    """y, dx and dA match the reference given the mask from dropout_keep_mask: the kernels
    draw that mask in the forward and again in the backward; the router sees x undropped."""
    inputs = make_inputs(T, 24, 40, 16, N, g, torch.float32, seed=4)
    got, ref, _ = run_both(inputs, g, dropout_p=0.25, seed=99)
    check_all(got, ref, torch.float32)
    other, _, _ = run_both(inputs, g, dropout_p=0.25, seed=100)
    assert rel_err(other[0], got[0]) > 1e-3  # another seed, another mask


def test_decode_column_splits_with_a_short_last_split(monkeypatch):
    """A decode forward spreads its output tiles over column splits (its one token block
    cannot fill the device; 8 programs, as in the interpreter): 9 one-group tiles go in 5
    splits of 2, the last one short, the later splits starting their router sweep past the
    first block (N = 8: 4 groups a block). The backward has no column splits: forward only."""
    monkeypatch.setattr(tmix, "target_programs", lambda device: 8)
    launches = []
    real_launch = tmix._launch

    def launch(kernel, grid, *args, **meta):
        launches.append((kernel, grid, args))
        real_launch(kernel, grid, *args, **meta)

    monkeypatch.setattr(tmix, "_launch", launch)
    x, A, B, W, _, R = random_inputs(1, 24, 144, 8, 8, 9, seed=13, residual=True)
    y, pi = mix(*(t.float().to(DEVICE) for t in (x, A, B, W)), residual=R.float().to(DEVICE),
                groups=9, scaling=2.5, backend="triton", return_routing=True)
    assert_close_to_reference(y, mix_reference(x, A, B, W, groups=9, scaling=2.5) + R,
                              torch.float32, "y")
    assert_close_to_reference(pi, routing_weights(x @ W.T, 9, 8), torch.float32, "pi")
    [(grid, args)] = [(grid, args) for kernel, grid, args in launches
                      if kernel is tmix._fwd_kernel]
    assert (grid[1], args[15]) == (5, 2)  # splits, tiles_per_split


@pytest.mark.parametrize("fp32", [False, True])
@pytest.mark.parametrize("T", [4, 100])
def test_aligned_plans_only_assume_what_holds(T, fp32):
    """ALIGNED tells the kernels (tl.multiple_of) that d_in, d_out and, on one-group tiles,
    c are multiples of 16: a false hint is undefined behaviour on a GPU and harmless in the
    interpreter, so the plans are checked here for every group width up to 200."""
    for d_out in range(16, 401, 16):
        for g in (k for k in range(1, d_out + 1) if d_out % k == 0):
            c = d_out // g
            for r in (16, 32, 64, 128):
                for kernel, args in tmix._plan(T, 64, d_out, r, 4, c, fp32).items():
                    if args.get("ALIGNED") and args.get("GT") == 1:
                        assert c % 16 == 0, (kernel, d_out, g, r, args)


def test_host_arithmetic_matches_triton():
    """The launchers' cdiv and pow2_at_least are plain Python (triton's are constexpr functions,
    slow on the host) and give what triton's give, up to 32-bit sizes and beyond."""
    import triton

    from mtlora_kernels.triton._common import cdiv, pow2_at_least

    sizes = [*range(0, 300), 4095, 4096, 4097, 2**31 - 1, 2**31, 2**31 + 1, 3 * 2**40 + 7]
    for n in sizes:
        for floor in (1, 16):
            assert pow2_at_least(n, floor) == max(floor, triton.next_power_of_2(max(1, n))), n
        for b in (1, 3, 16, 64, 264):
            assert cdiv(n, b) == triton.cdiv(n, b), (n, b)


def test_cached_launch_plans_stay_those_of_their_arguments(monkeypatch):
    """_table_plan is cached and its dicts are shared between launches: after forward and
    backward launches at many shapes (recorded, nothing runs), each shape's plan is still the
    one built afresh for it (no launcher changed one, no shape got another's)."""
    shapes = [(t, d_in, d_out, r, N, g, fp32)
              for T, d_in, d_out, r, N, g in tmix.LAUNCH_SHAPES.values()
              for t in (1, T) for fp32 in (False, True)]
    for t, d_in, d_out, r, N, g, fp32 in shapes:
        tmix.recorded_launches(t, d_in, d_out, r, N, g,
                               torch.float32 if fp32 else torch.bfloat16)
    cached = [tmix._plan(t, d_in, d_out, r, N, d_out // g, fp32)
              for t, d_in, d_out, r, N, g, fp32 in shapes]
    monkeypatch.setattr(tmix, "_table_plan", tmix._table_plan.__wrapped__)
    fresh = [tmix._plan(t, d_in, d_out, r, N, d_out // g, fp32)
             for t, d_in, d_out, r, N, g, fp32 in shapes]
    assert cached == fresh
    assert len({repr(p) for p in fresh}) >= 8  # the shapes have plans of their own


def test_every_launch_runs_on_the_device_of_its_tensors(monkeypatch):
    """Triton launches a kernel on the current CUDA device and its current stream, whatever
    device its tensors are on (triton.runtime.jit, JITFunction.run: get_current_device()): a
    layer on cuda:1 while cuda:0 is current (device_map="auto") would get cuda:0 launches with
    cuda:1 pointers (triton-lang/triton#2441). So every launch of the package (mix forward,
    backward, dropout mask; rSVD GEMM) must sit inside torch.cuda.device_of(its tensor). No
    second GPU here: device_of is wrapped to record the device it entered, every kernel to
    check at launch that it runs inside one for its first tensor's device."""
    from mtlora_kernels.triton import rsvd

    entered = []
    real_device_of = torch.cuda.device_of

    @contextlib.contextmanager
    def device_of(obj):
        entered.append(obj.device)
        try:
            with real_device_of(obj):
                yield
        finally:
            entered.pop()

    launched = set()

    class Checked:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            def launch(*args, **meta):
                assert entered == [args[0].device], f"{self.name} launched outside device_of"
                launched.add(self.name)
                return self.kernel[grid](*args, **meta)
            return launch

    monkeypatch.setattr(torch.cuda, "device_of", device_of)
    names = ("_fwd_kernel", "_bwd_dh_kernel", "_softmax_bwd_kernel", "_bwd_dx_kernel",
             "_bwd_daw_kernel", "_bwd_db_kernel", "_keep_mask_kernel")
    for name in names:
        monkeypatch.setattr(tmix, name, Checked(name, getattr(tmix, name)))
    monkeypatch.setattr(rsvd, "rsvd_bmm_kernel", Checked("rsvd_bmm_kernel", rsvd.rsvd_bmm_kernel))
    inputs = make_inputs(7, 24, 40, 16, 2, 2, torch.float32, seed=6)
    got, ref, _ = run_both(inputs, 2, dropout_p=0.25, seed=3)  # the mask, forward, backward
    check_all(got, ref, torch.float32)
    gen = torch.Generator().manual_seed(0)
    a, x = (torch.randn(*s, generator=gen).to(DEVICE) for s in ((2, 20, 24), (2, 24, 5)))
    torch.testing.assert_close(rsvd.bmm(a, x), a @ x, rtol=1e-5, atol=1e-5)
    assert launched == {*names, "rsvd_bmm_kernel"}


@pytest.mark.parametrize("value", ["true", "On"])
def test_interpreter_switch_reads_the_variable_as_triton_does(monkeypatch, value):
    """Triton runs its interpreter for TRITON_INTERPRET = 1, true, on or yes (any case); the
    launchers' UPCAST (the Triton 3.8 interpreter's bf16 tl.dot returns garbage) must be on for
    each of them. Read as == "1", "true" made the backend report itself unavailable on CPU
    tensors and, its forward called directly, left bf16 products unpatched (h 3e10 off)."""
    if DEVICE.type == "cuda":
        pytest.skip("the kernels were compiled here: whether Triton interprets is decided when "
                    "the kernels are defined, and this process did not")
    monkeypatch.setenv("TRITON_INTERPRET", value)
    inputs = make_inputs(7, 32, 48, 16, 4, 3, torch.bfloat16, seed=8)
    got, ref, plain = run_both(inputs, 3)
    check_all(got, ref, torch.bfloat16, plain)


def test_bad_input_is_rejected_with_the_argument_named():
    x = torch.randn(3, 8, dtype=torch.float64)
    A, B = torch.randn(2, 8, dtype=torch.float64), torch.randn(1, 8, 2, dtype=torch.float64)
    with pytest.raises(TypeError, match="fp16, bf16 or fp32.*float64"):
        tmix.forward(x, A, B, None, None, None, 1, 1.0, 0.0, 0)
    x = x.float()
    with pytest.raises(ValueError, match="r <= 128"):
        tmix.forward(x, torch.randn(129, 8), torch.randn(1, 8, 129), None, None, None, 1, 1.0,
                     0.0, 0)
    with pytest.raises(ValueError, match="N <= 64"):
        tmix.forward(x, torch.randn(2, 8), torch.randn(65, 8, 2), torch.randn(65, 8), None,
                     None, 1, 1.0, 0.0, 0)
    with pytest.raises(ValueError, match="x must be contiguous"):
        tmix.forward(torch.randn(8, 3).T, torch.randn(2, 8), torch.randn(1, 8, 2), None, None,
                     None, 1, 1.0, 0.0, 0)


@pytest.mark.parametrize("T,d_in,d_out,r,N,g,dropout_p", [
    (3, 32, 64, 128, 2, 2, 0.0),   # decode, ALIGNED, R_PAD = 128: RC = 64; 2 column splits
    (20, 24, 40, 100, 3, 2, 0.2),  # odd sizes, r = 100 padded to 128, dropout
    (20, 24, 40, 40, 3, 1, 0.0),   # odd sizes, r = 40 padded to 64: RC = 32
])
def test_fp32_forward_reads_h_back_in_rank_chunks(T, d_in, d_out, r, N, g, dropout_p):
    """fp32 folded forwards at large r hold no [BT, R_PAD] A-operand (it spilled registers):
    the mix reads h back from memory RC ranks at a time (_FP32_TILES)."""
    plan = tmix._plan(T, d_in, d_out, r, N, d_out // g, fp32=True)["fwd"]
    assert plan["GT"] == 1 and plan["RC"] < plan["R_PAD"]
    inputs = make_inputs(T, d_in, d_out, r, N, g, torch.float32, seed=r)
    got, ref, _ = run_both(inputs, g, dropout_p=dropout_p, seed=5)
    check_all(got, ref, torch.float32)


def test_torch_compile_of_a_layer_on_the_triton_backend():
    """The compiled layer gives eager's y, and the gradient of x and of every parameter
    against the fp64 reference (a finiteness check on one gradient passed with dB and
    dW_route negated)."""
    layer = MTLoRAAdapter(24, 40, r=16, num_experts=2, groups=2, dropout=0.0,
                          backend="triton").to(DEVICE)
    torch.nn.init.normal_(layer.lora_B)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 24, generator=gen).to(DEVICE).requires_grad_()
    dy = torch.randn(7, 40, generator=gen, dtype=torch.float64)
    y_eager = layer(x)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    assert torch.equal(y, y_eager)
    params = [layer.lora_A, layer.lora_B, layer.lora_route]
    got = torch.autograd.grad(y, [x, *params], dy.to(y))
    ins64 = [t.detach().cpu().double().requires_grad_() for t in (x, *params)]
    y64 = mix_reference(*ins64, groups=2, scaling=layer.config.scaling)
    for name, a, b in zip(("dx", "dA", "dB", "dW_route"), got, grads_of(y64, ins64, dy)):
        assert_close_to_reference(a, b, torch.float32, name)


# ------------------------------------------------------------------------ GPU only (compiled)

GPU_CASES = [  # T, d_in, d_out, r, N, g, route
    (1, 256, 256, 16, 16, 2, "weight"),
    (333, 256, 384, 16, 16, 2, "weight"),
    (333, 256, 256, 16, 16, 256, "weight"),
    (200, 192, 320, 64, 8, 5, "logits"),
    (77, 128, 128, 128, 64, 1, "weight"),  # fp32: the forward reads h back, RC = 64
    (3, 32, 64, 128, 2, 2, "weight"),      # decode, 2 column splits each storing h (fp32)
    (20, 24, 40, 40, 3, 1, "logits"),      # fp32: RC = 32 at odd sizes
    (40, 160, 160, 32, 4, 16, "weight"),   # c = 10: one-group tiles of 16 columns (fp32 dh)
]


@pytest.mark.parametrize("T,d_in,d_out,r,N,g,route,dtype", [
    (*case, dtype) for case in GPU_CASES for dtype in (torch.bfloat16, torch.float16, torch.float32)
])
def test_gpu_matches_reference(cuda_device, T, d_in, d_out, r, N, g, route, dtype):
    inputs = make_inputs(T, d_in, d_out, r, N, g, dtype, seed=T, route=route,
                         device=cuda_device)
    got, ref, plain = run_both(inputs, g, dropout_p=0.1, seed=5)
    check_all(got, ref, dtype, plain)


def test_gpu_deterministic_mode_is_bitwise_reproducible(cuda_device):
    inputs = make_inputs(4096, 256, 256, 16, 16, 2, torch.bfloat16, seed=1, device=cuda_device)
    runs = [run_both(inputs, 2, deterministic=True)[0] for _ in range(3)]
    for name, *vals in zip(NAMES, *runs):
        if vals[0] is not None:
            assert all(torch.equal(vals[0], v) for v in vals[1:]), name
