"""Shared test configuration: the tolerance table, devices, and hypothesis profiles.

Tolerances live here and nowhere else (SPEC section 5). Kernel error is judged against a
float64 reference; in low precision a backend must stay within 2x the error that plain PyTorch
makes in the same precision (flash-attention's rule), see :func:`assert_close_to_reference`.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. This must be set
# before anything imports triton, and conftest is imported before every test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Relative error (||out - ref|| / ||ref||) allowed against an fp64 reference, per input dtype.
REL_TOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 3e-2,
}

settings.register_profile(
    "ci", max_examples=int(os.environ.get("MTLORA_FUZZ_EXAMPLES", "40")), deadline=None,
    suppress_health_check=[HealthCheck.too_slow], derandomize=True, print_blob=True,
)
settings.register_profile(
    "long", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64; NaN anywhere gives inf (never passes)."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out64).all():
        return float("inf")
    denom = ref64.norm().item()
    diff = (out64 - ref64).norm().item()
    return diff / denom if denom > 0 else diff


def baseline_tolerance(baseline, ref64) -> float:
    """2x the error of plain PyTorch's ``baseline`` (None: 0). 0 where that error is not
    finite: a baseline that overflowed (s * dy in test_huge_scaling_with_a_large_upstream_gradient)
    would pass any finite result."""
    if baseline is None:
        return 0.0
    err = 2.0 * rel_err(baseline, ref64)
    return err if math.isfinite(err) else 0.0


def assert_close_to_reference(out, ref64, dtype, what: str = "", baseline=None) -> None:
    """``out`` within ``REL_TOL[dtype]`` of the fp64 ``ref64``; if a plain-PyTorch ``baseline``
    in the same low precision is given, also within 2x its error (whichever is looser) where
    that is finite (:func:`baseline_tolerance`)."""
    err = rel_err(out, ref64)
    tol = max(REL_TOL[dtype], baseline_tolerance(baseline, ref64))
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g} ({dtype})"


@pytest.fixture
def cuda_device():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU; none on this machine")
    return torch.device("cuda")


# Where every backend's inputs live: the GPU when there is one (torch, triton, cuda); else, or
# when TRITON_INTERPRET=1 was asked for, the CPU (torch, and triton through the interpreter).
DEVICE = torch.device(
    "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu")


def backend_params(accelerated_only: bool = False) -> list:
    """Every backend (or every one but torch) as a pytest param, skipped with the reason when
    it cannot run here: triton without triton, cuda on a GPU without the extension. On the CPU
    the cuda param runs the extension's kernels in the emulator of tests/cuda_emu (id
    ``cuda-emulated``; see :func:`_cuda_backend_on_cpu_is_emulated`)."""
    from mtlora_kernels import backends

    params = []
    for name in ("triton", "cuda") if accelerated_only else ("torch", "triton", "cuda"):
        if name == "cuda" and DEVICE.type == "cpu":
            params.append(pytest.param(name, id="cuda-emulated", marks=pytest.mark.emulator))
            continue
        ok, why = backends.available(name, DEVICE)
        marks = [] if ok else [pytest.mark.skip(reason=f"{name} backend unavailable: {why}")]
        params.append(pytest.param(name, id=name, marks=marks))
    return params


@pytest.fixture(autouse=True)
def _cuda_backend_on_cpu_is_emulated(request):
    """A test parametrized with ``backend="cuda"`` whose inputs live on the CPU runs the CUDA
    extension's kernels in the emulator (tests/cuda_emu) for its duration."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is None or callspec.params.get("backend") != "cuda" or DEVICE.type != "cpu":
        yield
        return
    import cuda_emu

    with pytest.MonkeyPatch.context() as mp:
        cuda_emu.install(mp)
        yield


# --------------------------------------------------------------------------------------------
# Inputs and gradients shared by the op's tests of each backend (test_mix, test_triton_mix,
# test_cuda_mix).
# --------------------------------------------------------------------------------------------


def random_inputs(T, d_in, d_out, r, N, g, *, seed=0, lead=(), route="weight", residual=False,
                  route_div=1.0, logits_scale=1.0):
    """Fresh fp64 inputs of the op, drawn in one fixed order from a generator seeded with
    ``seed``: ``[x, A, B, W, L, R]``. x [*lead, T, d_in]; A [r, d_in] / sqrt(d_in);
    B [N, d_out, r] / sqrt(r); W [g*N, d_in] / route_div when ``route == "weight"`` and N > 1;
    L [*lead, T, g*N] * logits_scale when ``route == "logits"`` and N > 1; R [*lead, T, d_out]
    when ``residual``. Absent ones are None (and draw nothing)."""
    assert route in ("weight", "logits", "none"), route
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    x = rnd(*lead, T, d_in)
    A = rnd(r, d_in) / d_in**0.5
    B = rnd(N, d_out, r) / r**0.5
    W = rnd(g * N, d_in) / route_div if route == "weight" and N > 1 else None
    L = rnd(*lead, T, g * N) * logits_scale if route == "logits" and N > 1 else None
    R = rnd(*lead, T, d_out) if residual else None
    return [x, A, B, W, L, R]


def grads_of(out, inputs, grad_out=None):
    """The gradients of ``out`` (with ``grad_out``, or a scalar loss) w.r.t. the inputs that are
    not None, in the inputs' order, with None in the slots of the None inputs (and of inputs
    that ``out`` does not depend on)."""
    live = [t for t in inputs if t is not None]
    gs = iter(torch.autograd.grad(out, live, grad_out, allow_unused=True))
    return [None if t is None else next(gs) for t in inputs]


def load_module(path: Path):
    """A script or tool that is not part of the package (python/examples, python/experiments,
    python/tools) as a module, its directory on sys.path while it loads (the experiments import
    ``common``)."""
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module
