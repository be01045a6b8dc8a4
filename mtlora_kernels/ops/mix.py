"""The fused mtLoRA mix: validation, backend dispatch, autograd, and the torch backend.

Every backend (torch here, ``mtlora_kernels.triton.mix``, the CUDA extension ``_C``) implements
the same four functions on 2-D, contiguous tensors; this module does everything else once:

``forward(x, A, B, route_weight, logits, residual, groups, scaling, dropout_p, seed)``
    x [T, d_in]; A [r, d_in]; B [N, d_out, r]; route_weight [g*N, d_in] or None; logits
    [T, g*N] or None (exactly one of the two when N > 1, neither when N == 1); residual
    [T, d_out] or None. All of x's dtype, except logits (any float dtype).
    Returns ``(y, h, pi)``: y [T, d_out] in x's dtype (residual + delta when residual is given),
    h = A·drop(x) [T, r] fp32, pi [T, g, N] fp32 routing weights (fp64 for fp64 inputs).

``backward(dy, x, A, B, route_weight, h, pi, dpi, groups, scaling, dropout_p, seed, deterministic)``
    dpi [T, g, N] fp32 or None is an extra gradient on the routing weights from outside the op
    (the balance loss): it is added to the mix's own dpi before the softmax backward.
    Returns ``(dx, dA, dB, dW_route, dlogits)`` with dW_route an empty tensor when there is no
    route_weight; dlogits [T, g*N] fp32 is returned always (the router backward needs it).

``dropout_keep_mask(seed, T, d_in, p, device)``
    The boolean keep-mask the backend's forward uses for that seed; tests feed it to the
    reference. A mask is never stored between forward and backward: both regenerate it.

``unsupported(dtype, r, N)``
    Why the backend cannot take inputs of this dtype, rank and expert count, or None. ``auto``
    dispatch skips a backend that gives a reason; asked for by name, its forward raises it.
"""

from __future__ import annotations

import contextlib
import math
import os
from types import SimpleNamespace
from typing import Callable

import torch
from torch import Tensor

from mtlora_kernels import backends
from mtlora_kernels._checks import as_float, as_int

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_AUTOCAST_ELIGIBLE = (torch.float16, torch.bfloat16, torch.float32)  # autocast keeps fp64


# --------------------------------------------------------------------------------------------
# The torch backend. It is the CPU path and the fallback on a GPU without Triton; it is not the
# naive loop: it folds routing into one GEMM with K = N*r per group (SPEC section 3).
#
# Memory: besides its outputs and what it saves for backward (h [T, r], pi [T, g, N]), it holds
# whole only the dropout's bool mask [T, d_in] and, in the grouped form, H~ and u [g, T, N*r]
# (no wider than y: _use_grouped). The CPU's GEMMs cannot accumulate fp16/bf16 products into an
# fp32 result, so the products that must be fp32 (h, the router logits, dx and the weight
# gradients that reduce over T) up-cast x or dy a row chunk at a time (at T = 2048, d = 4096,
# g = 2 in bf16 the forward+backward's peak went from 94 MiB to 50 MiB on the CPU).
# --------------------------------------------------------------------------------------------

# Elements of one row chunk's temporary: 4 MiB in fp32 on the CPU; off it (a GPU, where this
# backend is the fallback) 64 MiB: each chunk costs a dozen launches, and at 4 MiB the forward
# at T = 8192, d = 4096 took 268 ops where the unchunked one took 24 (counted on the CPU; GPU
# time not measured).
_CHUNK_ELEMS = 1 << 20
_CHUNK_ELEMS_GPU = 1 << 24


def _row_chunks(T: int, width: int, device: torch.device) -> list[slice]:
    """Consecutive row slices of [0, T), each of at most the device's chunk of elements over
    ``width`` rows (at least 1)."""
    elems = _CHUNK_ELEMS if device.type == "cpu" else _CHUNK_ELEMS_GPU
    rows = max(1, elems // max(width, 1))
    return [slice(i, min(i + rows, T)) for i in range(0, T, rows)]


def _torch_keep_mask(seed: int, T: int, d_in: int, p: float, device: torch.device) -> Tensor:
    # Drawn a row chunk at a time into the boolean mask (a whole fp32 draw was the forward's
    # largest temporary); on the CPU the generator's stream makes it the mask of one whole draw.
    gen = torch.Generator(device=device).manual_seed(seed)
    keep = torch.empty(T, d_in, dtype=torch.bool, device=device)
    for rows in _row_chunks(T, d_in, device):
        u = torch.rand(rows.stop - rows.start, d_in, generator=gen, device=device)
        torch.ge(u, p, out=keep[rows])
    return keep


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype for inputs of ``dtype``: fp32, or fp64 for fp64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _use_grouped(groups: int, n_experts: int, rank: int, d_out: int) -> bool:
    # The grouped form builds H~ [g, T, N*r]. It is one GEMM per group and wins while H~ is no
    # larger than y itself (g*N*r <= d_out: 512 <= 4096 at the defaults). Beyond that (g = d_out
    # has c = 1 and K = N*r per output column) it would allocate r times y, so we switch to the
    # per-expert epilogue form, which needs one [rows, d_out] chunk at a time.
    return groups * n_experts * rank <= d_out


def _h_tilde(pi: Tensor, h: Tensor, dtype: torch.dtype) -> Tensor:
    """H~ [g, T, N*r] in ``dtype``: H~[G, t, e*r + k] = pi[t, G, e] * h[t, k]. Without the
    scaling, which multiplies the GEMMs' results in fp32 (the forward's as baddbmm's alpha):
    folded in here, a small s (1e-5) put H~ into fp16's subnormal range (y 5.9e-3 off,
    tests/test_extreme.py)."""
    T, groups, n_experts = pi.shape
    ht = pi.permute(1, 0, 2).unsqueeze(-1) * h.unsqueeze(1)
    return ht.to(dtype).reshape(groups, T, n_experts * h.shape[1])  # not -1: T may be 0


def _b_cat(B: Tensor, groups: int) -> Tensor:
    """Bcat [g, N*r, c]: Bcat[G, e*r + k, j'] = B[e, G*c + j', k]."""
    n_experts, d_out, rank = B.shape
    return B.view(n_experts, groups, d_out // groups, rank).permute(1, 0, 3, 2).reshape(
        groups, n_experts * rank, -1)


def _torch_forward(x, A, B, route_weight, logits, residual, groups, scaling, dropout_p, seed):
    T, d_in = x.shape
    n_experts, d_out, rank = B.shape
    c = d_out // groups
    dt, acc = x.dtype, acc_dtype(x.dtype)
    keep = None if dropout_p == 0.0 else _torch_keep_mask(seed, T, d_in, dropout_p, x.device)
    # h = A·drop(x) and pi = softmax(x·W_route^T) in fp32, x up-cast a row chunk at a time; the
    # 1 / (1 - p) of the dropout is applied to h, after the GEMM.
    A_acc = A.to(acc)
    W_acc = route_weight.to(acc) if route_weight is not None else None
    h = torch.empty(T, rank, dtype=acc, device=x.device)
    pi = torch.empty(T, groups, n_experts, dtype=acc, device=x.device)
    for rows in _row_chunks(T, max(d_in, groups * n_experts), x.device):
        xc = x[rows].to(acc)
        if W_acc is not None:
            pi[rows] = torch.softmax((xc @ W_acc.T).view(-1, groups, n_experts), dim=-1)
        elif logits is not None:
            pi[rows] = torch.softmax(logits[rows].to(acc).view(-1, groups, n_experts), dim=-1)
        torch.mm(xc if keep is None else xc * keep[rows], A_acc.T, out=h[rows])
    if keep is not None:
        h.mul_(1.0 / (1.0 - dropout_p))
    if W_acc is None and logits is None:
        pi.fill_(1.0)
    y = torch.empty(T, d_out, dtype=dt, device=x.device)
    if _use_grouped(groups, n_experts, rank, d_out):
        # One GEMM per group, written straight into y's columns of the group, the scaling
        # applied to its fp32 sums (alpha) and the residual added there (beta = 1; with beta =
        # 0 the input, y's own uninitialised memory, is ignored).
        out = y.view(T, groups, c).transpose(0, 1)
        ht, bcat = _h_tilde(pi, h, dt), _b_cat(B, groups)
        inp = out if residual is None else residual.view(T, groups, c).transpose(0, 1)
        torch.baddbmm(inp, ht, bcat, beta=0.0 if residual is None else 1.0, alpha=scaling,
                      out=out)
    else:
        # Per expert e: y += pi[:, G(j), e] * (h·B_e^T)[:, j], in fp32, a row chunk at a time.
        hx = h.to(dt).to(acc)  # h as the grouped form's GEMM sees it
        B_acc = B.to(acc)
        for rows in _row_chunks(T, d_out, x.device):
            yc = None
            for e in range(n_experts):
                ye = (hx[rows] @ B_acc[e].T).view(-1, groups, c)
                pe = pi[rows, :, e : e + 1]
                yc = ye.mul_(pe) if yc is None else yc.addcmul_(ye, pe)
            yc = yc.view(-1, d_out).mul_(scaling)
            if residual is not None:
                yc.add_(residual[rows])
            y[rows] = yc
    return y, h, pi


def softmax_backward(pi: Tensor, dpi: Tensor) -> Tensor:
    """``pi * (dpi - (pi * dpi).sum(-1))``, the softmax backward over the last dim, with dpi
    first shifted by its value at the row's largest pi (exact on the simplex: sum pi = 1).
    It overwrites dpi with the result.

    Why the shift: a rounded pi does not sum to 1, and the plain form weighs that defect by
    dpi itself, which for a dominant expert (pi near 1) is as large as the terms that cancel
    into a small dz. Shifted, the dominant expert's term is exactly 0 and the defect is weighed
    by differences of dpi. Measured on tests/test_fuzz.py's cancelling case (one token, pi_max
    = 0.983, |dpi| / |dz| ~ 1100, fp32): dlogits 9.6e-6 off the fp64 result -> 3.8e-7. The
    Triton and CUDA kernels apply the same shift. A non-finite dpi there shifts by 0 instead,
    so that infinities propagate as in the plain form."""
    ref = dpi.gather(-1, pi.argmax(-1, keepdim=True))
    ref = torch.where(ref.isfinite(), ref, torch.zeros_like(ref))
    dps = dpi.sub_(ref)
    return dps.sub_((pi * dps).sum(-1, keepdim=True)).mul_(pi)


def _torch_backward(dy, x, A, B, route_weight, h, pi, dpi_extra, groups, scaling, dropout_p,
                    seed, deterministic):
    del deterministic  # torch's own GEMMs have a fixed reduction order on the CPU
    T, d_in = x.shape
    n_experts, d_out, rank = B.shape
    c = d_out // groups
    dt, acc = x.dtype, acc_dtype(x.dtype)
    if _use_grouped(groups, n_experts, rank, d_out):
        ht, bcat = _h_tilde(pi, h, dt), _b_cat(B, groups)
        dyt = dy.view(T, groups, c).transpose(0, 1)  # [g, T, c]
        # dB[e, G*c + j', k] = s * sum_t H~[G, t, e*r + k] * dy[t, G*c + j'], computed as
        # H~^T·dy [g, N*r, c]: its transpose dy^T·H~ took 3x as long in bf16 on the CPU (T =
        # 2048, d = 4096, N*r = 256, one thread: 75 ms -> 25 ms at g = 1; same time in fp32).
        # Neither that product, which dB copies into B's layout, nor Bcat is kept past its use
        # (8 MiB off the fp32 peak at T = 2048, d = 4096, N = 16, g = 2: 77.5 -> 69.5 MiB).
        dB = (torch.bmm(ht.transpose(1, 2), dyt).to(acc).mul_(scaling)
              .view(groups, n_experts, rank, c).permute(1, 0, 3, 2).reshape(B.shape))
        del ht
        # u[G, t, e, k] = sum_{j in G} dy[t, j] B[e, j, k]
        u = torch.bmm(dyt, bcat.transpose(1, 2)).to(acc).view(groups, T, n_experts, rank)
        del bcat
        dh = torch.einsum("tge,gtek->tk", pi, u).mul_(scaling)
        dpi = torch.einsum("tk,gtek->tge", h, u).mul_(scaling)
        del u
    else:
        # Per expert and row chunk, in fp32: w = dy * pi_e per column, dB[e] = s * w^T·h,
        # dh += s * w·B_e, dpi[:, :, e] = s * sum over the group's columns of dy * (h·B_e^T).
        # The scaling multiplies the sums, as in the grouped form, not dy: s * dy overflowed
        # fp32 (s = 1e30, |dy| = 1e9) where the gradients are finite (tests/test_extreme.py).
        hx = h.to(dt).to(acc)
        B_acc = B.to(acc)
        dB = torch.zeros(B.shape, dtype=acc, device=x.device)
        dh = torch.zeros(T, rank, dtype=acc, device=x.device)
        dpi = torch.empty(T, groups, n_experts, dtype=acc, device=x.device)
        for rows in _row_chunks(T, d_out, x.device):
            dyc = dy[rows].to(acc).view(-1, groups, c)
            for e in range(n_experts):
                w = (dyc * pi[rows, :, e : e + 1]).view(-1, d_out)
                dB[e].addmm_(w.T, hx[rows])
                # Not addmm_: the CPU's GEMM accumulating into dh's running value made dh (so
                # dx, dA) less accurate than adding w·B_e after its own product, 2x to 6x at
                # one row (fp32, T = 1, d = 4096, N = 16, g = 64: dA 5.2e-6 off the fp64
                # result -> 1.2e-6, plain PyTorch's 1.2e-6; median of 5 seeds), 1.25x at
                # T = 512 (5.4e-7 -> 4.3e-7).
                dh[rows].add_(w @ B_acc[e])
                ye = (hx[rows] @ B_acc[e].T).view(-1, groups, c)
                dpi[rows, :, e] = ye.mul_(dyc).sum(-1).mul_(scaling)
        dB.mul_(scaling)
        dh.mul_(scaling)
    if dpi_extra is not None:
        dpi.add_(dpi_extra)
    dz = softmax_backward(pi, dpi).reshape(T, groups * n_experts)
    # dA = dh^T·drop(x), dW_route = dz^T·x, dx = mask * (dh·A) / (1 - p) + dz·W_route, with x
    # up-cast a row chunk at a time; the 1 / (1 - p) goes into dh. dz sums to 0 over each
    # group's experts, so the part of W_route a group's rows share cancels exactly in dz·W_route;
    # rounding dz to fp16/bf16 first breaks the cancellation (dx off by 22% / 100% with router
    # logits of ~1e4), so this product stays in fp32.
    keep = None if dropout_p == 0.0 else _torch_keep_mask(seed, T, d_in, dropout_p, x.device)
    if keep is not None:
        dh = dh * (1.0 / (1.0 - dropout_p))
    A_acc = A.to(acc)
    W_acc = route_weight.to(acc) if route_weight is not None else None
    dA = torch.zeros(rank, d_in, dtype=acc, device=x.device)
    dW = torch.zeros_like(W_acc) if W_acc is not None else x.new_empty(0)
    dx = torch.empty(T, d_in, dtype=dt, device=x.device)
    for rows in _row_chunks(T, d_in, x.device):
        xc = x[rows].to(acc)
        if W_acc is not None:
            dW.addmm_(dz[rows].T, xc)
        dA.addmm_(dh[rows].T, xc if keep is None else xc * keep[rows])
        dxc = dx[rows] if dt == acc else torch.empty(xc.shape, dtype=acc, device=x.device)
        torch.mm(dh[rows], A_acc, out=dxc)
        if keep is not None:
            dxc.mul_(keep[rows])
        if W_acc is not None:
            dxc.addmm_(dz[rows], W_acc)
        if dt != acc:
            dx[rows] = dxc
    return dx, dA.to(A.dtype), dB.to(B.dtype), dW.to(x.dtype), dz


TORCH_BACKEND = SimpleNamespace(
    forward=_torch_forward, backward=_torch_backward, dropout_keep_mask=_torch_keep_mask,
    unsupported=lambda dtype, r, n_experts: None,  # any float dtype, any r and N
)


# --------------------------------------------------------------------------------------------
# Dispatch: one place. auto = cuda if the extension loaded and the tensor is on a GPU, else
# triton on a GPU, else torch (SPEC section 3).
# --------------------------------------------------------------------------------------------


BACKEND_NAMES = ("auto", "torch", "triton", "cuda")


def resolve_backend(name: str | None, device: torch.device, dtype: torch.dtype | None = None,
                    r: int = 1, n_experts: int = 1) -> str:
    """The concrete backend name for ``name`` (None means ``$MTLORA_BACKEND`` or ``auto``).

    ``auto`` takes, on a CUDA device, the first of cuda, triton that is available and supports
    ``dtype`` (when given), r and n_experts; torch otherwise."""
    name = name or os.environ.get("MTLORA_BACKEND", "auto")
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}; got {name!r}")
    if name == "auto":
        for candidate in ("cuda", "triton") if device.type == "cuda" else ():
            if backends.available(candidate, device)[0] and (
                    dtype is None
                    or get_backend(candidate).unsupported(dtype, r, n_experts) is None):
                return candidate
        return "torch"
    ok, why = backends.available(name, device)
    if not ok:
        raise RuntimeError(f"backend {name!r} was requested but is unavailable: {why}")
    return name


def get_backend(name: str) -> SimpleNamespace:
    """The module-like object with forward / backward / dropout_keep_mask / unsupported for a
    concrete name."""
    if name == "torch":
        return TORCH_BACKEND
    return backends.load(name)


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype of the autocast region enabled for ``device``'s type here, else None."""
    kind = device.type
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return None


def compute_dtype(dtype: torch.dtype, autocast: torch.dtype | None) -> torch.dtype:
    """The dtype ``mix`` computes a tensor of ``dtype`` in, in an autocast region of dtype
    ``autocast`` (None: outside one): the region's where ``dtype`` is fp16, bf16 or fp32, else
    its own (fp64 stays fp64)."""
    return autocast if autocast is not None and dtype in _AUTOCAST_ELIGIBLE else dtype


def _autocast_off(device: torch.device):
    """A backend computes in its inputs' dtype with its own accumulation: a caller's autocast
    region (``mix`` casts the inputs itself) must not recast the ops inside it. It did: the
    torch backend's fp32 h came back bf16 and its backward failed on the mixed dtypes."""
    if _autocast_dtype(device) is None:  # entering torch.autocast costs ~5 us: only if on
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


# --------------------------------------------------------------------------------------------
# torch.library registration: one custom op for each direction, fake implementations for
# torch.compile, and autograd wired between them. Optional outputs are empty tensors.
#
# The dropout seed: a negative `seed` makes the forward op draw one from torch's default
# (CPU) generator and return it as a 0-d int64 CPU tensor, which the backward op reads (any
# other seed is passed as it is, and that output is an empty tensor on x's device: no CPU
# tensor in inference graphs, which CUDA graphs would have to split around). The draw happens
# inside the op because under torch.compile the op's body is not traced: drawn in the traced
# Python (`.item()` of a random tensor) it broke the graph twice per layer in training and
# made fullgraph=True fail. torch.utils.checkpoint restores that generator before
# recomputing, so the recomputed forward draws the same seed. A compiled checkpoint region
# recomputes in its backward graph without restoring it: there the op drew a new seed, a new
# mask, and the gradients were off by O(1) (dropout 0.5). Tagged nondeterministic_seeded, the
# op is never recomputed by the compiler: its outputs are kept instead.
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("mtlora::mix_forward", mutates_args=(),
                         tags=(torch.Tag.nondeterministic_seeded,))
def _mix_forward_op(
    x: Tensor, A: Tensor, B: Tensor, route_weight: Tensor | None, logits: Tensor | None,
    residual: Tensor | None, groups: int, scaling: float, dropout_p: float, seed: int,
    backend: str, deterministic: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if seed < 0:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
        drawn = torch.tensor(seed, dtype=torch.int64)
    else:
        drawn = x.new_empty(0, dtype=torch.int64)
    with _autocast_off(x.device):
        y, h, pi = get_backend(backend).forward(
            x, A, B, route_weight, logits, residual, groups, scaling, dropout_p, seed
        )
    return y, h, pi, drawn


@_mix_forward_op.register_fake
def _(x, A, B, route_weight, logits, residual, groups, scaling, dropout_p, seed, backend,
      deterministic):
    T = x.shape[0]
    n_experts, d_out, rank = B.shape
    return (
        x.new_empty(T, d_out),
        x.new_empty(T, rank, dtype=acc_dtype(x.dtype)),
        x.new_empty(T, groups, n_experts, dtype=acc_dtype(x.dtype)),
        torch.empty((), dtype=torch.int64) if seed < 0 else x.new_empty(0, dtype=torch.int64),
    )


@torch.library.custom_op("mtlora::mix_backward", mutates_args=())
def _mix_backward_op(
    dy: Tensor, x: Tensor, A: Tensor, B: Tensor, route_weight: Tensor | None, h: Tensor,
    pi: Tensor, dpi: Tensor | None, groups: int, scaling: float, dropout_p: float, seed: int,
    drawn_seed: Tensor, backend: str, deterministic: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    with _autocast_off(x.device):
        out = get_backend(backend).backward(
            dy, x, A, B, route_weight, h, pi, dpi, groups, scaling, dropout_p,
            int(drawn_seed) if seed < 0 else seed, deterministic,
        )
    return tuple(t.contiguous() for t in out)


@_mix_backward_op.register_fake
def _(dy, x, A, B, route_weight, h, pi, dpi, groups, scaling, dropout_p, seed, drawn_seed,
      backend, deterministic):
    T = x.shape[0]
    return (
        torch.empty_like(x),
        torch.empty_like(A),
        torch.empty_like(B),
        torch.empty_like(route_weight) if route_weight is not None else x.new_empty(0),
        x.new_empty(T, pi.shape[1] * pi.shape[2], dtype=pi.dtype),
    )


def _setup_context(ctx, inputs, output):
    (x, A, B, route_weight, logits, residual, groups, scaling, dropout_p, seed, backend,
     deterministic) = inputs
    _, h, pi, drawn_seed = output
    ctx.save_for_backward(x, A, B, route_weight, h, pi, drawn_seed)
    ctx.args = (groups, scaling, dropout_p, seed, backend, deterministic)
    ctx.logits_dtype = logits.dtype if logits is not None else None
    ctx.has_residual = residual is not None
    ctx.mark_non_differentiable(h, drawn_seed)
    # An output not used downstream gets None, not zeros: pi's zero gradient was [T, g, N] fp32
    # (at g = d_out, N times y) allocated and added for nothing.
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, dh_unused, dpi, dseed_unused):
    x, A, B, route_weight, h, pi, drawn_seed = ctx.saved_tensors
    groups, scaling, dropout_p, seed, backend, deterministic = ctx.args
    if dy is None:  # only pi was used downstream
        dy = torch.zeros(x.shape[0], B.shape[1], dtype=x.dtype, device=x.device)
    dx, dA, dB, dW, dz = _mix_backward_op(
        dy.contiguous(), x, A, B, route_weight, h, pi,
        dpi.contiguous() if dpi is not None else None, groups, scaling, dropout_p, seed,
        drawn_seed, backend, deterministic,
    )
    dlogits = dz.to(ctx.logits_dtype) if ctx.logits_dtype is not None else None
    dres = dy if ctx.has_residual else None
    return (dx, dA, dB, dW if route_weight is not None else None, dlogits, dres,
            None, None, None, None, None, None)


_mix_forward_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# The public op.
# --------------------------------------------------------------------------------------------


def _check(cond: bool, msg: Callable[[], str], exc: type[Exception] = ValueError) -> None:
    """Raises ``exc(msg())`` unless ``cond``. The message is built only then: formatted at
    every call, _validate's two dozen messages (shapes, dtypes, devices) took 11 us of the
    ~140 us an adapter's decode step costs on the CPU (T = 1, d = 256)."""
    if not cond:
        raise exc(msg())


def _validate(x, A, B, route_weight, logits, residual, groups, scaling, dropout_p
              ) -> tuple[int, float, float]:
    """Raises on bad arguments; returns groups as a Python int, scaling and dropout_p as
    Python floats."""
    for name, t in (("x", x), ("lora_A", A), ("lora_B", B)):
        _check(isinstance(t, Tensor),
               lambda: f"{name} must be a torch.Tensor, got {type(t).__name__}", TypeError)
        _check(t.dtype in _FLOAT_DTYPES,
               lambda: f"{name} must be a floating tensor, got {t.dtype}", TypeError)
    _check(x.dim() >= 1, lambda: "x must have shape [..., d_in], got a 0-d tensor")
    _check(A.dim() == 2, lambda: f"lora_A must have shape [r, d_in], got {tuple(A.shape)}")
    _check(B.dim() == 3, lambda: f"lora_B must have shape [N, d_out, r], got {tuple(B.shape)}")
    rank, d_in = A.shape
    n_experts, d_out, rank_b = B.shape
    _check(x.shape[-1] == d_in,
           lambda: f"x must have shape [..., d_in={d_in}] to match lora_A [r, d_in], got "
           f"{tuple(x.shape)}")
    _check(rank_b == rank,
           lambda: f"lora_B must have shape [N, d_out, r={rank}] to match lora_A, got "
           f"{tuple(B.shape)}")
    _check(rank >= 1 and n_experts >= 1 and d_out >= 1 and d_in >= 1,
           lambda: f"need r, d_in, N, d_out >= 1; got lora_A {tuple(A.shape)}, lora_B "
           f"{tuple(B.shape)}")
    groups = as_int(groups, "groups")
    _check(groups >= 1 and d_out % groups == 0,
           lambda: f"groups must be a positive divisor of d_out={d_out}, got {groups!r}")
    dropout_p, scaling = as_float(dropout_p, "dropout_p"), as_float(scaling, "scaling")
    _check(0.0 <= dropout_p < 1.0, lambda: f"dropout_p must be in [0, 1), got {dropout_p}")
    # Not math.isfinite: under torch.compile a float that changes between calls is a SymFloat,
    # which math.isfinite cannot trace (fullgraph failed); a comparison traces (NaN fails it).
    _check(abs(scaling) < math.inf, lambda: f"scaling must be finite, got {scaling}")
    _check(route_weight is None or logits is None,
           lambda: "give either route_weight (fused linear router) or logits (router computed "
           "elsewhere), not both")
    if n_experts > 1:
        _check(route_weight is not None or logits is not None,
               lambda: f"N={n_experts} experts need a router: pass route_weight [g*N, d_in] "
               f"or logits [..., g*N]")
    others = [("lora_A", A), ("lora_B", B)]
    if route_weight is not None:
        _check(tuple(route_weight.shape) == (groups * n_experts, d_in),
               lambda: f"route_weight must have shape [g*N={groups * n_experts}, "
               f"d_in={d_in}], got {tuple(route_weight.shape)}")
        others.append(("route_weight", route_weight))
    if logits is not None:
        _check(tuple(logits.shape) == (*x.shape[:-1], groups * n_experts),
               lambda: f"logits must have shape {(*x.shape[:-1], groups * n_experts)} "
               f"([..., g*N] with x's leading dims), got {tuple(logits.shape)}")
        _check(logits.dtype in _FLOAT_DTYPES,
               lambda: f"logits must be floating, got {logits.dtype}", TypeError)
        _check(logits.device == x.device,
               lambda: f"logits is on {logits.device} but x is on {x.device}")
        if not torch.compiler.is_compiling() and logits.device.type != "meta":
            # -inf masks an expert (allowed; a group with every expert masked gives NaN, as the
            # reference: tests/test_extreme.py); NaN or +inf has no meaningful softmax. This
            # check costs one host sync on a [T, g*N] tensor, tiny next to the layer itself.
            bad = torch.isnan(logits) | (logits == float("inf"))
            _check(not bool(bad.any()),
                   lambda: "logits contain NaN or +inf; only finite values and -inf (a masked "
                   "expert) are allowed")
    if residual is not None:
        _check(tuple(residual.shape) == (*x.shape[:-1], d_out),
               lambda: f"residual must have shape {(*x.shape[:-1], d_out)}, got "
               f"{tuple(residual.shape)}")
        others.append(("residual", residual))
    for name, t in others:
        _check(t.device == x.device, lambda: f"{name} is on {t.device} but x is on {x.device}")
        _check(t.dtype == x.dtype,
               lambda: f"{name} has dtype {t.dtype} but x has {x.dtype}; cast them to one "
               f"dtype", TypeError)
    return groups, scaling, dropout_p


def mix(
    x: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    route_weight: Tensor | None = None,
    groups: int = 1,
    scaling: float = 1.0,
    dropout_p: float = 0.0,
    training: bool = True,
    *,
    logits: Tensor | None = None,
    seed: int | None = None,
    residual: Tensor | None = None,
    backend: str | None = None,
    deterministic: bool = False,
    return_routing: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """``y = residual + s * sum_e softmax(x @ W_route.T).view(..., g, N)[..., G(j), e] * (B_e @ A @ drop(x))[j]``.

    The mtLoRA adapter delta with shared A, N experts and per-group routing, forward and
    backward fused (SPEC sections 2 and 3). The arguments x to training may be passed by
    position, in SPEC section 3's order; those after them by keyword only.

    Args:
        x: [..., d_in], fp16 / bf16 / fp32 (fp64 on the torch backend), any strides.
        lora_A: [r, d_in], x's dtype.
        lora_B: [N, d_out, r], x's dtype.
        route_weight: [g*N, d_in], x's dtype; row ``G*N + e`` scores expert e for group G.
            The router sees x without dropout; its logits are accumulated and kept in fp32.
        groups: g, a divisor of d_out; g = 1 is HydraLoRA's scalar routing.
        scaling: s = alpha / r. A constant of the graph under ``torch.compile``: each distinct
            value compiles its own (a custom op's float argument is specialized), and
            ``fullgraph=True`` fails past dynamo's ``recompile_limit`` (8 by default) values.
            The layers pass their config's one value; a scale that changes every step goes
            outside the op: ``residual + s * mix(..., scaling=1.0)``.
        dropout_p: dropout on the input of A (one mask shared by all experts), active only
            when ``training``.
        training: False turns the dropout off (evaluation).
        logits: [..., g*N] router logits computed elsewhere (pooled / MLP router, task-id
            one-hot), any float dtype; receives a gradient. Exclusive with route_weight.
            With N == 1 neither is needed (plain LoRA).
        seed: the dropout seed, an int in [0, 2^63); drawn from torch's default generator
            when None.
        residual: [..., d_out] added to the result (the base layer's output) in the same pass.
        backend: 'auto' | 'torch' | 'triton' | 'cuda'; None reads ``$MTLORA_BACKEND``.
        deterministic: no atomics in the backward (bitwise reproducible gradients). The torch
            and cuda backends are deterministic in either mode; it changes triton's.
        return_routing: also return pi [..., g, N] (fp32, fp64 for fp64 inputs; differentiable:
            a loss on it, e.g. the balance loss, reaches the router through the same fused
            backward).

    Under ``torch.autocast`` mix runs as a linear layer does there: x, the weights and the
    residual, when floating and not fp64, are cast to the autocast dtype (the gradients reach
    the uncast tensors through the casts), and so is y; the logits are not cast.

    Returns:
        y [..., d_out] in x's dtype, or ``(y, pi)`` with return_routing.
    """
    autocast = _autocast_dtype(x.device) if isinstance(x, Tensor) else None
    if autocast is not None:
        x, lora_A, lora_B, route_weight, residual = (
            t.to(compute_dtype(t.dtype, autocast)) if isinstance(t, Tensor) else t
            for t in (x, lora_A, lora_B, route_weight, residual))
    groups, scaling, dropout_p = _validate(x, lora_A, lora_B, route_weight, logits, residual,
                                           groups, scaling, dropout_p)
    lead = x.shape[:-1]
    n_experts, d_out, rank = lora_B.shape
    name = resolve_backend(backend, x.device, x.dtype, rank, n_experts)
    p = dropout_p if training else 0.0
    seed = None if seed is None else as_int(seed, "seed")
    _check(seed is None or 0 <= seed < 2**63, lambda: f"seed must be in [0, 2^63), got {seed}")
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    T = x2.shape[0]
    lg = logits.reshape(T, groups * n_experts).contiguous() if logits is not None else None
    res = residual.reshape(T, d_out).contiguous() if residual is not None else None
    y, _, pi, _ = _mix_forward_op(
        x2, lora_A.contiguous(), lora_B.contiguous(),
        route_weight.contiguous() if route_weight is not None else None, lg, res,
        groups, scaling, p, (-1 if p > 0.0 else 0) if seed is None else seed,
        name, bool(deterministic),
    )
    # A view even where lead is (T,): MTLoRAAdapter hangs pi on y's node, which must not be the
    # op's own (pi leads to that one: a cycle that never frees the graph).
    y = y.view(*lead, d_out)
    if return_routing:
        return y, pi.view(*lead, groups, n_experts)
    return y


def dropout_keep_mask(seed: int, shape: tuple[int, int], p: float, device, backend: str
                      ) -> Tensor:
    """The keep-mask that ``backend`` draws for ``seed`` on a [T, d_in] input (for tests)."""
    T, d_in = shape
    return get_backend(backend).dropout_keep_mask(seed, T, d_in, p, torch.device(device))


__all__ = ["mix", "resolve_backend", "get_backend", "dropout_keep_mask"]
