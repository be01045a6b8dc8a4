"""Bad input gives a clear error naming the argument and the expected shape."""

import numpy as np
import pytest
import torch
from conftest import assert_close_to_reference

from mtlora_kernels import MTLoRAAdapter, MTLoRAConfig, mix, mix_reference


@pytest.fixture
def ok():
    return dict(x=torch.randn(5, 8), A=torch.randn(2, 8), B=torch.randn(3, 6, 2),
                W=torch.randn(2 * 3, 8))


def call(ok, **kw):
    args = {**ok, **kw}
    extra = {k: v for k, v in args.items() if k not in ("x", "A", "B", "W")}
    return mix(args["x"], args["A"], args["B"], args["W"], **{"groups": 2, **extra})


@pytest.mark.parametrize("kw,exc,pattern", [
    (dict(x=torch.randn(5, 7)), ValueError, r"x must have shape \[\.\.\., d_in=8\]"),
    (dict(A=torch.randn(2, 8, 1)), ValueError, r"lora_A must have shape \[r, d_in\]"),
    (dict(B=torch.randn(3, 6)), ValueError, r"lora_B must have shape \[N, d_out, r\]"),
    (dict(B=torch.randn(3, 6, 4)), ValueError, r"lora_B must have shape \[N, d_out, r=2\]"),
    (dict(W=torch.randn(5, 8)), ValueError, r"route_weight must have shape \[g\*N=6, d_in=8\]"),
    (dict(groups=4), ValueError, r"groups must be a positive divisor of d_out=6"),
    (dict(groups=0), ValueError, r"groups must be a positive divisor"),
    (dict(groups=2.0), TypeError, r"groups must be an integer, got float 2.0"),
    (dict(groups=True), TypeError, r"groups must be an integer, got bool True"),
    (dict(W=torch.randn(6, 8, dtype=torch.float64)), TypeError, r"route_weight has dtype"),
    (dict(A=torch.randn(2, 8).half()), TypeError, r"lora_A has dtype torch.float16"),
    (dict(x=torch.randint(0, 3, (5, 8))), TypeError, r"x must be a floating tensor"),
    (dict(W=None), ValueError, r"N=3 experts need a router"),
    (dict(logits=torch.randn(5, 6)), ValueError, r"either route_weight .* not both"),
    (dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
    (dict(dropout_p=0.1, seed=-1), ValueError, r"seed must be in \[0, 2\^63\), got -1"),
    (dict(dropout_p=0.1, seed=2**63), ValueError,
     r"seed must be in \[0, 2\^63\), got 9223372036854775808"),
    (dict(dropout_p=0.1, seed=1.5), TypeError, r"seed must be an integer, got float 1.5"),
    (dict(scaling=float("nan")), ValueError, r"scaling must be finite"),
    (dict(scaling=-float("inf")), ValueError, r"scaling must be finite, got -inf"),
    # a string failed in a comparison ("'<=' not supported"), a complex number in float(), and
    # a tensor that requires grad was detached without a word
    (dict(dropout_p="0.1"), TypeError, r"dropout_p must be a real number, got str '0.1'"),
    (dict(scaling=1j), TypeError, r"scaling must be a real number, got complex 1j"),
    (dict(scaling=torch.tensor(2.0, requires_grad=True)), TypeError,
     r"scaling is a constant of the op and takes no gradient"),
    (dict(scaling=torch.tensor([2.0])), TypeError, r"scaling must be a real number, got Tensor"),
    # a bool is no real number (True would be a scaling of 1); nor is a complex tensor; a
    # one-element tensor of some dimensions is no integer (as numpy refuses such arrays)
    (dict(scaling=True), TypeError, r"scaling must be a real number, got bool True"),
    (dict(scaling=torch.tensor(1j)), TypeError, r"scaling must be a real number, got Tensor"),
    (dict(groups=torch.tensor([2])), TypeError, r"groups must be an integer, got Tensor"),
    (dict(residual=torch.randn(5, 7)), ValueError, r"residual must have shape \(5, 6\)"),
    (dict(backend="fast"), ValueError, r"backend must be one of"),
    # d_in = 0 failed in a reshape ("cannot reshape tensor of 0 elements into shape [-1, 0]")
    (dict(x=torch.randn(5, 0), A=torch.randn(2, 0), W=torch.randn(6, 0)), ValueError,
     r"need r, d_in, N, d_out >= 1; got lora_A \(2, 0\)"),
])
def test_bad_input_is_named(ok, kw, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call(ok, **kw)


def test_integer_groups_of_any_integral_type_are_taken(ok):
    """A numpy integer (read from a config array, say) is a group count like an int."""
    assert torch.equal(call(ok, groups=np.int64(2)), call(ok))


# Integer arguments take any integer type (numpy, a 0-d tensor) and never a bool, whatever
# its type: True as a group count or a seed is a mistake, not a 1.
INTEGERS = pytest.mark.parametrize("value", [np.int64(2), np.int32(2), torch.tensor(2)],
                                   ids=["np.int64", "np.int32", "tensor"])
BOOLS = pytest.mark.parametrize("value", [True, np.True_, torch.tensor(True)],
                                ids=["bool", "np.bool", "bool-tensor"])


@INTEGERS
def test_mix_integer_arguments_of_any_integer_type_are_taken(ok, value):
    want = call(ok, groups=2, dropout_p=0.5, seed=2)
    assert torch.equal(call(ok, groups=value, dropout_p=0.5, seed=2), want)
    assert torch.equal(call(ok, groups=2, dropout_p=0.5, seed=value), want)


@BOOLS
@pytest.mark.parametrize("name", ["groups", "seed"])
def test_mix_refuses_bools_as_integers(ok, name, value):
    with pytest.raises(TypeError, match=f"{name} must be an integer, got"):
        call(ok, **{"dropout_p": 0.5, name: value})


def test_bad_external_logits(ok):
    base = dict(ok, W=None)
    with pytest.raises(ValueError, match=r"logits must have shape \(5, 6\)"):
        call(base, logits=torch.randn(5, 3))
    for bad in (float("nan"), float("inf")):
        lg = torch.randn(5, 6)
        lg[2, 1] = bad
        with pytest.raises(ValueError, match="NaN or \\+inf"):
            call(base, logits=lg)
    lg = torch.randn(5, 6)
    lg[:, 0] = float("-inf")  # a masked expert is fine
    assert torch.isfinite(call(base, logits=lg)).all()
    # Logits on the meta device (shape propagation) skip the value check.
    y = call({k: v.to("meta") if v is not None else None for k, v in base.items()},
             logits=lg.to("meta"))
    assert y.device.type == "meta" and y.shape == (5, 6)


def test_unavailable_backend_is_a_clear_error(ok):
    with pytest.raises(RuntimeError, match="'cuda' was requested but is unavailable"):
        call(ok, backend="cuda")


def test_env_backend_is_honoured(ok, monkeypatch):
    monkeypatch.setenv("MTLORA_BACKEND", "nope")
    with pytest.raises(ValueError, match="backend must be one of"):
        call(ok)
    # A valid name is the backend used (cuda: unavailable for these CPU tensors) ...
    monkeypatch.setenv("MTLORA_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="'cuda' was requested but is unavailable"):
        call(ok)
    # ... unless the call names one.
    y = call(ok, backend="torch", scaling=0.5)
    ref = mix_reference(*(ok[k].double() for k in ("x", "A", "B", "W")), groups=2, scaling=0.5)
    assert_close_to_reference(y, ref, torch.float32, "backend= over $MTLORA_BACKEND")


@pytest.mark.parametrize("usable,dtype,r,n,want", [
    ({"cuda", "triton"}, torch.bfloat16, 16, 16, "cuda"),
    ({"cuda", "triton"}, torch.float64, 16, 16, "torch"),  # neither kernel takes fp64
    ({"triton"}, torch.float32, 128, 64, "triton"),
    ({"triton"}, torch.float32, 129, 4, "torch"),           # triton: r <= 128
    ({"triton"}, torch.float16, 16, 65, "torch"),           # triton: N <= 64
    ({"cuda", "triton"}, torch.float16, 256, 128, "cuda"),  # cuda: any r and N
])
def test_auto_skips_a_backend_that_cannot_take_the_inputs(monkeypatch, usable, dtype, r, n, want):
    """On a CUDA device ``auto`` takes cuda, then triton, then torch, skipping a backend
    whose ``unsupported`` names a reason (no GPU needed: availability is patched)."""
    from mtlora_kernels import backends
    from mtlora_kernels.ops.mix import resolve_backend

    monkeypatch.setattr(backends, "available",
                        lambda name, device=None: (name in usable or name == "torch", ""))
    assert resolve_backend("auto", torch.device("cuda"), dtype, r, n) == want
    # asked for by name, a backend is never swapped (its forward raises the reason instead,
    # tests/test_triton_mix.py::test_bad_input_is_rejected_with_the_argument_named)
    assert resolve_backend("triton", torch.device("cuda"), dtype, r, n) == "triton"


def test_empty_input_returns_empty(ok):
    y = call(ok, x=torch.randn(0, 8))
    assert y.shape == (0, 6)
    y3 = call(ok, x=torch.randn(2, 0, 8))
    assert y3.shape == (2, 0, 6)


@pytest.mark.parametrize("kw,exc,pattern", [
    (dict(r=0), ValueError, "r must be >= 1"),
    (dict(num_experts=0), ValueError, "num_experts must be >= 1"),
    (dict(groups=0), ValueError, "groups must be >= 1"),
    (dict(dropout=1.5), ValueError, "dropout must be in"),
    (dict(dropout=1.0), ValueError, r"dropout must be in \[0, 1\), got 1.0"),
    (dict(dropout=-0.1), ValueError, r"dropout must be in \[0, 1\), got -0.1"),
    (dict(r=2.5), TypeError, "r must be an integer, got float 2.5"),
    (dict(groups=True), TypeError, "groups must be an integer, got bool"),
    (dict(alpha="64"), TypeError, "alpha must be a real number, got str"),
    (dict(alpha=float("inf")), ValueError, "alpha must be finite"),
    (dict(backend="cpu"), ValueError, "backend must be None or one of"),
])
def test_bad_config(kw, exc, pattern):
    with pytest.raises(exc, match=pattern):
        MTLoRAConfig(**kw)


@INTEGERS
def test_config_takes_any_integer_type_as_a_python_int(value):
    cfg = MTLoRAConfig(r=value, num_experts=value, groups=value)
    assert [(v, type(v)) for v in (cfg.r, cfg.num_experts, cfg.groups)] == [(2, int)] * 3


@BOOLS
@pytest.mark.parametrize("name", ["r", "num_experts", "groups"])
def test_config_refuses_bools(name, value):
    with pytest.raises(TypeError, match=f"{name} must be an integer, got"):
        MTLoRAConfig(**{name: value})


def test_config_stores_numpy_scalars_as_python_numbers():
    """They are accepted, and must not reach the JSON of saved adapters as numpy types."""
    import json

    import numpy as np

    cfg = MTLoRAConfig(r=np.int64(4), num_experts=np.int32(3), alpha=np.float32(8.0))
    assert type(cfg.r) is int and type(cfg.num_experts) is int and type(cfg.alpha) is float
    assert json.loads(json.dumps(cfg.to_dict()))["r"] == 4


@pytest.mark.parametrize("scaling", [np.float32(2.5), np.int64(2), torch.tensor(2.5)],
                         ids=["numpy-float", "numpy-int", "0-d-tensor"])
def test_real_scalars_of_any_kind_are_the_same_scaling(ok, scaling):
    assert torch.equal(call(ok, scaling=scaling), call(ok, scaling=float(scaling)))


def test_groups_must_divide_layer_width():
    with pytest.raises(ValueError, match="groups=3 must divide d_out=8"):
        MTLoRAAdapter(8, groups=3)


@pytest.mark.parametrize("widths,exc,pattern", [
    ((0,), ValueError, "d_in must be >= 1, got 0"),
    ((8, 0), ValueError, "d_out must be >= 1, got 0"),
    ((-4,), ValueError, "d_in must be >= 1, got -4"),
    ((8.0,), TypeError, "d_in must be an integer, got float 8.0"),
])
def test_adapter_widths_must_be_positive_integers(widths, exc, pattern):
    """A zero width built an adapter whose forward failed later (d_in) or that was empty (d_out,
    which every g divides); -4 was reported as groups not dividing it; 8.0 failed in torch."""
    with pytest.raises(exc, match=pattern):
        MTLoRAAdapter(*widths, groups=2)
