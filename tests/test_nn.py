"""The drop-in layers: parameters, initialisation, forward = reference, balance loss, imports."""

import math
import weakref

import pytest
import torch
from torch import nn

from conftest import DEVICE, assert_close_to_reference, backend_params

from mtlora_kernels import MTLoRAAdapter, MTLoRAConfig, MTLoRALinear, mix
from mtlora_kernels.compat import HydraLoRALayer
from mtlora_kernels.reference import balance_loss_reference, hydralora_reference, mix_reference


def test_parameter_layouts_and_official_init():
    torch.manual_seed(0)
    ad = MTLoRAAdapter(64, 48)  # official defaults: r 16, N 16, g 2, alpha 64, dropout 0.05
    assert ad.lora_A.shape == (16, 64)
    assert ad.lora_B.shape == (16, 48, 16)
    assert ad.lora_route.shape == (2 * 16, 64)
    assert ad.config.scaling == 4.0
    assert torch.count_nonzero(ad.lora_B) == 0
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) on fan_in 64
    for p in (ad.lora_A, ad.lora_route):
        assert p.abs().max() <= bound and p.abs().max() > 0.9 * bound
    assert "num_experts=16" in repr(ad) and "groups=2" in repr(ad)
    assert MTLoRAAdapter(8, num_experts=1).lora_route is None


def test_adapter_forward_is_the_reference_and_balance_loss_matches():
    torch.manual_seed(1)
    ad = MTLoRAAdapter(20, 12, r=4, num_experts=5, groups=3, alpha=8, dropout=0.0).double()
    nn.init.normal_(ad.lora_B)
    x = torch.randn(2, 7, 20, dtype=torch.float64)
    y = ad(x)
    want = mix_reference(x, ad.lora_A, ad.lora_B, ad.lora_route, groups=3, scaling=2.0)
    torch.testing.assert_close(y, want)
    pi = torch.softmax((x @ ad.lora_route.T).view(2, 7, 3, 5), -1)
    loss = ad.balance_loss()
    torch.testing.assert_close(loss, balance_loss_reference(pi))
    (g_ours,) = torch.autograd.grad(loss, ad.lora_route)
    (g_ref,) = torch.autograd.grad(balance_loss_reference(
        torch.softmax((x @ ad.lora_route.T).view(2, 7, 3, 5), -1)), ad.lora_route)
    torch.testing.assert_close(g_ours, g_ref)


def test_balance_loss_with_a_mask_counts_only_its_tokens():
    """balance_loss(mask) of a padded batch is the balance loss of its real tokens alone, and
    so is its gradient; a mask of the wrong shape is refused, one picking nothing gives 0."""
    torch.manual_seed(4)
    ad = MTLoRAAdapter(20, 12, r=4, num_experts=5, groups=3, alpha=8, dropout=0.0).double()
    x = torch.randn(2, 6, 20, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])  # an attention_mask
    y = ad(x)  # kept (as each output below): the routing lives with its graph
    got = ad.balance_loss(mask)
    (g_got,) = torch.autograd.grad(got, ad.lora_route)
    y = ad(x[mask.bool()])  # the 10 real tokens alone
    want = ad.balance_loss()
    (g_want,) = torch.autograd.grad(want, ad.lora_route)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g_got, g_want)
    y = ad(x)
    assert abs(ad.balance_loss(mask.bool()).item() - want.item()) < 1e-12
    assert abs(ad.balance_loss().item() - want.item()) > 1e-6  # the padding did count
    assert ad.balance_loss(torch.zeros(2, 6)).item() == 0.0
    lin = MTLoRALinear(nn.Linear(20, 12), ad.config)  # the component-level wrapper passes it on
    lin.adapter.load_state_dict(ad.state_dict())
    z = lin(x.float())
    torch.testing.assert_close(lin.balance_loss(mask).double(), want, rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match=r"mask must have the last forward's token shape "
                                         r"\(2, 6\), got \(12,\)"):
        ad.balance_loss(mask.reshape(-1))
    y = ad(x.reshape(12, -1))  # tokens flattened (OPT's FFN): the batch's mask, flattened alike
    assert abs(ad.balance_loss(mask).item() - want.item()) < 1e-12
    with pytest.raises(ValueError, match=r"token shape \(12,\), got \(2, 5\)"):
        ad.balance_loss(mask[:, :5])


def test_balance_loss_needs_a_forward():
    with pytest.raises(RuntimeError, match="forward"):
        MTLoRAAdapter(8, r=2, num_experts=2, groups=1).balance_loss()


def test_a_forward_whose_output_is_dropped_frees_its_graph():
    """A forward run with autograd whose output is dropped without a backward (an evaluation
    without torch.no_grad(), a skipped batch) frees its graph and saved activations: the
    adapter held its routing weights, and through them that graph, until its next forward.
    While the output lives the balance loss is the reference's, its gradient reaching the
    layers before the adapter too; once it is gone the loss says why it cannot be computed."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(),
                          MTLoRAAdapter(8, r=2, num_experts=3, groups=2, dropout=0.0)).double()
    x = torch.randn(4, 8, dtype=torch.float64)
    saved = []

    class Box:  # a saved tensor, packed: weakly referenced to see it freed
        def __init__(self, t):
            self.t = t

    def pack(t):
        box = Box(t.detach())  # t itself, an output saved by its own node, would make a cycle
        saved.append(weakref.ref(box))
        return box

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.t):
        y = model(x)
    assert len(saved) >= 3
    lin, ad = model[0], model[2]
    got = torch.autograd.grad(ad.balance_loss(), (lin.weight, ad.lora_route), retain_graph=True)
    pi = torch.softmax((torch.tanh(lin(x)) @ ad.lora_route.T).view(4, 2, 3), -1)
    want = torch.autograd.grad(balance_loss_reference(pi), (lin.weight, ad.lora_route))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    del y
    assert all(ref() is None for ref in saved)
    with pytest.raises(RuntimeError, match="last forward's output"):
        ad.balance_loss()


def test_balance_loss_of_an_empty_batch_is_zero():
    ad = MTLoRAAdapter(8, r=2, num_experts=3, groups=2, dropout=0.0)
    y = ad(torch.randn(0, 8))  # kept: the routing lives with its graph
    loss = ad.balance_loss()
    assert loss.item() == 0.0


def test_disabled_adapter_adds_nothing():
    ad = MTLoRAAdapter(8, 6, r=2, num_experts=3, groups=2, dropout=0.0)
    nn.init.normal_(ad.lora_B)
    x, res = torch.randn(4, 8), torch.randn(4, 6)
    ad.enabled = False
    assert ad(x, residual=res) is res
    assert torch.equal(ad(x), torch.zeros(4, 6))
    ad.enabled = True
    assert not torch.equal(ad(x, residual=res), res)


def test_adapter_copies_and_pickles_after_a_training_forward():
    """The last forward's routing weights carry its graph (non-leaf tensors refuse deepcopy):
    copies start without them, with the same parameters, and the original keeps its own."""
    import copy
    import io

    ad = MTLoRAAdapter(8, r=2, num_experts=3, groups=2, dropout=0.0)
    nn.init.normal_(ad.lora_B)
    x = torch.randn(4, 8)
    y = ad(x)
    twin = copy.deepcopy(ad)
    buf = io.BytesIO()
    torch.save(ad, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for other in (twin, loaded):
        assert other._routing is None
        for (name, p), q in zip(ad.named_parameters(), other.parameters()):
            assert torch.equal(p, q) and p.data_ptr() != q.data_ptr(), name
        torch.testing.assert_close(other(x), y, rtol=0, atol=0)
    assert ad._routing is not None and torch.isfinite(ad.balance_loss())


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
def test_adapter_exports_with_dynamic_shapes_and_matches_the_reference(strict):
    """torch.export of an adapter: the custom op exports through its fake kernel, and the program
    runs at other batch and sequence sizes (Dim) and computes the reference. The forward kept
    its routing weights on the adapter under export too: torch.export warned for every adapter
    (a tensor attribute assigned while tracing, or side effects), and discarded them."""
    import warnings

    from torch.export import Dim, export

    torch.manual_seed(0)
    ad = MTLoRAAdapter(16, r=4, num_experts=3, groups=2, alpha=8.0, dropout=0.1).eval()
    nn.init.normal_(ad.lora_B)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        program = export(ad, (torch.randn(2, 5, 16),), strict=strict,
                         dynamic_shapes=({0: Dim("batch"), 1: Dim("seq")},))
    assert not [str(w.message) for w in caught if "_routing" in str(w.message)
                or "side effect" in str(w.message)]
    x = torch.randn(3, 4, 16, dtype=torch.float64)
    want = mix_reference(x, ad.lora_A.double(), ad.lora_B.double(), ad.lora_route.double(),
                         groups=2, scaling=2.0)
    assert_close_to_reference(program.module()(x.float()), want, torch.float32, "exported")


def test_adapter_casts_parameters_to_the_input_dtype():
    ad = MTLoRAAdapter(16, r=4, num_experts=2, groups=2, dropout=0.0)
    nn.init.normal_(ad.lora_B)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    y = ad(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert ad.lora_B.grad is not None and ad.lora_B.grad.dtype == torch.float32


@pytest.mark.parametrize("x_dtype,residual_dtype", [(torch.float16, torch.float32),
                                                     (torch.float32, torch.bfloat16)], ids=str)
def test_a_residual_of_another_dtype_is_added_in_its_own(x_dtype, residual_dtype):
    """A sub-layer whose output dtype is not its input's (T5's FFN loaded in fp16, its wo kept
    in fp32) hands the adapter x and a residual of two dtypes: the op refused them (TypeError).
    The delta is computed in x's dtype and added in the residual's, which y keeps; the residual
    gets dy as its gradient, the fp32 parameters theirs."""
    torch.manual_seed(4)
    ad = MTLoRAAdapter(16, 12, r=4, num_experts=3, groups=2, alpha=8.0, dropout=0.0)
    nn.init.normal_(ad.lora_B)
    x = torch.randn(2, 5, 16, dtype=x_dtype)
    residual = torch.randn(2, 5, 12, dtype=residual_dtype, requires_grad=True)
    dy = torch.randn(2, 5, 12, dtype=residual_dtype)
    y = ad(x, residual=residual)
    y.backward(dy)
    assert y.dtype == residual_dtype and torch.equal(residual.grad, dy)
    params = [p.detach().to(x_dtype).double().requires_grad_() for p in ad.parameters()]
    ref = residual.detach().double() + mix_reference(x.double(), *params, groups=2, scaling=2.0)
    ref.backward(dy.double())
    low = x_dtype if x_dtype != torch.float32 else residual_dtype
    assert_close_to_reference(y, ref, low, "y")
    for (name, p), want in zip(ad.named_parameters(), params):
        assert p.grad.dtype == torch.float32, name
        assert_close_to_reference(p.grad, want.grad, low, name)


def test_linear_wrapper_is_frozen_base_plus_adapter():
    torch.manual_seed(2)
    base = nn.Linear(10, 14)
    layer = MTLoRALinear(base, MTLoRAConfig(r=3, num_experts=4, groups=7, alpha=6, dropout=0.0))
    nn.init.normal_(layer.adapter.lora_B)
    assert not any(p.requires_grad for p in layer.base.parameters())
    x = torch.randn(5, 10)
    a = layer.adapter
    want = base(x) + mix_reference(x, a.lora_A, a.lora_B, a.lora_route, groups=7, scaling=2.0)
    torch.testing.assert_close(layer(x), want)
    with pytest.raises(TypeError, match="nn.Linear"):
        MTLoRALinear(nn.Conv1d(3, 3, 1))


def test_linear_wrapper_reads_and_writes_the_linear_attributes_of_its_base():
    """Model code reads ``weight`` etc. from the modules it calls (T5's ``wo.weight.dtype``) and
    transformers' tie_weights() assigns ``lm_head.weight``: the wrapper had no such attributes
    (AttributeError), and an assigned weight became a second, stray parameter of the wrapper."""
    base = nn.Linear(10, 14)
    layer = MTLoRALinear(base, MTLoRAConfig(r=3, num_experts=2, groups=1))
    keys = list(layer.state_dict())
    assert layer.weight is base.weight and layer.bias is base.bias
    assert (layer.in_features, layer.out_features) == (10, 14)
    shared = nn.Parameter(torch.randn(14, 10), requires_grad=False)
    layer.weight = shared
    assert base.weight is shared and layer.weight is shared
    assert list(layer.state_dict()) == keys


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backward_inside", [False, True], ids=["backward-after", "backward-in"])
def test_linear_wrapper_under_autocast_computes_in_its_dtype(backend, dtype, backward_inside):
    """Under torch.autocast an MTLoRALinear (frozen fp32 base, fp32 adapter) runs as a linear
    layer does: y in the autocast dtype, the fp64 reference of the cast inputs, and so every
    gradient, with the backward inside the region or after it. It failed on every backend:
    the base's 16-bit output as residual beside fp32 x was refused, and the adapter alone
    failed in the backward (the torch backend's fp32 h came back recast to bf16)."""
    torch.manual_seed(3)
    cfg = MTLoRAConfig(r=4, num_experts=3, groups=2, alpha=8, dropout=0.0, backend=backend)
    layer = MTLoRALinear(nn.Linear(24, 16), cfg).to(DEVICE)
    a = layer.adapter
    nn.init.normal_(a.lora_B, std=0.5)
    x = torch.randn(2, 7, 24, device=DEVICE, requires_grad=True)
    dy = torch.randn(2, 7, 16, device=DEVICE, dtype=dtype)
    with torch.autocast(DEVICE.type, dtype=dtype):
        y = layer(x)
        # One pass: the base's output (16-bit here, x fp32) enters the op as its residual.
        fused = mix(x, a.lora_A, a.lora_B, a.lora_route, residual=layer.base(x), groups=2,
                    scaling=cfg.scaling, backend=backend)
        if backward_inside:
            y.backward(dy)
    if not backward_inside:
        y.backward(dy)
    assert y.dtype == dtype and torch.equal(y, fused)

    def cast(t):  # the values autocast computes with, in fp64
        return t.detach().to(dtype).double().requires_grad_()

    xr, A, B, W = map(cast, (x, a.lora_A, a.lora_B, a.lora_route))
    base = nn.functional.linear(xr, cast(layer.base.weight), cast(layer.base.bias))
    ref = base + mix_reference(xr, A, B, W, groups=2, scaling=cfg.scaling)
    ref.backward(dy.double())
    assert_close_to_reference(y, ref, dtype, "y")
    for name, got, want in (("dx", x.grad, xr.grad), ("dA", a.lora_A.grad, A.grad),
                            ("dB", a.lora_B.grad, B.grad), ("dW", a.lora_route.grad, W.grad)):
        assert got.dtype == torch.float32, name  # through the casts, to the fp32 tensors
        assert_close_to_reference(got, want, dtype, name)


def test_hydralora_checkpoint_import_gives_hydralora_outputs():
    torch.manual_seed(3)
    d_in, d_out, r, N = 12, 9, 4, 3
    state = {"lora_A.weight": torch.randn(r, d_in), "lora_route.weight": torch.randn(N, d_in)}
    for i in range(N):
        state[f"lora_B{i}.weight"] = torch.randn(d_out, r)
    ours = MTLoRAAdapter(d_in, d_out, r=r, num_experts=N, groups=1, alpha=8, dropout=0.0)
    ours.load_hydralora_state_dict(state)
    x = torch.randn(2, 5, d_in)
    B = torch.stack([state[f"lora_B{i}.weight"] for i in range(N)])
    want = hydralora_reference(x, state["lora_A.weight"], B, state["lora_route.weight"],
                               scaling=2.0)
    torch.testing.assert_close(ours(x), want)
    # Round trip: our parameters back to HydraLoRA's names reproduce the checkpoint.
    back = {"lora_A.weight": ours.lora_A, "lora_route.weight": ours.lora_route,
            **{f"lora_B{i}.weight": ours.lora_B[i] for i in range(N)}}
    for k, v in state.items():
        torch.testing.assert_close(back[k].detach(), v)


def test_official_checkpoint_import_gives_official_outputs():
    torch.manual_seed(4)
    d, r, N, g = 8, 2, 3, 2
    A, route = nn.Linear(d, r, bias=False), nn.Linear(d, g * N, bias=False)
    Bs = nn.ModuleList(nn.Linear(r, d, bias=False) for _ in range(N))
    state = {"lora_A.weight": A.weight, "lora_route.weight": route.weight,
             **{f"lora_B.{i}.weight": Bs[i].weight for i in range(N)}}
    ours = MTLoRAAdapter(d, r=r, num_experts=N, groups=g, alpha=4, dropout=0.0)
    ours.load_official_state_dict({k: v.detach() for k, v in state.items()})
    x = torch.randn(6, d)
    pi = torch.softmax(route(x).float().view(6, g, N), -1)  # official block adapter's mix
    h = A(x)
    want = sum(pi[:, :, e].repeat_interleave(d // g, -1) * Bs[e](h) for e in range(N)) * 2.0
    torch.testing.assert_close(ours(x), want)


def test_checkpoint_import_names_the_mismatch():
    ours = MTLoRAAdapter(8, r=2, num_experts=2, groups=1)
    good = {"lora_A.weight": torch.randn(2, 8), "lora_route.weight": torch.randn(2, 8),
            "lora_B0.weight": torch.randn(8, 2), "lora_B1.weight": torch.randn(8, 2)}
    with pytest.raises(ValueError, match=r"lacks lora_B1\.weight"):
        ours.load_hydralora_state_dict({k: v for k, v in good.items() if k != "lora_B1.weight"})
    before = ours.lora_A.detach().clone()
    with pytest.raises(ValueError, match="lora_A"):
        ours.load_hydralora_state_dict({**good, "lora_A.weight": torch.randn(3, 8)})
    torch.testing.assert_close(ours.lora_A.detach(), before)  # nothing half-loaded
    # Values that could not be copied, or only by truncation: refused before any copy.
    for bad, message in (({"lora_B1.weight": torch.empty(8, 2, device="meta")},
                          r"lora_B1\.weight: on the meta device"),
                         ({"lora_B0.weight": torch.ones(8, 2, dtype=torch.int64)},
                          r"lora_B0\.weight: torch\.int64 is not a floating dtype")):
        with pytest.raises(ValueError, match=message):
            ours.load_hydralora_state_dict({**good, **bad})
        torch.testing.assert_close(ours.lora_A.detach(), before)


def test_checkpoint_import_refuses_extra_experts():
    """A 4-expert HydraLoRA router [4, d_in] has the shape of a 2-expert, 2-group one: only the
    unexpected B_2, B_3 tell them apart, and the load must refuse rather than drop them."""
    torch.manual_seed(0)
    theirs = HydraLoRALayer(16, 16, r=4, num_experts=4, lora_alpha=4, lora_dropout=0.0)
    ours = MTLoRAAdapter(16, r=4, num_experts=2, groups=2, alpha=4, dropout=0.0)
    before = ours.lora_B.detach().clone()
    with pytest.raises(ValueError, match=r"unexpected \['lora_B2\.weight', 'lora_B3\.weight'\]"):
        ours.load_hydralora_state_dict(theirs.state_dict())
    torch.testing.assert_close(ours.lora_B.detach(), before)


def test_checkpoint_import_of_one_expert_ignores_its_router():
    """softmax over one expert is 1 whatever the logits: a one-expert router carries nothing,
    and the adapter with N = 1 (no router) computes the same layer without it."""
    torch.manual_seed(1)
    theirs = HydraLoRALayer(8, 8, r=2, num_experts=1, lora_alpha=4, lora_dropout=0.0)
    nn.init.normal_(theirs.lora_B0.weight)
    ours = MTLoRAAdapter(8, r=2, num_experts=1, alpha=4, dropout=0.0)
    ours.load_hydralora_state_dict(theirs.state_dict())
    x = torch.randn(1, 5, 8)
    torch.testing.assert_close(ours(x), theirs(x))


def test_balance_loss_refuses_a_forward_without_autograd():
    """Reentrant checkpointing runs forward under no_grad: the loss must not silently lose
    the router's gradient."""
    ad = MTLoRAAdapter(8, r=2, num_experts=3, groups=2, dropout=0.0)
    with torch.no_grad():
        ad(torch.randn(4, 8))
    with pytest.raises(RuntimeError, match="without autograd"):
        ad.balance_loss()
    y = ad(torch.randn(4, 8), logits=torch.randn(4, 6))  # external logits: not the router's
    assert torch.isfinite(ad.balance_loss())
    # Routed by external logits without autograd: the router lost nothing, so it is read.
    logits = torch.randn(4, 6)
    with torch.no_grad():
        ad(torch.randn(4, 8), logits=logits)
    pi = logits.view(4, 2, 3).softmax(-1)
    torch.testing.assert_close(ad.balance_loss(), balance_loss_reference(pi))


class _SharedLinear(nn.Module):
    """One Linear registered under two names, called under both."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = self.a

    def forward(self, x):
        return self.a(x) + 2 * self.b(x)


@pytest.mark.parametrize("target", ["a", "b"])
def test_attach_wraps_a_linear_under_every_name_it_has(target):
    """A Linear registered twice (``self.b = self.a``) is one module: attach wrapped it under its
    first name alone, so the forward through the other ran without the adapter (silently), and
    the second name matched nothing ("named ['a']")."""
    from mtlora_kernels import attach

    torch.manual_seed(3)
    model = _SharedLinear()
    lin = model.a
    x = torch.randn(2, 3, 6)
    handle = attach(model, MTLoRAConfig(r=2, num_experts=3, groups=2, alpha=4, dropout=0.0),
                    target_modules=target)
    assert list(handle.adapters) == ["a.adapter"]
    a = handle.adapters["a.adapter"]
    nn.init.normal_(a.lora_B)
    delta = mix_reference(x, a.lora_A, a.lora_B, a.lora_route, groups=2, scaling=2.0)
    torch.testing.assert_close(model(x), 3 * (lin(x) + delta))
    model(x).sum().backward()
    assert a.lora_B.grad is not None and lin.weight.grad is None
    handle.remove()
    assert model.a is lin and model.b is lin


class _Parametrized(nn.Module):
    """A Sequential whose child "0" is a Linear, beside a Linear with an orthogonal weight (its
    parametrization is the module proj.parametrizations.weight.0)."""

    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.proj = nn.utils.parametrizations.orthogonal(nn.Linear(8, 8))

    def forward(self, x):
        return self.proj(self.seq(x))


def test_targets_never_match_parametrization_internals():
    """A target '0' (a Sequential's child) also matched the parametrization of a parametrized
    Linear (proj.parametrizations.weight.0, an _Orthogonal), and attach failed on it; 'weight'
    matched its ParametrizationList, and a train module '0' the parametrization (no
    parameters). Those are torch.nn.utils.parametrize's internals: '0' is seq.0 alone, and the
    parametrized Linear is adapted by its own name."""
    from mtlora_kernels import attach

    torch.manual_seed(6)
    model = _Parametrized()
    x = torch.randn(3, 6)
    cfg = MTLoRAConfig(r=2, num_experts=3, groups=2, alpha=4, dropout=0.0)
    handle = attach(model, cfg, target_modules="0")
    assert list(handle.adapters) == ["seq.0.adapter"]
    a = handle.adapters["seq.0.adapter"]
    nn.init.normal_(a.lora_B)
    delta = mix_reference(x, a.lora_A, a.lora_B, a.lora_route, groups=2, scaling=2.0)
    torch.testing.assert_close(model(x), model.proj(torch.tanh(model.seq[0].base(x) + delta)))
    handle.remove()
    with pytest.raises(ValueError, match=r"target_modules \['weight'\] match no nn.Linear"):
        attach(model, cfg, target_modules="weight")
    handle = attach(model, cfg, target_modules="proj", train_modules="0")
    assert list(handle.adapters) == ["proj.adapter"] and handle._train_paths == ["seq.0"]
    assert model.seq[0].weight.requires_grad
