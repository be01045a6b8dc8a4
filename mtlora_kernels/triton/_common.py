"""Small pieces shared by the Triton kernels of the package: padding, the interpreter switch and
the products every GEMM of the mix kernels goes through (tensor cores, but the fp32 router
logits on the FMA units)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True when kernels run in Triton's CPU interpreter: ``TRITON_INTERPRET`` read as Triton
    reads it (``triton.knobs``: 1, true, on, yes, any case), so that the launchers' UPCAST
    workaround is on whenever the interpreter runs (read as ``== "1"``, ``true`` ran the
    interpreter with bf16 ``tl.dot`` unpatched)."""
    return bool(triton.knobs.runtime.interpret)


# The launchers' host arithmetic. triton.cdiv and triton.next_power_of_2 are constexpr
# functions (for use inside kernels): called on the host each costs 1.8 us (triton 3.8), and a
# decode step's forward launcher called them 7 times.


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` of ints a >= 0, b > 0."""
    return (a + b - 1) // b


def pow2_at_least(n: int, floor: int = 1) -> int:
    """The smallest power of two >= max(n, floor)."""
    return max(floor, 1 << (max(1, n) - 1).bit_length())


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
def _tf32_round(x):
    """``cvt.rna.tf32.f32``: x to 10 mantissa bits, to nearest with ties away from zero
    (infinities and NaN kept)."""
    u = x.to(tl.uint32, bitcast=True)
    special = (u & 0x7F800000) == 0x7F800000
    return tl.where(special, u, (u + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _tf32_truncate(x):
    """An fp32 register read by the tensor cores in TF32 mode: its low 13 bits ignored."""
    return (x.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _tf32x3_interpreted(a, b, acc):
    """What ``tl.dot(a, b, acc, input_precision="tf32x3")`` computes on a GPU, for the
    interpreter, which computes every fp32 product exactly whatever the precision asked: the
    decomposition of triton 3.6's and 3.8's TTGIR for sm_90 (big = round(a), small = a - big,
    read truncated; big*big + big*small + small*big, the small*small term dropped, NaN of the
    small terms zeroed). About 22 significant bits, not fp32's 24; the products of TF32 values
    are exact in fp32, so only the accumulation order and its rounding differ from the GPU's."""
    a_big, b_big = _tf32_round(a), _tf32_round(b)
    zero = tl.zeros(acc.shape, dtype=tl.float32)
    t = tl.dot(_tf32_truncate(a - a_big), b_big, zero, input_precision="ieee")
    t = tl.dot(a_big, _tf32_truncate(b - b_big), t, input_precision="ieee")
    t = tl.where(t != t, 0.0, t)
    return tl.dot(a_big, b_big, t, input_precision="ieee") + acc


@triton.jit
def mma(a, b, acc, UPCAST: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation.

    fp16 / bf16 operands go to the tensor cores as they are. fp32 operands use
    ``input_precision="tf32x3"`` (about 22 significant bits: :func:`_tf32x3_interpreted`):
    plain TF32 would cost fp32 inputs ~1e-3 relative error (the fp32 tolerance is 1e-5, and
    torch's fp32 matmul is exact by default), while "ieee" runs on the FMA units in a layout
    that spilled 0.6-4 KB per thread (ptxas, 64 x 64 tiles, sm_80 and sm_90). UPCAST (set by
    the launchers under ``TRITON_INTERPRET=1`` only) runs 16-bit products in fp32 because the
    Triton 3.8 interpreter returns garbage for bf16 ``tl.dot`` (SPEC section 6), and fp32
    products as the GPU's tf32x3 computes them; it is never set on a GPU.
    """
    if UPCAST:
        if a.dtype == tl.float32:
            return _tf32x3_interpreted(a, b.to(tl.float32), acc)
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="tf32x3")
    return tl.dot(a, b, acc)


@triton.jit
def mma_logits(a, b, acc, UPCAST: tl.constexpr):
    """``acc + a @ b`` for the router logits ``x · W_route^T``: as :func:`mma`, but fp32
    operands in full fp32 ("ieee", the FMA units). The softmax sees the logits' absolute
    errors: with logits near 1e4 that share most of their value across a group's experts
    (tests/test_extreme.py, test_router_offset_shared_by_a_group_cancels_in_dx), tf32x3's ~22
    bits put pi 3.5e-3 off (tolerance 2.9e-3, measured with :func:`_tf32x3_interpreted`).
    The product is [BT, d_in] x [d_in, ZW = max(32, N_PAD)] per tile, small beside the FMA
    tiles that spilled in :func:`mma`, though the fp32 forward spills 4-252 B with it."""
    if a.dtype == tl.float32:
        return tl.dot(a, b.to(tl.float32), acc, input_precision="ieee")
    return mma(a, b, acc, UPCAST)


@triton.jit
def mma_fp32(a, b, acc, UPCAST: tl.constexpr):
    """``acc + a @ b`` for an fp32 ``a`` kept at about 22 bits (tf32x3), never rounded to 16 bits,
    and ``b`` of any float dtype.

    For products whose fp32 operand must not be rounded to 16 bits: softmax gradients sum to
    zero over each group's experts, so the part of W_route shared by a group's rows cancels
    exactly in ``dz · W_route``, and only while dz keeps its fp32 bits (rounded to bf16, dx was
    off by up to 90% with router logits of ~1e4, tests/test_extreme.py). ``tf32x3`` keeps about
    22 bits on the tensor cores (3 TF32 passes), which those tests pass with; the interpreter
    computes it as the GPU does (:func:`_tf32x3_interpreted`).
    """
    if UPCAST:
        return _tf32x3_interpreted(a, b.to(tl.float32), acc)
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
    An fp32 ``b`` takes :func:`mma`'s product (tf32x3).

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
