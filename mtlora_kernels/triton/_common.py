"""Small pieces shared by the Triton kernels of the package: padding, the interpreter switch and
the tensor-core product every GEMM of the mix kernels goes through."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True when kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def pow2_at_least(n: int, floor: int = 1) -> int:
    """The smallest power of two >= max(n, floor)."""
    return max(floor, triton.next_power_of_2(max(1, n)))


def target_programs(device: torch.device) -> int:
    """How many programs a launch should have to fill the device: two per SM on a GPU (one
    resident, one waiting behind it). The interpreter runs programs one after another, so
    there 8 is enough to exercise the split paths without slowing the tests. Meta tensors
    (the kernel report's recorded launches) stand for an H100 SXM: 132 SMs."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    if device.type == "meta":
        return 2 * 132
    return 8


@triton.jit
def mma(a, b, acc, UPCAST: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation.

    fp16 / bf16 operands go to the tensor cores as they are. fp32 operands use
    ``input_precision="tf32x3"``: plain TF32 would cost fp32 inputs ~1e-3 relative error (the
    fp32 tolerance is 1e-5, and torch's fp32 matmul is exact by default), while "ieee" runs on
    the FMA units in a layout that spilled 0.6-4 KB per thread (ptxas, 64 x 64 tiles, sm_80 and
    sm_90). UPCAST (set by the launchers under ``TRITON_INTERPRET=1`` only) runs the product in
    fp32 because the Triton 3.8 interpreter returns garbage for bf16 ``tl.dot`` (SPEC section
    6); it is never set on a GPU.
    """
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="tf32x3")
    return tl.dot(a, b, acc)


@triton.jit
def mma_fp32(a, b, acc, UPCAST: tl.constexpr):
    """``acc + a @ b`` to fp32 accuracy for an fp32 ``a`` and ``b`` of any float dtype.

    For products whose fp32 operand must not be rounded to 16 bits: softmax gradients sum to
    zero over each group's experts, so the part of W_route shared by a group's rows cancels
    exactly in ``dz · W_route``, and only while dz keeps its fp32 bits (rounded to bf16, dx was
    off by up to 90% with router logits of ~1e4, tests/test_extreme.py). ``tf32x3`` keeps fp32
    accuracy on the tensor cores (3 TF32 passes); the interpreter uses "ieee".
    """
    if UPCAST:
        return tl.dot(a, b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b.to(tl.float32), acc, input_precision="tf32x3")


@triton.jit
def mma_split(a, b, acc, UPCAST: tl.constexpr):
    """``acc + a @ b`` for an fp32 ``a`` and a ``b`` of the input dtype, with ``a`` carried to
    about 16 significant bits by two 16-bit halves (``hi = a`` rounded, ``lo = a - hi``
    rounded; two tensor-core products into one accumulator). For dh and dz where they are
    summed over tokens (dA, dW_route) or enter dx: rounded to bf16 alone, dA / dx of an
    ill-conditioned fuzz example (cancellation over 4 tokens) were 7.4% / 9.4% off, over the
    fuzz's tolerance, where the torch backend (dh in fp32) was 0.7% / 1.7% off
    (tests/test_fuzz.py, test_regression_bf16_dA_dx_cancelling_over_tokens). Cheaper than
    ``mma_fp32``, whose fp32 copy of ``b`` spilled up to 680 bytes in these kernels (sm_80).
    An fp32 ``b`` takes the plain fp32 product.

    fp16: ``lo`` is stored times 2^11 and its product scaled back on the accumulator (exact
    power-of-two scalings, no second accumulator): for a value below fp16's normal range
    (~6e-5) what ``hi`` loses is below 2^-25, which fp16's subnormal grid (2^-24) would round
    away unscaled. With it, fp16 dW_route with dz ~1e-6 went from 1.09% to within the 0.77%
    tolerance (tests/test_fuzz.py, test_regression_fp16_dW_route_with_subnormal_dz). No
    overflow: ``|a - hi| <= |a| * 2^-11`` in the normal range. bf16 has fp32's exponent range
    and needs no scale (with it, the dA/dW kernel spilled 16 B at the decode launch, sm_90).
    """
    if b.dtype == tl.float32:
        return mma(a, b, acc, UPCAST)
    hi = a.to(b.dtype)
    lo = a - hi.to(tl.float32)
    if b.dtype == tl.float16:
        return mma((lo * 2048.0).to(b.dtype), b, mma(hi, b, acc, UPCAST) * 2048.0,
                   UPCAST) * (1.0 / 2048.0)
    return mma(lo.to(b.dtype), b, mma(hi, b, acc, UPCAST), UPCAST)
