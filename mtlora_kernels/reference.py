"""The semantics of mtLoRA written the plain way: the CPU oracle every backend is tested against.

Nothing here is fast on purpose. Each function follows SPEC section 2 formula by formula, with
one loop over experts, so that a reader can check it against the paper in a minute.
"""

from __future__ import annotations

import torch
from torch import Tensor


def routing_weights(logits: Tensor, groups: int, num_experts: int) -> Tensor:
    """``softmax(logits.float().view(..., g, N), -1)``: per-group routing weights in fp32 (fp64).

    The logits are promoted to fp32 *before* the softmax (SPEC section 3: rounding them to bf16
    first moved outputs by 9-23%). A max-subtracted softmax keeps +-1e4 finite; a group whose
    logits are all -inf has no defined weights and yields NaN, as torch.softmax does.
    """
    acc = torch.promote_types(logits.dtype, torch.float32)  # fp64 logits stay fp64
    z = logits.to(acc).reshape(*logits.shape[:-1], groups, num_experts)
    return torch.softmax(z, dim=-1)


def mix_reference(
    x: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    route_weight: Tensor | None = None,
    *,
    logits: Tensor | None = None,
    groups: int = 1,
    scaling: float = 1.0,
    dropout_mask: Tensor | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """``y = s * sum_e pi[..., G(j), e] * (B_e @ (A @ drop(x)))[j]``, one expert at a time.

    Args:
        x: [..., d_in].
        lora_A: [r, d_in] shared down-projection.
        lora_B: [N, d_out, r] stacked expert up-projections.
        route_weight: [g*N, d_in] linear router (row ``G*N + e``); the router sees x undropped.
        logits: [..., g*N] router logits computed elsewhere (instead of ``route_weight``).
        groups: g, the number of output-dimension groups; must divide d_out.
        scaling: s = alpha / r.
        dropout_mask: boolean keep-mask shaped like x; kept entries are scaled by 1 / (1 - p).
        dropout_p: the dropout probability the mask was drawn with.

    Returns [..., d_out] in x's dtype. With N == 1 and no router, pi = 1 (plain LoRA).
    Raises ValueError where the formula is undefined (as ``mix`` does).
    """
    num_experts, d_out, _ = lora_B.shape
    if groups < 1 or d_out % groups:
        raise ValueError(f"groups={groups} must be a positive divisor of d_out={d_out}")
    if num_experts > 1 and route_weight is None and logits is None:
        raise ValueError(f"N={num_experts} experts need route_weight or logits")
    lead = x.shape[:-1]
    acc = torch.promote_types(x.dtype, torch.float32)
    xd = x
    if dropout_mask is not None:
        xd = torch.where(dropout_mask, x / (1.0 - dropout_p), torch.zeros_like(x))
    h = xd @ lora_A.T  # [..., r]
    if logits is None and route_weight is not None:
        logits = x.to(acc) @ route_weight.to(acc).T
    if logits is None:
        pi = torch.ones(*lead, groups, num_experts, dtype=acc, device=x.device)
    else:
        pi = routing_weights(logits, groups, num_experts)
    c = d_out // groups
    y = torch.zeros(*lead, d_out, dtype=acc, device=x.device)
    for e in range(num_experts):
        ye = (h @ lora_B[e].T).to(acc)  # [..., d_out]
        weight = pi[..., e].repeat_interleave(c, dim=-1)  # [..., d_out], column j gets group j // c
        y = y + weight.to(acc) * ye
    return (scaling * y).to(x.dtype)


def hydralora_reference(
    x: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    route_weight: Tensor,
    *,
    scaling: float,
    dropout_masks: list[Tensor] | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """HydraLoRA's published adapter delta (SPEC section 4), as it computes.

    ``pi = softmax(route(x), fp32 -> x.dtype)``; then per expert ``pi_i * B_i(A(drop_i(x))) * s``
    with A·x recomputed and a fresh dropout mask per expert (``dropout_masks[i]``).
    """
    pi = torch.softmax(x @ route_weight.T, dim=-1, dtype=torch.float32).to(x.dtype)
    out = torch.zeros(*x.shape[:-1], lora_B.shape[1], dtype=x.dtype, device=x.device)
    for i in range(lora_B.shape[0]):
        xi = x
        if dropout_masks is not None:
            xi = torch.where(dropout_masks[i], x / (1.0 - dropout_p), torch.zeros_like(x))
        out = out + pi[..., i : i + 1] * ((xi @ lora_A.T) @ lora_B[i].T) * scaling
    return out


def balance_loss_reference(pi: Tensor) -> Tensor:
    """MoLE balance loss: ``p = mean of pi over tokens and groups; var(p) / (mean(p)^2 + 1e-10)``."""
    p = pi.to(torch.promote_types(pi.dtype, torch.float32)).reshape(-1, pi.shape[-1]).mean(0)
    return p.var() / (p.mean() ** 2 + 1e-10)
