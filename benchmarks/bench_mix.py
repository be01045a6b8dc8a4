"""The layer, forward and forward+backward: HydraLoRA's loop, the eager formulation and every
available backend of ours, grouped per shape and pass so pytest-benchmark compares them.

Each provider is checked against the fp64 reference on the benchmark's own inputs before it is
timed; one that disagrees fails its test instead of being timed. Run:

    pytest benchmarks/ --benchmark-only            # small shape on the CPU
    pytest benchmarks/ --benchmark-only --paper-shape
"""

from __future__ import annotations

import functools

import pytest
import torch

from mtlora_kernels import bench

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PROVIDERS, _MISSING = bench.default_providers(DEVICE)
GROUPS = [1, 2]


def _shape(request, groups: int) -> bench.Shape:
    if DEVICE.type == "cuda":
        return bench.Shape(tokens=8192, groups=groups, dtype="bf16")
    if request.config.getoption("--paper-shape"):
        return bench.Shape(tokens=2048, groups=groups)
    # 2 CPU cores: a quarter-width layer keeps the HydraLoRA loop near 10 ms per call
    return bench.Shape(tokens=256, d_in=1024, d_out=1024, groups=groups)


@functools.cache
def _inputs_and_reference(shape: bench.Shape):
    w, x, dy = bench.make_inputs(shape, DEVICE)
    return w, x, dy, bench.reference(w, x, dy, shape)


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("pass_", bench.PASSES)
@pytest.mark.parametrize("groups", GROUPS)
@pytest.mark.parametrize("provider", PROVIDERS, ids=lambda p: p.name)
def test_mix(benchmark, request, provider, groups, pass_):
    shape = _shape(request, groups)
    w, x, dy, ref = _inputs_and_reference(shape)
    runner = provider.make(w, shape)
    errs = bench.check(runner, x, dy, ref, shape)
    tol = bench.CHECK_TOL[shape.torch_dtype]
    bad = {k: v for k, v in errs.items() if not v <= tol}
    if bad:
        pytest.fail(f"{provider.name} refused, disagrees with the fp64 reference: {bad}")
    benchmark.group = f"{shape.label()} {pass_}"
    benchmark.extra_info.update(rel_err=errs, shape=shape.label())
    if pass_ == "fwd":
        def fn():
            with torch.no_grad():
                runner(x)
            _sync()
    else:
        xg = x.detach().clone().requires_grad_()

        def fn():
            xg.grad = None
            runner.zero_grad(set_to_none=True)
            runner(xg).backward(dy)
            _sync()
    benchmark(fn)
