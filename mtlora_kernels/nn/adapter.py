"""Drop-in mtLoRA layers: the block-level adapter and the component-level Linear wrapper.

Both are thin: their forward is one call into :func:`mtlora_kernels.mix`.
"""

from __future__ import annotations

import dataclasses
import math
import weakref

import torch
from torch import Tensor, nn

from mtlora_kernels._checks import as_int
from mtlora_kernels.nn.config import MTLoRAConfig
from mtlora_kernels.ops.mix import _autocast_dtype, compute_dtype, mix


#: The per-adapter tensors of the foreign checkpoints the adapter loads: kind -> (the key of
#: expert i's B, the format's name). lora_A.weight and lora_route.weight are named alike.
FOREIGN_FORMATS = {"hydralora": (lambda i: f"lora_B{i}.weight", "HydraLoRA"),
                   "official": (lambda i: f"lora_B.{i}.weight", "official mtLoRA")}


def token_mask(mask: Tensor | None, name: str = "mask") -> Tensor | None:
    """``mask``, the tokens that count for a balance loss, as a bool tensor: a bool mask as it
    is, a numeric one (an attention_mask) checked to hold only 0 and 1 (one host read of it,
    so a device sync where it lives on a device; a bool mask costs none) and compared with 0.
    Its other values had no meaning as a mask and were taken as weights: a NaN made the loss
    NaN, a negative one flipped its sign. ValueError naming ``name``. Under torch.compile
    unchecked (a host read there breaks the graph). None stays None."""
    if mask is None or mask.dtype == torch.bool:
        return mask
    if not torch.compiler.is_compiling() and mask.device.type != "meta":
        bad = (mask != 0) & (mask != 1)
        if bool(bad.any()):
            raise ValueError(f"{name} must be bool or hold only 0 and 1 (1: the token counts); "
                             f"got {mask[bad][0].item()} ({mask.dtype})")
    return mask != 0


def _to_dtype(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``t.to(dtype)``, None for None. Where t has that dtype already (the adapter's parameters
    mostly do), t itself without the call, which costs a dispatch (~1 us on the CPU) to return
    it all the same."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


#: ``MTLoRAAdapter._routing`` after nn.DataParallel copied the adapter for a forward
#: (:meth:`MTLoRAAdapter._replicate_for_data_parallel`).
_IN_REPLICAS = "the last forward ran in nn.DataParallel's replicas"


class MTLoRAAdapter(nn.Module):
    """``delta = s * sum_e pi_e ⊙ B_e A drop(x)`` with per-group routing (SPEC section 2).

    Block-level use: ``out = h1 + FFN(z) + adapter(z)`` with z the sub-layer's own input, in a
    pre-LN layer its norm's output ``z = LN2(h1)`` (d_in = d_out = d). Parameters: ``lora_A``
    [r, d_in], ``lora_B`` [N, d_out, r], ``lora_route`` [g*N, d_in] (absent when N == 1).

    After each forward, :meth:`balance_loss` returns the MoLE balance loss of that forward's
    routing weights, differentiable with respect to the router. A forward run with autograd
    keeps its routing weights for that only as long as its autograd graph lives (while its
    output, or a loss computed from it, is referenced): a forward whose output is dropped
    without a backward (an evaluation without ``torch.no_grad()``, a skipped batch) frees its
    graph and saved activations, as it does without adapters. A forward without autograd
    (``torch.no_grad()``, ``torch.inference_mode()``, each step of ``generate``) has no graph:
    the adapter keeps its routing weights until its next enabled forward (a balance loss
    under no_grad reads them; with gradients on and a router that trains,
    :meth:`balance_loss` refuses them), as it does under ``torch.compile``.

    ``enabled`` (default True): when False the forward adds nothing (it returns ``residual``,
    or zeros without one) and computes no routing; :meth:`MTLoRAHandle.disable` sets it. A
    plain attribute, so torch.compile guards on it and recompiles when it changes.
    """

    def __init__(self, d_in: int, d_out: int | None = None, config: MTLoRAConfig | None = None,
                 **overrides) -> None:
        super().__init__()
        cfg = config or MTLoRAConfig()
        if overrides:
            cfg = dataclasses.replace(cfg, **overrides)
        d_in = as_int(d_in, "d_in", minimum=1)
        d_out = d_in if d_out is None else as_int(d_out, "d_out", minimum=1)
        if d_out % cfg.groups != 0:
            raise ValueError(f"groups={cfg.groups} must divide d_out={d_out}")
        self.config = cfg
        self.d_in, self.d_out = d_in, d_out
        self.lora_A = nn.Parameter(torch.empty(cfg.r, d_in))
        self.lora_B = nn.Parameter(torch.empty(cfg.num_experts, d_out, cfg.r))
        if cfg.num_experts > 1:
            self.lora_route = nn.Parameter(torch.empty(cfg.groups * cfg.num_experts, d_in))
        else:
            self.register_parameter("lora_route", None)
        self.enabled = True
        self._routing: Tensor | weakref.ref | None = None  # see _last_routing
        self._routed_by_own_router = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official initialisation: A and router kaiming_uniform(a=sqrt(5)), every B zero."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        if self.lora_route is not None:
            nn.init.kaiming_uniform_(self.lora_route, a=math.sqrt(5))

    def forward(self, x: Tensor, *, logits: Tensor | None = None,
                residual: Tensor | None = None) -> Tensor:
        """Args: x [..., d_in]; logits [..., g*N] to route externally (task-id one-hot, a pooled
        router) instead of ``lora_route``; residual [..., d_out] added in the same pass.

        The delta is computed in x's dtype (the parameters cast to it; under autocast, the
        region's). A residual of another dtype (a sub-layer whose output dtype is not its
        input's: T5's FFN loaded in fp16, whose ``wo`` transformers keeps in fp32) is added
        after the op, in its own dtype, which the result keeps."""
        if not self.enabled:  # the routing stays the last enabled forward's (see balance_loss)
            return residual if residual is not None else x.new_zeros(*x.shape[:-1], self.d_out)
        cfg = self.config
        dt = x.dtype
        route = self.lora_route if logits is None else None
        fused = residual is None or residual.dtype == dt
        if not fused:  # asked only here: the autocast query costs ~1 us a call
            autocast = _autocast_dtype(x.device)
            fused = compute_dtype(residual.dtype, autocast) == compute_dtype(dt, autocast)
        y, pi = mix(
            x, _to_dtype(self.lora_A, dt), _to_dtype(self.lora_B, dt), _to_dtype(route, dt),
            logits=logits, groups=cfg.groups, scaling=cfg.scaling, dropout_p=cfg.dropout,
            training=self.training, residual=residual if fused else None, backend=cfg.backend,
            return_routing=True,
        )
        if not fused:
            y = residual + y.to(residual.dtype)
        if torch.compiler.is_exporting():
            # An exported program runs no Python: the routing it would keep is a tracing
            # tensor, which torch.export warned about for every adapter (and then discarded).
            return y
        if not torch.compiler.is_compiling() and y.grad_fn is not None:
            # The routing weights carry this forward's graph, and with it every saved
            # activation before this layer: held here, they kept it all alive after the output
            # was dropped. The graph holds them instead, on y's own node (its view's: pi's
            # view does not lead to it, so no cycle), and the adapter a weak reference.
            y.grad_fn.metadata["mtlora_routing"] = pi
            self._routing = weakref.ref(pi)
        else:  # no graph to keep alive (or inside a compiled region: no nodes to hold it)
            self._routing = pi
        self._routed_by_own_router = route is not None
        return y

    def balance_loss(self, mask: Tensor | None = None) -> Tensor:
        """``var(p) / (mean(p)^2 + 1e-10)`` with p the mean routing weight per expert over the
        tokens and groups of the last forward it ran while enabled (unbiased var; a forward
        while disabled, for reference outputs of the base model, computes no routing and leaves
        that one in place). Zero for N == 1.

        ``mask``: which tokens count, shaped as that forward's leading dims (e.g. the batch's
        ``attention_mask``, so that padding does not pull p towards its own routing; a forward on
        tokens flattened to one dim, [B*S, d], takes a [B, S] mask too): bool, or numbers that
        are all 0 or 1 (:func:`token_mask`; other values are refused). Zero when no token
        counts."""
        if self._routing is _IN_REPLICAS:
            raise RuntimeError(
                "balance_loss(): the last forward ran in nn.DataParallel's replicas (transformers' "
                "Trainer wraps the model in one when it sees several GPUs in one process), and "
                "their routing weights went with them: the model's adapters have none. Run one "
                "process per GPU (torchrun --nproc_per_node=N or accelerate launch: "
                "DistributedDataParallel), make one GPU visible (CUDA_VISIBLE_DEVICES=0), or "
                "train without the balance term (balance_weight=0)")
        pi = self._last_routing()  # [..., g, N]
        if self._output_dropped():
            raise RuntimeError("balance_loss() needs the last forward's output (or a loss "
                               "computed from it) still referenced: its routing weights are "
                               "kept only as long as its autograd graph, and the output is gone")
        if pi is None:
            raise RuntimeError("balance_loss() needs a forward pass of this adapter first (none "
                               "ran while it was enabled)")
        if (torch.is_grad_enabled() and not pi.requires_grad
                and self._routed_by_own_router and self.lora_route.requires_grad):
            # Reentrant activation checkpointing runs forward under no_grad: the loss would
            # silently carry no gradient to the router (measured: adapter gradients off by 2e-4
            # absolute on a tiny Llama).
            raise RuntimeError(
                "the last forward ran without autograd (under torch.no_grad() or "
                "torch.inference_mode(), or in reentrant activation checkpointing), so the "
                "balance loss cannot reach the router. Run the forward with gradients; use "
                "non-reentrant checkpointing (gradient_checkpointing_kwargs={'use_reentrant': "
                "False}, transformers' default); or compute the loss under torch.no_grad() if "
                "it is only logged.")
        # A forward on tokens flattened to one dim (OPT's FFN gets [B*S, d]) takes the batch's
        # mask as it takes its tokens, flattened in order.
        flat = pi.dim() == 3 and mask is not None and mask.numel() == pi.shape[0]
        if mask is not None and tuple(mask.shape) != tuple(pi.shape[:-2]) and not flat:
            raise ValueError(f"mask must have the last forward's token shape "
                             f"{tuple(pi.shape[:-2])}, got {tuple(mask.shape)}")
        if self.config.num_experts == 1 or pi.numel() == 0:  # no router / no tokens
            return pi.new_zeros(())
        mask = token_mask(mask)
        n = self.config.num_experts
        if mask is None:
            p = pi.reshape(-1, n).mean(0)
        else:  # a weighted mean: no data-dependent shapes (no host sync, compile-friendly)
            w = mask.reshape(-1).to(device=pi.device, dtype=pi.dtype)
            picked = (pi.reshape(w.shape[0], -1, n) * w[:, None, None]).sum((0, 1))
            p = picked / (w.sum() * pi.shape[-2]).clamp_min(1.0)
        return p.var() / (p.mean() ** 2 + 1e-10)

    def _last_routing(self) -> Tensor | None:
        """The last forward's routing weights [..., g, N]: ``_routing`` itself, or what its weak
        reference still reaches (None once that forward's graph is gone)."""
        routing = self._routing
        return routing() if isinstance(routing, weakref.ref) else routing

    def _output_dropped(self) -> bool:
        """Whether the last forward's routing went with its graph: it ran with autograd, and
        its output reached nothing still referenced."""
        return isinstance(self._routing, weakref.ref) and self._routing() is None

    def _replicate_for_data_parallel(self) -> MTLoRAAdapter:
        # nn.DataParallel runs each forward in copies of the model made for it, one per GPU; a
        # copy keeps its routing weights on itself, and the copies go when the forward returns.
        # Marked here, the balance loss says so instead of reading an older forward's routing
        # or refusing with a reason that is not the one.
        self._routing = _IN_REPLICAS
        return super()._replicate_for_data_parallel()

    def __getstate__(self) -> dict:
        # The last forward's routing weights are not state (and, carrying that forward's graph,
        # cannot be deep-copied): copies and pickles start without them.
        return {**super().__getstate__(), "_routing": None}

    def load_hydralora_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load a HydraLoRA layer's ``lora_A.weight``, ``lora_B{i}.weight``, ``lora_route.weight``:
        HydraLoRA's own (router [N, d_in], so groups == 1), or the grouped loop of
        :class:`~mtlora_kernels.compat.hydralora.HydraLoRALayer` (router [g*N, d_in])."""
        self._load_converted(state, "hydralora")

    def load_official_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load the official mtLoRA block adapter's ``lora_A.weight``, ``lora_B.{i}.weight``,
        ``lora_route.weight`` (router rows ordered ``G*N + e``, as ours)."""
        self._load_converted(state, "official")

    def _converted_problems(self, state: dict[str, Tensor], kind: str) -> list[str]:
        """What keeps a foreign state dict (``kind`` of :data:`FOREIGN_FORMATS`) from loading into
        this adapter: missing, unexpected or misshapen tensors; empty when it fits. Unexpected
        keys matter: a checkpoint with more experts can have a router of the same shape (N = 4,
        g = 1 has the [g*N, d_in] of N = 2, g = 2) and would otherwise load as the wrong model."""
        n, b_key = self.config.num_experts, FOREIGN_FORMATS[kind][0]
        need = {"lora_A.weight": tuple(self.lora_A.shape)}
        need.update({b_key(i): tuple(self.lora_B.shape[1:]) for i in range(n)})
        if n > 1:
            need["lora_route.weight"] = tuple(self.lora_route.shape)
        # One expert has no router here: a checkpoint's router of one expert weighs it by
        # softmax = 1 whatever its logits, so leaving it out is exact.
        extra = sorted(set(state) - set(need) - ({"lora_route.weight"} if n == 1 else set()))
        problems = [f"lacks {k}" for k in need if k not in state]
        if extra:
            problems.append(f"unexpected {extra[:3]} (the adapter has {n} experts)")
        problems += [f"{k}: shape {tuple(state[k].shape)} in the checkpoint, {shape} here"
                     for k, shape in need.items() if k in state and tuple(state[k].shape) != shape]
        # Checked here, not met half-way through the copies: a failed load changes nothing.
        problems += [f"{k}: {state[k].dtype} is not a floating dtype" for k in need
                     if k in state and not state[k].is_floating_point()]
        problems += [f"{k}: on the meta device (no values)" for k in need
                     if k in state and state[k].device.type == "meta"]
        return problems

    def _converted(self, state: dict[str, Tensor], kind: str) -> dict[str, Tensor]:
        """A foreign state dict (``kind`` of :data:`FOREIGN_FORMATS`) in this adapter's layout:
        ``{"lora_A": ..., "lora_B": [N, d_out, r], "lora_route": ...}`` (no router for N == 1),
        after :meth:`_converted_problems` found nothing; ValueError naming them otherwise."""
        problems = self._converted_problems(state, kind)
        b_key, source = FOREIGN_FORMATS[kind]
        if problems:
            raise ValueError(f"{source} state dict does not fit this adapter "
                             f"({self.extra_repr()}): " + "; ".join(problems))
        n = self.config.num_experts
        out = {"lora_A": state["lora_A.weight"],
               "lora_B": torch.stack([state[b_key(i)] for i in range(n)])}
        if n > 1:
            out["lora_route"] = state["lora_route.weight"]
        return out

    def _load_converted(self, state: dict[str, Tensor], kind: str) -> None:
        values = self._converted(state, kind)
        with torch.no_grad():
            for name, value in values.items():
                getattr(self, name).copy_(value)

    def extra_repr(self) -> str:
        c = self.config
        return (f"d_in={self.d_in}, d_out={self.d_out}, r={c.r}, num_experts={c.num_experts}, "
                f"groups={c.groups}, alpha={c.alpha}, dropout={c.dropout}")


#: The attributes of ``nn.Linear`` that :class:`MTLoRALinear` passes through to its base.
_BASE_ATTRS = frozenset({"weight", "bias", "in_features", "out_features"})


def linear_widths(module: nn.Module) -> tuple[int, int] | None:
    """(d_in, d_out) of an ``nn.Linear`` or of transformers' ``Conv1D`` (GPT-2's linear layer,
    its weight stored transposed, [d_in, d_out]; known by class name: no transformers import);
    None for any other module."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if (any(cls.__name__ == "Conv1D" for cls in type(module).__mro__)
            and isinstance(getattr(module, "weight", None), Tensor) and module.weight.dim() == 2
            and tuple(module.weight.shape) == (getattr(module, "nx", None),
                                               getattr(module, "nf", None))):
        return module.nx, module.nf
    return None


class MTLoRALinear(nn.Module):
    """``out = base(x) + adapter(x)``: an existing ``nn.Linear`` (or transformers' ``Conv1D``)
    (frozen) with an mtLoRA adapter on its input and output widths (component-level, HydraLoRA's
    placement). The base output enters the fused op as its residual, so the add costs no extra
    pass.

    ``weight``, ``bias``, ``in_features`` and ``out_features`` read and write the base's: model
    code reads them from the modules it calls (T5's ``wo.weight.dtype``), and transformers'
    ``tie_weights()`` assigns ``lm_head.weight``, which would otherwise register a second,
    stray weight on the wrapper. The parameters stay the base's alone (``base.weight`` in the
    state dict).
    """

    def __init__(self, base: nn.Module, config: MTLoRAConfig | None = None, **overrides) -> None:
        super().__init__()
        widths = linear_widths(base)
        if widths is None:
            raise TypeError(f"MTLoRALinear wraps an nn.Linear or transformers' Conv1D, got "
                            f"{type(base).__name__}")
        self.base = base
        base.requires_grad_(False)
        self.adapter = MTLoRAAdapter(*widths, config, **overrides)
        self.adapter.to(device=base.weight.device)

    def __getattr__(self, name: str):
        if name in _BASE_ATTRS:
            return getattr(self.base, name)
        return super().__getattr__(name)

    def __setattr__(self, name: str, value) -> None:
        if name in _BASE_ATTRS:
            setattr(self.base, name, value)
        else:
            super().__setattr__(name, value)

    def forward(self, x: Tensor, *, logits: Tensor | None = None) -> Tensor:
        return self.adapter(x, logits=logits, residual=self.base(x))

    def balance_loss(self, mask: Tensor | None = None) -> Tensor:
        """The adapter's :meth:`MTLoRAAdapter.balance_loss` (``mask``: the tokens that count)."""
        return self.adapter.balance_loss(mask)
