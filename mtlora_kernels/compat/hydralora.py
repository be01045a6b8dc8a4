"""HydraLoRA, the baseline: its published layer as it computes, and the best eager rewrite of it.

:class:`HydraLoRALayer` reproduces the adapter of HydraLoRA's released code (SPEC section 4):
``lora_A`` (``nn.Linear(d_in, r)``), ``lora_B{i}`` (``nn.Linear(r, d_out)``) for each expert,
``lora_route`` (``nn.Linear(d_in, N)``, no bias), all without bias, and the loop

    pi = softmax(lora_route(x), dim=-1, dtype=fp32).to(x.dtype)
    for i in range(N): out = out + pi[..., i:i+1] * lora_B{i}(lora_A(lora_dropout(x))) * s

which recomputes ``A·x`` and draws a fresh dropout mask for every expert. With ``groups > 1`` the
same loop runs with fine-grained routing weights (router ``[g*N, d_in]``, each expert's weight
repeated over the ``c = d_out / g`` columns of its group): the naive form of mtLoRA's routing.

:func:`hydralora_eager` is the same function written as well as plain PyTorch allows (h once,
routing folded into one batched GEMM with K = N*r, autograd for the backward), so that a
speed-up of the fused op is measured against good eager code and not only against the loop.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlora_kernels._checks import as_int


class HydraLoRALayer(nn.Module):
    """``delta = sum_i softmax(route(x))[..., i:i+1] * B_i(A(drop_i(x))) * s``: HydraLoRA's adapter.

    The delta only: the frozen base linear is the caller's (its output can be passed as
    ``residual``, which the loop then accumulates onto, as the published layer does).

    Args:
        in_features: d_in. out_features: d_out.
        r: rank of the shared ``lora_A``. num_experts: N up-projections ``lora_B{i}``.
        lora_alpha: s = lora_alpha / r. lora_dropout: dropout on A's input, a fresh mask per
            expert (identity when 0, as in the released code).
        groups: 1 is HydraLoRA; g > 1 runs the loop with per-group routing (router g*N rows,
            row ``G*N + e`` = group G, expert e, as ``lora_route`` of mtLoRA).

    Defaults: r = 8, alpha = 32, N = 2 as in HydraLoRA's fine-tuning.py, dropout 0.05 as in its
    fine-tuning.sh (which also sets r = 4, N = 4).
    """

    def __init__(self, in_features: int, out_features: int, r: int = 8, num_experts: int = 2,
                 lora_alpha: float = 32.0, lora_dropout: float = 0.05, groups: int = 1) -> None:
        super().__init__()
        in_features, out_features, r, num_experts, groups = (
            as_int(v, name, minimum=1) for name, v in (
                ("in_features", in_features), ("out_features", out_features), ("r", r),
                ("num_experts", num_experts), ("groups", groups)))
        if out_features % groups:
            raise ValueError(f"groups={groups} must divide out_features={out_features}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
        self.in_features, self.out_features = in_features, out_features
        self.r, self.num_experts, self.groups = r, num_experts, groups
        self.scaling = lora_alpha / r
        self.lora_route = nn.Linear(in_features, groups * num_experts, bias=False)
        self.lora_A = nn.Linear(in_features, r, bias=False)
        for i in range(num_experts):
            setattr(self, f"lora_B{i}", nn.Linear(r, out_features, bias=False))
        self.lora_dropout = nn.Dropout(p=lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """HydraLoRA's init: A and router kaiming_uniform(a=sqrt(5)), every B zero."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.lora_route.weight, a=math.sqrt(5))
        for i in range(self.num_experts):
            nn.init.zeros_(self.expert(i).weight)

    def expert(self, i: int) -> nn.Linear:
        """The up-projection ``lora_B{i}``."""
        return getattr(self, f"lora_B{i}")

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """x [..., d_in] -> delta [..., d_out] (plus ``residual`` [..., d_out] when given)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape [..., d_in={self.in_features}], got "
                             f"{tuple(x.shape)}")
        g, n = self.groups, self.num_experts
        logits = self.lora_route(x)
        if g > 1:
            logits = logits.unflatten(-1, (g, n))
        # fp32 softmax, then the output's dtype (the published layer's .to(result.dtype)).
        out_dtype = residual.dtype if residual is not None else x.dtype
        pi = F.softmax(logits, dim=-1, dtype=torch.float32).to(out_dtype)
        out = residual
        for i in range(n):
            y = self.expert(i)(self.lora_A(self.lora_dropout(x)))
            if g == 1:
                term = pi[..., i : i + 1] * y * self.scaling
            else:  # broadcast over the c columns of each group (== repeat_interleave(c))
                term = (pi[..., :, i : i + 1] * y.unflatten(-1, (g, -1))).flatten(-2) * self.scaling
            out = term if out is None else out + term
        return out

    def stacked(self) -> tuple[Tensor, Tensor, Tensor]:
        """The weights in mtLoRA's layout: A [r, d_in], B [N, d_out, r], route [g*N, d_in]."""
        B = torch.stack([self.expert(i).weight for i in range(self.num_experts)])
        return self.lora_A.weight, B, self.lora_route.weight

    @torch.no_grad()
    def load_stacked(self, A: Tensor, B: Tensor, route: Tensor) -> "HydraLoRALayer":
        """Copy weights given in mtLoRA's layout (see :meth:`stacked`) into this layer."""
        want = (tuple(self.lora_A.weight.shape),
                (self.num_experts, self.out_features, self.r), tuple(self.lora_route.weight.shape))
        for name, t, shape in zip(("A", "B", "route"), (A, B, route), want):
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} must have shape {list(shape)}, got {tuple(t.shape)}")
        self.lora_A.weight.copy_(A)
        self.lora_route.weight.copy_(route)
        for i in range(self.num_experts):
            self.expert(i).weight.copy_(B[i])
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"num_experts={self.num_experts}, groups={self.groups}, scaling={self.scaling}")


def hydralora_eager(x: Tensor, lora_A: Tensor, lora_B: Tensor, route_weight: Tensor, *,
                    groups: int = 1, scaling: float = 1.0, dropout_p: float = 0.0,
                    training: bool = True) -> Tensor:
    """``s * sum_e softmax(x @ W_route.T, fp32).to(x.dtype).view(..., g, N)[..., G(j), e] * (B_e @ A @ drop(x))[j]``.

    HydraLoRA's delta (``groups`` = 1; g > 1 the fine-grained routing) in the fastest plain,
    eager PyTorch we could write, differentiated by autograd: h = A·drop(x) once with one mask,
    and the mix folded into ONE batched GEMM per group with K = N*r:
    ``y[:, G] = s * H~_G · Bcat_G`` with ``H~_G[t, e*r + k] = pi[t, G, e] * h[t, k]``.
    When that A-operand would be larger than y (g*N*r > d_out, e.g. g = d_out) it loops over
    experts instead, still with h computed once.

    Args:
        x: [..., d_in]. lora_A: [r, d_in]. lora_B: [N, d_out, r]. route_weight: [g*N, d_in].
        All one floating dtype; the softmax runs in fp32 (fp64 for fp64) and pi is rounded
        to x's dtype, as HydraLoRA does.
    Returns [..., d_out] in x's dtype.
    """
    n, d_out, r = lora_B.shape
    if tuple(route_weight.shape) != (groups * n, x.shape[-1]) or d_out % groups:
        raise ValueError(f"route_weight must have shape [g*N={groups * n}, d_in={x.shape[-1]}] "
                         f"and groups must divide d_out={d_out}; got {tuple(route_weight.shape)}, "
                         f"groups={groups}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    T, c = x2.shape[0], d_out // groups
    h = F.linear(F.dropout(x2, dropout_p, training), lora_A)  # [T, r]
    acc = torch.promote_types(x.dtype, torch.float32)  # fp32, as HydraLoRA; fp64 stays fp64
    pi = F.softmax(F.linear(x2, route_weight).view(T, groups, n), -1, dtype=acc).to(x.dtype)
    if groups * n * r <= d_out:
        ht = (pi.unsqueeze(-1) * h[:, None, None, :]).view(T, groups, n * r)
        if groups == 1:  # one plain GEMM, no permutes: [T, N*r] @ [N*r, d_out]
            y = ht.view(T, n * r) @ lora_B.transpose(1, 2).reshape(n * r, d_out)
        else:
            bcat = lora_B.view(n, groups, c, r).permute(1, 0, 3, 2).reshape(groups, n * r, c)
            y = torch.bmm(ht.transpose(0, 1), bcat).transpose(0, 1).reshape(T, d_out)
    else:
        y = None
        for e in range(n):
            term = (pi[:, :, e : e + 1] * (h @ lora_B[e].T).view(T, groups, c)).view(T, d_out)
            y = term if y is None else y + term
    return (y * scaling).view(*lead, d_out)
