"""The auxiliary losses of mtLoRA training (SPEC section 2): the spectral-aware regularizer in
both variants, the balance loss over a model's adapters, and :func:`auxiliary_loss`, which adds
them with the weights of the official runs.

Typical loop::

    reg = SpectralRegularizer(refresh_every="epoch", steps_per_epoch=len(loader))
    for batch in loader:
        loss = task_loss(model(batch)) + auxiliary_loss(model, regularizer=reg)
        loss.backward(); opt.step(); opt.zero_grad()

Adapters are found by ``isinstance(m, MTLoRAAdapter)`` over ``model.modules()``, so adapters
inside :class:`MTLoRALinear`, Hugging Face models and DDP wrappers are all seen. Everything here
is deterministic given the weights and the step (the only randomness is the seeded subset
choice), so under DDP every rank computes the same value from its replicated weights.
"""

from __future__ import annotations

import functools
import random
import weakref

import torch
from torch import Tensor, nn

from mtlora_kernels._checks import as_int
from mtlora_kernels.nn.adapter import MTLoRAAdapter, token_mask
from mtlora_kernels.ops.mix import _autocast_off, acc_dtype

VARIANTS = ("paper", "official")
# The released code regularizes at most 64 B matrices per call (seeded by the step).
OFFICIAL_MAX_MATRICES = 64


def find_adapters(model: nn.Module) -> list[MTLoRAAdapter]:
    """Every :class:`MTLoRAAdapter` in ``model.modules()`` order (``model`` itself included)."""
    return [m for m in model.modules() if isinstance(m, MTLoRAAdapter)]


def _adapters_or_raise(model: nn.Module) -> list[MTLoRAAdapter]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
    adapters = find_adapters(model)
    if not adapters:
        raise ValueError(f"no MTLoRAAdapter modules found in {type(model).__name__}")
    return adapters


def is_encoder_decoder(model: nn.Module) -> bool:
    """Whether ``model``'s config makes it an encoder-decoder (T5's), whose decoder adapters run
    on the target tokens, not the source's (:func:`balance_loss`'s ``decoder_mask``)."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def balance_loss(model: nn.Module, mask: Tensor | None = None,
                 decoder_mask: Tensor | None = None) -> Tensor:
    """``mean(a.balance_loss(mask) for a in adapters with N > 1)``: the MoLE balance loss of the
    last forward, averaged over the routed adapters of ``model`` (zero when none is routed);
    ``mask`` (e.g. the batch's attention_mask) picks the tokens that count: bool, or numbers
    that are all 0 or 1 (others are refused; such a mask is checked once per call, a host read
    of it, which a bool mask spares).

    An encoder-decoder (``model.config.is_encoder_decoder``: T5) runs its decoder's adapters on
    other tokens than its encoder's: there ``mask`` is the encoder's (the batch's
    attention_mask) and ``decoder_mask`` the decoder's (its decoder_attention_mask, or ``labels
    != -100``; None: every decoder token counts), taken by the adapters under a module named
    ``decoder``. Other models refuse a ``decoder_mask``.

    Each term is ``var(p) / (mean(p)^2 + 1e-10)`` with p the mean routing weight per expert over
    the tokens and groups of that adapter's last enabled forward (one run while it was disabled
    computes no routing); differentiable w.r.t. the routers.
    An adapter whose last output reached nothing still referenced (a layer whose output the
    model drops, as LLaVA drops its vision tower's last: its routing went with that output's
    graph, see :class:`MTLoRAAdapter`) changes no output and is left out of the mean, as is
    an adapter switched off (``enabled`` False: an ablation).
    Raises if a routed adapter has not run an enabled forward yet, or if every routed adapter
    is switched off or its output gone.
    """
    adapters = _adapters_or_raise(model)
    if is_encoder_decoder(model):
        in_decoder = {id(m) for name, m in model.named_modules()
                      if isinstance(m, MTLoRAAdapter) and "decoder" in name.split(".")}
    elif decoder_mask is not None:
        raise ValueError(f"decoder_mask is for an encoder-decoder's decoder adapters, and "
                         f"{type(model).__name__} is no encoder-decoder (its config's "
                         f"is_encoder_decoder); pass its tokens' mask as mask")
    else:
        in_decoder = set()
    routed = [a for a in adapters if a.config.num_experts > 1]
    if not routed:
        return torch.zeros((), device=adapters[0].lora_B.device)
    # An adapter switched off (an ablation) adds nothing to the outputs; its routing is an
    # older forward's.
    routed = [a for a in routed if a.enabled]
    if not routed:
        raise RuntimeError("every routed adapter is disabled: they add nothing to the model's "
                           "outputs, so there is no balance loss; enable them first")
    # An adapter whose output reached nothing still referenced (the model dropped it: the last
    # layer of LLaVA's vision tower, whose features are the layer before's) changes none of the
    # outputs, and its routing went with its graph: its term is left out. With every one gone
    # the caller dropped the outputs, and the adapters' balance_loss says so.
    routed = [a for a in routed if not a._output_dropped()] or routed
    # Checked here once (a numeric mask's check reads it on the host), bool for every adapter.
    mask, decoder_mask = token_mask(mask, "mask"), token_mask(decoder_mask, "decoder_mask")
    return torch.stack([a.balance_loss(decoder_mask if id(a) in in_decoder else mask)
                        for a in routed]).mean()


# ---------------------------------------------------------------------------- the two variants


def _full(lora_B: Tensor) -> Tensor:
    """``lora_B`` whole: under FSDP2, outside the forward, it is a DTensor sharded over the ranks,
    gathered here with its gradient (``full_tensor()``: an all-gather, whose backward hands each
    rank its shard of the gradient; every rank computes the same term, so that gradient is the
    term's, beside FSDP's mean of the task gradients). Every rank must make the same calls.

    Measured (2 ranks, N = 3, tests/test_distributed.py): the paper and official terms' lora_B
    gradients match one process exactly (relative error 0.0), and with the task and balance
    losses under gradient checkpointing within 5e-8. Gathered under ``no_grad`` (as this
    function once was) the term's gradient is lost: lora_B's relative error 0.9996 with the task
    loss, the 1.0 that had made the package refuse FSDP2 here.
    """
    return lora_B.full_tensor() if hasattr(lora_B, "full_tensor") else lora_B


def spectral_weighting(lora_B: Tensor) -> Tensor:
    """``M_i = V_i diag(sqrt(w_i)) V_i^T`` per expert, with ``B_i = U_i diag(sigma_i) V_i^T`` and
    ``w_i = exp(-sigma_i / mean(sigma_i))``, so that ``B_i @ M_i = U_i diag(sqrt(w_i) sigma_i)
    V_i^T`` is the paper's B'_i (Eq. 2). Computed without autograd.

    Args: lora_B [N, d_out, r] (any float dtype). Returns [N, r, r] in fp32 (fp64 for fp64).

    An all-zero B_i (the initialisation) has sigma = 0 and gets w = 1 (its ratio is taken as 0).
    Uses ``torch.linalg.svd`` of the d_out x r matrices, not :func:`randomized_svd`: the rank r
    is the whole spectrum, so there is nothing to truncate and a sketch of width >= r would cost
    as much as the exact thin SVD; B also starts at zero and stays nearly rank-deficient early in
    training, where CholeskyQR2 falls back to Householder anyway. It runs once per refresh.

    An ordinary tensor under ``torch.inference_mode()`` too: :class:`SpectralRegularizer` caches
    it for the training steps after a call logged there, whose backward cannot save an inference
    tensor.
    """
    acc = acc_dtype(lora_B.dtype)
    with torch.inference_mode(False):  # lora_B is detached: no graph either way
        _, sigma, Vh = torch.linalg.svd(lora_B.detach().to(acc), full_matrices=False)
        mean = sigma.mean(-1, keepdim=True).clamp_min(torch.finfo(acc).tiny)
        root_w = torch.exp(-sigma / mean).sqrt()
        return (Vh.mT * root_w.unsqueeze(-2)) @ Vh


def paper_spectral_loss(lora_B: Tensor, weighting: Tensor) -> Tensor:
    """``sum_{i<j} ||(B_i M_i)^T (B_j M_j)||_F^2`` for one adapter (Eq. 2 without lambda).

    Args:
        lora_B: [N, d_out, r], differentiable.
        weighting: [N, r, r] the fixed M_i of :func:`spectral_weighting` (no gradient flows
            into it).

    Returns a scalar in M's dtype. One GEMM: ``C = Bcat'^T Bcat'`` with
    ``Bcat' = [B'_1 ... B'_N]`` [d_out, N r]; the block ``C_ij`` is ``B'_i^T B'_j`` and the
    result is the sum of ``||C_ij||_F^2`` over the blocks above the diagonal, i.e.
    ``(||C||_F^2 - sum_i ||C_ii||_F^2) / 2``.
    The blocks are summed apart rather than subtracting the diagonal from the total: when the
    experts are nearly orthogonal the diagonal dwarfs the rest and the subtraction cancels
    (measured in fp32, N = 16, r = 16: relative error 2.8e-3 by subtraction, 2.6e-7 by blocks).
    """
    n_exp, d_out, rank = lora_B.shape
    b_prime = lora_B.to(weighting.dtype) @ weighting.detach()
    bcat = b_prime.transpose(0, 1).reshape(d_out, n_exp * rank)
    gram = bcat.mT @ bcat
    block_norms = gram.reshape(n_exp, rank, n_exp, rank).square().sum((1, 3))  # [N, N]
    return block_norms.triu(1).sum()


def official_spectral_terms(matrices: Tensor) -> Tensor:
    """The released code's term per matrix (SPEC section 2): for each B [d_out, r] of
    ``matrices`` [n, d_out, r], ``sum_{k,l} (w_k w_l (B^T B - scale^2 I)_{kl})^2`` with, without
    autograd, ``sigma = svdvals(B)``, ``w = exp(-sigma / (mean(sigma) + 1e-8))`` and
    ``scale = ||B||_F / sqrt(r) + 1e-8``. Returns [n] (fp32, fp64 for fp64 input).

    As released, w is sorted by singular value but multiplies the Gram matrix by *column index*
    of B (not in the singular basis). Only the Gram matrix carries a gradient. The released code
    forms the Gram matrix in the weights' dtype; here it accumulates in fp32.
    """
    n, d_out, rank = matrices.shape
    if d_out < rank:
        raise ValueError(f"the official variant indexes w (min(d_out, r) values) by the r columns "
                         f"of B; it needs d_out >= r, got B [{d_out}, {rank}]")
    acc = acc_dtype(matrices.dtype)
    b = matrices.to(acc)
    gram = b.mT @ b
    with torch.no_grad():
        sigma = torch.linalg.svdvals(b.detach())
        w = torch.exp(-sigma / (sigma.mean(-1, keepdim=True) + 1e-8))
        # ||B||_F^2 taken as trace(B^T B) of this Gram matrix, not from matrix_norm: the two
        # roundings differed by ~5e-7 relative at d_out = 4096 (3e-6 at 16384), which the
        # cancellation in gram - scale^2 I multiplied (gradient 8e-6 / 1e-4 off the fp64 one).
        scale = gram.detach().diagonal(dim1=-2, dim2=-1).sum(-1).sqrt() / rank ** 0.5 + 1e-8
        target = scale.square()[:, None, None] * torch.eye(rank, dtype=acc, device=b.device)
    weighted = (gram - target) * w.unsqueeze(-1) * w.unsqueeze(-2)
    return weighted.square().sum((-1, -2))


# ---------------------------------------------------------------------------- the regularizer


def _eager(fn):
    """``torch.compiler.disable(fn)``, applied at the first call: applying it imports
    torch._dynamo and triton, 1.4 s that importing the package must not cost (and the kernel
    report's workers must import triton only after they set up its environment)."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        disabled = getattr(fn, "_mtlora_disabled", None)
        if disabled is None:
            disabled = fn._mtlora_disabled = torch.compiler.disable(fn)
        return disabled(*args, **kwargs)
    return call


class SpectralRegularizer:
    """The spectral-aware regularizer over all adapters of a model, without its weight lambda.

    ``variant="paper"`` (Eq. 2, the default): per adapter with N >= 2 experts,
    ``L_a = sum_{i<j} ||B'_i^T B'_j||_F^2`` with ``B'_i = B_i M_i`` and the cached, gradient-free
    ``M_i`` of :func:`spectral_weighting`; low-singular-value directions keep weight ~1 and
    dominant ones are damped, so the loss pushes the experts' low-SV parts apart and leaves their
    shared high-SV knowledge alone. The result **averages** L_a over the adapters
    (``reduction="mean"``; the released code averages its term too, and a mean keeps lambda
    independent of the model depth) or sums it (``reduction="sum"``).

    ``variant="official"``: what the authors' released code computes (see
    :func:`official_spectral_terms`): every expert matrix B of every adapter (N = 1 included) is a
    unit; at most ``max_samples`` (default 64) of them are drawn with Python's
    ``random.Random(seed + step).sample`` (seed 0 gives the released ``random.seed(step)`` choice
    when the adapters are listed in the same order), and their terms are averaged (or summed).
    The released trainer adds the term only every ``spectral_reg_steps`` optimizer steps (its
    scripts: 500, or 300), not at every step: ``apply_every=K`` does the same.

    Args:
        variant: 'paper' or 'official'.
        refresh_every: recompute the cached M_i every this many steps (int K >= 1: at the first
            call that computes the term in each window of steps [jK, (j+1)K), which is the
            multiple jK itself when every step computes it; with ``apply_every`` > 1, the first
            applied step of the window), or 'epoch' for every ``steps_per_epoch`` steps (the
            paper: once per epoch). Paper variant only; the default 1 keeps Eq. 2 exact at
            every step.
        steps_per_epoch: the epoch length in steps, for ``refresh_every='epoch'``.
        apply_every: compute the term only at steps K-1, 2K-1, ... (int K >= 1; the default 1 is
            every step) and return a constant zero, computing nothing, at the others. K-1, 2K-1
            are where the released trainer with ``spectral_reg_steps=K`` adds it, at the first
            micro-batch of that optimizer step only; here every call with that step gets it.
        max_samples: how many units enter one call, drawn afresh each step: adapters (paper;
            default None = all) or B matrices (official; default 64, as released).
        reduction: 'mean' or 'sum' over the units.
        seed: added to the step to seed the subset choice.

    Call ``reg(model)`` once per optimizer step: it counts its calls as steps, or takes
    ``step=global_step`` (pass it with gradient accumulation, where several calls make one
    optimizer step; the released code seeds by the optimizer step). It returns a scalar,
    differentiable w.r.t. the experts' B (a constant zero when there is nothing to regularize).

    It computes in the weights' dtype (fp32 accumulation) inside an autocast region too.
    Under torch.compile the call runs eagerly (one graph break): its step count, refreshes and
    sampling are Python state that a traced call would guard on, recompiling the caller at every
    step until dynamo's recompile limit turned the whole compiled step eager. A pickled
    regularizer keeps its settings, step and cached weighting (one [N, r, r] tensor per routed
    adapter, matched to the model's routed adapters by position at the next call), so a
    resumed run computes what the uninterrupted one does; if the adapters do not match (count
    or shapes), it refreshes at its next call.
    """

    def __init__(self, variant: str = "paper", *, refresh_every: int | str = 1,
                 steps_per_epoch: int | None = None, apply_every: int = 1,
                 max_samples: int | None = None, reduction: str = "mean", seed: int = 0) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}; got {variant!r}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum'; got {reduction!r}")
        if isinstance(refresh_every, str):  # a string other than 'epoch' is a bad value
            if refresh_every != "epoch":
                raise ValueError(f"refresh_every must be an int >= 1 or 'epoch'; got "
                                 f"{refresh_every!r}")
            if steps_per_epoch is None:
                raise ValueError("refresh_every='epoch' needs steps_per_epoch, an int >= 1")
            refresh_every = as_int(steps_per_epoch, "steps_per_epoch", minimum=1)
        refresh_every = as_int(refresh_every, "refresh_every", minimum=1)
        if max_samples is None and variant == "official":
            max_samples = OFFICIAL_MAX_MATRICES
        if max_samples is not None:
            max_samples = as_int(max_samples, "max_samples", minimum=1)
        self.variant, self.refresh_every, self.max_samples = variant, refresh_every, max_samples
        self.apply_every = as_int(apply_every, "apply_every", minimum=1)
        self.reduction, self.seed = reduction, as_int(seed, "seed")
        self.reset()

    def reset(self) -> None:
        """Forget the run state (step, last refresh, cached weighting), keeping the settings:
        the regularizer of a new run, which refreshes at its first call."""
        self.step = 0  # the step the next call is for
        self._weighting: weakref.WeakKeyDictionary[MTLoRAAdapter, Tensor] = \
            weakref.WeakKeyDictionary()
        self._refreshed_at: int | None = None
        self._restored: list[Tensor] | None = None  # a pickled cache, until the next call

    def __getstate__(self) -> dict:
        # The cache is keyed by the adapters through weak references, which do not pickle: it
        # goes as a list in the routed adapters' order (the order of the refresh that filled it).
        pending = self._restored  # restored and not called since: still the cache
        return {**self.__dict__, "_restored": None,
                "_weighting": pending if pending is not None else list(self._weighting.values())}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _weighting=weakref.WeakKeyDictionary(),
                             _restored=state["_weighting"])

    @_eager
    def __call__(self, model: nn.Module, step: int | None = None) -> Tensor:
        """The (unweighted) regularizer of ``model``'s adapters at ``step`` (default: count)."""
        step = self.step if step is None else as_int(step, "step")
        self.step = step + 1
        adapters = _adapters_or_raise(model)
        device = adapters[0].lora_B.device
        if (step + 1) % self.apply_every:
            return torch.zeros((), device=device)
        # In the weights' dtype (fp32 accumulation), not autocast's: under bf16 autocast its
        # GEMMs ran in bf16, 2e-3 (paper) and 1e-3 (official) off the fp64 value, measured.
        with _autocast_off(device):
            if self.variant == "paper":
                terms = self._paper_terms(adapters, step)
            else:
                terms = self._official_terms(adapters, step)
        if not terms:
            return torch.zeros((), device=device)
        total = torch.cat(terms)
        return total.mean() if self.reduction == "mean" else total.sum()

    def _sample(self, n: int, step: int) -> list[int]:
        if self.max_samples is None or n <= self.max_samples:
            return list(range(n))
        return random.Random(self.seed + step).sample(range(n), self.max_samples)

    def _paper_terms(self, adapters: list[MTLoRAAdapter], step: int) -> list[Tensor]:
        routed = [a for a in adapters if a.config.num_experts > 1]
        gathered: dict[int, Tensor] = {}

        def full(i: int) -> Tensor:  # adapter i's lora_B, all-gathered at most once under FSDP2
            if i not in gathered:
                gathered[i] = _full(routed[i].lora_B)
            return gathered[i]

        if self._restored is not None:  # the first call after a restore from a pickle
            restored, self._restored = self._restored, None
            if len(restored) == len(routed) and all(
                    w.shape == (a.config.num_experts, a.config.r, a.config.r)
                    for w, a in zip(restored, routed)):
                for w, a in zip(restored, routed):
                    self._weighting[a] = w.to(a.lora_B.device)
            else:
                self._refreshed_at = None
        # Refreshed at the first applied call of each window of refresh_every steps (the
        # multiple itself when every step applies): a resumed run refreshes where the
        # uninterrupted one does.
        every = self.refresh_every
        if self._refreshed_at is None or step // every != self._refreshed_at // every:
            self._weighting.clear()
            for i, adapter in enumerate(routed):
                self._weighting[adapter] = spectral_weighting(full(i))
            self._refreshed_at = step
        terms = []
        for i in self._sample(len(routed), step):
            B = full(i)
            weighting = self._weighting.get(routed[i])
            n_exp, _, rank = B.shape
            if weighting is None or weighting.shape != (n_exp, rank, rank) \
                    or weighting.device != B.device \
                    or weighting.dtype != acc_dtype(B.dtype):
                # a new adapter, or moved or cast since the refresh
                weighting = self._weighting[routed[i]] = spectral_weighting(B)
            terms.append(paper_spectral_loss(B, weighting).reshape(1))
        return terms

    def _official_terms(self, adapters: list[MTLoRAAdapter], step: int) -> list[Tensor]:
        units = [(a, e) for a in adapters for e in range(a.config.num_experts)]
        chosen: dict[MTLoRAAdapter, list[int]] = {}
        for i in self._sample(len(units), step):
            adapter, expert = units[i]
            chosen.setdefault(adapter, []).append(expert)
        # One batched call per adapter; the mean does not depend on the order of the units.
        return [official_spectral_terms(_full(a.lora_B)[experts]) for a, experts in chosen.items()]


def auxiliary_loss(model: nn.Module, balance_weight: float = 0.01, spectral_weight: float = 1.0,
                   regularizer: SpectralRegularizer | None = None,
                   mask: Tensor | None = None, step: int | None = None,
                   decoder_mask: Tensor | None = None) -> Tensor:
    """``balance_weight * balance_loss(model) + spectral_weight * regularizer(model)``: the
    auxiliary loss to add to the task loss, after the forward pass and before ``backward``.

    The default weights are the released scripts' (balance 0.01 in every one; spectral lambda 1.0
    as in the BBH runs, 0.5 in the MMLU ones, 0.25 the released code's own default), here on the
    paper variant. ``regularizer=None`` uses a fresh ``SpectralRegularizer()`` (paper variant,
    weighting recomputed at this call, every adapter); pass one object for the whole run to cache
    the weighting (``refresh_every``), sample adapters or use the official variant. A zero
    weight skips that term. ``mask`` and ``decoder_mask`` go to :func:`balance_loss`: with padded
    batches, pass the attention_mask so that padding tokens do not count (an encoder-decoder's
    decoder tokens: ``decoder_mask``). ``step`` goes to the regularizer:
    with gradient accumulation pass the optimizer step, or each micro-batch counts as one.
    """
    adapters = _adapters_or_raise(model)
    total = torch.zeros((), device=adapters[0].lora_B.device)
    if balance_weight:
        total = total + balance_weight * balance_loss(model, mask, decoder_mask)
    if spectral_weight:
        reg = regularizer if regularizer is not None else SpectralRegularizer()
        total = total + spectral_weight * reg(model, step)
    return total


__all__ = ["find_adapters", "is_encoder_decoder", "balance_loss", "spectral_weighting",
           "paper_spectral_loss", "official_spectral_terms", "SpectralRegularizer",
           "auxiliary_loss", "OFFICIAL_MAX_MATRICES"]
