"""The HydraLoRA baseline (mtlora_kernels.compat): its published loop against the oracle, the
fine-grained loop and the eager formulation against mix_reference, and our op on HydraLoRA
checkpoints (g = 1, no dropout) against HydraLoRA's layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_close_to_reference
from torch import nn

from mtlora_kernels.compat import HydraLoRALayer, hydralora_eager
from mtlora_kernels.nn import MTLoRAAdapter, MTLoRAConfig
from mtlora_kernels.reference import hydralora_reference, mix_reference


def random_layer(d_in, d_out, r, N, g=1, dropout=0.0, seed=0, dtype=torch.float64):
    """A HydraLoRALayer with every weight random (B nonzero, routing far from uniform)."""
    gen = torch.Generator().manual_seed(seed)
    layer = HydraLoRALayer(d_in, d_out, r, N, lora_alpha=3.0 * r, lora_dropout=dropout, groups=g)
    A = torch.randn(r, d_in, generator=gen) / d_in**0.5
    B = torch.randn(N, d_out, r, generator=gen) / r**0.5
    W = torch.randn(g * N, d_in, generator=gen)
    return layer.to(dtype).load_stacked(A, B, W)


def leaves(layer):
    return [t.detach().clone().requires_grad_() for t in layer.stacked()]


def layer_grads(layer):
    """The layer's gradients in mtLoRA's layout: dA [r, d_in], dB [N, d_out, r], droute."""
    return [layer.lora_A.weight.grad,
            torch.stack([layer.expert(i).weight.grad for i in range(layer.num_experts)]),
            layer.lora_route.weight.grad]


def check_layer_against(layer, x, reference, tol_dtype) -> None:
    """The layer's y and the gradients of x, A, B and the router against
    ``reference(x, A, B, W)`` on leaf copies, at ``tol_dtype``'s tolerance."""
    y = layer(x)
    A, B, W = leaves(layer)
    xr = x.detach().clone().requires_grad_()
    y_ref = reference(xr, A, B, W)
    assert_close_to_reference(y, y_ref, tol_dtype, "y")
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    for name, got, want in zip(("dx", "dA", "dB", "droute"), [x.grad, *layer_grads(layer)],
                               [xr.grad, A.grad, B.grad, W.grad]):
        assert_close_to_reference(got, want, tol_dtype, name)


@pytest.mark.parametrize("lead", [(7,), (2, 5)])  # the released layer assumes 3-D input
@pytest.mark.parametrize("N", [1, 3])
def test_layer_is_hydralora_semantics(lead, N):
    layer = random_layer(12, 10, 4, N, seed=N)
    x = torch.randn(*lead, 12, dtype=torch.float64, requires_grad=True)
    check_layer_against(layer, x, lambda *t: hydralora_reference(*t, scaling=layer.scaling),
                        torch.float64)


class _MaskSequence(nn.Module):
    """Stands in for nn.Dropout: applies the given keep-masks in turn, counting its calls."""

    def __init__(self, masks, p):
        super().__init__()
        self.masks, self.p, self.calls = masks, p, 0

    def forward(self, x):
        keep = self.masks[self.calls]
        self.calls += 1
        return torch.where(keep, x / (1 - self.p), torch.zeros_like(x))


def test_layer_draws_a_fresh_dropout_mask_per_expert():
    N, p = 4, 0.3
    layer = random_layer(9, 6, 3, N, dropout=p, seed=5)
    assert isinstance(layer.lora_dropout, nn.Dropout) and layer.lora_dropout.p == p
    x = torch.randn(2, 4, 9, dtype=torch.float64)
    masks = [torch.rand(x.shape) >= p for _ in range(N)]
    assert not all(torch.equal(masks[0], m) for m in masks[1:])
    layer.lora_dropout = _MaskSequence(masks, p)
    y = layer(x)
    assert layer.lora_dropout.calls == N
    y_ref = hydralora_reference(x, *layer.stacked(), scaling=layer.scaling, dropout_masks=masks,
                                dropout_p=p)
    assert_close_to_reference(y, y_ref, torch.float64, "y")


def test_layer_without_dropout_uses_identity_and_keeps_published_names():
    layer = HydraLoRALayer(8, 6, r=2, num_experts=3, lora_dropout=0.0)
    assert isinstance(layer.lora_dropout, nn.Identity)
    assert set(layer.state_dict()) == {"lora_A.weight", "lora_route.weight", "lora_B0.weight",
                                       "lora_B1.weight", "lora_B2.weight"}
    assert layer.lora_A.weight.shape == (2, 8) and layer.expert(2).weight.shape == (6, 2)
    assert layer.lora_route.bias is None and layer.lora_A.bias is None
    assert all(not layer.expert(i).weight.any() for i in range(3))  # B starts at zero


def test_layer_casts_the_routing_weights_to_the_output_dtype():
    """The published layer: softmax in fp32, then ``.to(result.dtype)``, the base output's
    dtype. With bf16 inputs and an fp32 base output the weights stay fp32, not bf16."""
    layer = random_layer(16, 8, 4, 3, seed=2, dtype=torch.bfloat16)
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    residual = torch.randn(2, 5, 8, dtype=torch.float32)
    pi = torch.softmax(layer.lora_route(x).float(), -1)  # fp32, never rounded to bf16
    want = residual + sum(pi[..., i : i + 1] * layer.expert(i)(layer.lora_A(x)) * layer.scaling
                          for i in range(3))
    got = layer(x, residual=residual)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # bf16 weights: ~2e-3 off


@pytest.mark.parametrize("g", [2, 5, 10])  # g = d_out is per-dimension routing
def test_fine_grained_loop_matches_mix_reference(g):
    layer = random_layer(12, 10, 4, 3, g=g, seed=g)
    x = torch.randn(7, 12, dtype=torch.float64, requires_grad=True)
    # HydraLoRA's softmax runs in fp32 (dtype=torch.float32) whatever the input dtype, so even
    # in fp64 the loop carries fp32 routing weights: judge it at fp32's tolerance.
    check_layer_against(layer, x, lambda *t: mix_reference(*t, groups=g, scaling=layer.scaling),
                        torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,d_in,d_out,r,N,g", [
    (7, 12, 10, 4, 3, 1),
    (1, 9, 20, 2, 4, 2),
    (33, 16, 64, 4, 4, 4),  # g*N*r = 64 <= d_out: folded GEMM
    (33, 16, 12, 4, 4, 12),  # g = d_out: the per-expert path
])
def test_eager_formulation_matches_reference(T, d_in, d_out, r, N, g, dtype):
    """fp32 / fp64 against the fp64 reference; bf16 / fp16 (the benchmark's GPU dtype) also
    within 2x the error of the reference computed in that dtype (plain PyTorch)."""
    gen = torch.Generator().manual_seed(T + g)
    args = [torch.randn(*s, generator=gen, dtype=torch.float64) * sc for s, sc in
            (((2, T, d_in), 1.0), ((r, d_in), d_in**-0.5), ((N, d_out, r), r**-0.5),
             ((g * N, d_in), 1.0))]
    runs = {"ours": dtype, "ref": torch.float64, "plain": dtype}
    leaves = {k: [t.to(dt).clone().requires_grad_() for t in args] for k, dt in runs.items()}
    y = hydralora_eager(*leaves["ours"], groups=g, scaling=1.5)
    y_ref, y_plain = (mix_reference(*leaves[k], groups=g, scaling=1.5) for k in ("ref", "plain"))
    low = dtype in (torch.bfloat16, torch.float16)
    assert y.shape == (2, T, d_out) and y.dtype == dtype
    assert_close_to_reference(y, y_ref, dtype, "y", y_plain if low else None)
    dy = torch.randn(y.shape, dtype=torch.float64, generator=gen)
    for out in (y, y_ref, y_plain):
        out.backward(dy.to(out.dtype))
    for i, name in enumerate(("dx", "dA", "dB", "droute")):
        assert_close_to_reference(leaves["ours"][i].grad, leaves["ref"][i].grad, dtype, name,
                                  leaves["plain"][i].grad if low else None)


def test_eager_dropout_is_one_mask_shared_by_experts():
    gen = torch.Generator().manual_seed(1)
    x, A, B, W = (torch.randn(*s, generator=gen, dtype=torch.float64) for s in
                  ((6, 8), (3, 8), (2, 6, 3), (2, 8)))
    torch.manual_seed(7)
    y = hydralora_eager(x, A, B, W, scaling=2.0, dropout_p=0.4)
    torch.manual_seed(7)
    kept = torch.nn.functional.dropout(torch.ones_like(x), 0.4) != 0  # the same draw
    y_ref = mix_reference(x, A, B, W, scaling=2.0, dropout_mask=kept, dropout_p=0.4)
    assert_close_to_reference(y, y_ref, torch.float64, "y")
    assert torch.equal(hydralora_eager(x, A, B, W, scaling=2.0, dropout_p=0.4, training=False),
                       hydralora_eager(x, A, B, W, scaling=2.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_our_op_loads_hydralora_and_computes_its_semantics(dtype):
    """g = 1, no dropout: MTLoRAAdapter with HydraLoRA's checkpoint = HydraLoRA's layer."""
    hydra = random_layer(16, 12, 4, 5, seed=3, dtype=torch.float64)
    ours = MTLoRAAdapter(16, 12, MTLoRAConfig(r=4, num_experts=5, groups=1, alpha=12.0,
                                              dropout=0.0, backend="torch")).to(dtype)
    ours.load_hydralora_state_dict({k: v.to(dtype) for k, v in hydra.state_dict().items()})
    x64 = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    x = x64.detach().to(dtype).requires_grad_()
    y_ref, y = hydra(x64), ours(x)
    # HydraLoRA's routing is fp32 even on fp64 input: fp32's tolerance is the finest that applies
    tol_dtype = torch.float32
    assert_close_to_reference(y, y_ref, tol_dtype, "y")
    dy = torch.randn_like(y_ref)
    y_ref.backward(dy)
    y.backward(dy.to(dtype))
    for name, got, want in zip(("dx", "dA", "dB", "droute"),
                               (x.grad, ours.lora_A.grad, ours.lora_B.grad, ours.lora_route.grad),
                               (x64.grad, *layer_grads(hydra))):
        assert_close_to_reference(got, want, tol_dtype, name)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="groups=3 must divide out_features=10"):
        HydraLoRALayer(8, 10, groups=3)
    with pytest.raises(ValueError, match="r must be >= 1, got 0"):
        HydraLoRALayer(8, 10, r=0)
    layer = HydraLoRALayer(8, 10, r=2, num_experts=3)
    with pytest.raises(ValueError, match=r"x must have shape \[..., d_in=8\]"):
        layer(torch.randn(4, 9))
    with pytest.raises(ValueError, match=r"B must have shape \[3, 10, 2\]"):
        layer.load_stacked(torch.randn(2, 8), torch.randn(3, 2, 10), torch.randn(3, 8))
    with pytest.raises(ValueError, match=r"route_weight must have shape \[g\*N=4, d_in=8\]"):
        hydralora_eager(torch.randn(4, 8), torch.randn(2, 8), torch.randn(2, 10, 2),
                        torch.randn(3, 8), groups=2)


SIZES = dict(in_features=8, out_features=10, r=2, num_experts=2, groups=1)


@pytest.mark.parametrize("value", [np.int64(2), torch.tensor(2)], ids=["np.int64", "tensor"])
def test_sizes_of_any_integer_type_are_taken_as_python_ints(value):
    layer = HydraLoRALayer(value, value, r=value, num_experts=value, groups=value)
    assert [(getattr(layer, k), type(getattr(layer, k))) for k in SIZES] == [(2, int)] * 5
    assert layer.lora_A.weight.shape == (2, 2)


@pytest.mark.parametrize("value", [True, np.True_, torch.tensor(True)],
                         ids=["bool", "np.bool", "bool-tensor"])
@pytest.mark.parametrize("name", list(SIZES))
def test_bool_sizes_are_refused(name, value):
    with pytest.raises(TypeError, match=f"{name} must be an integer, got"):
        HydraLoRALayer(**{**SIZES, name: value})
