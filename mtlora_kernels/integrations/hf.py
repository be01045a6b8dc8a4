"""Attach mtLoRA adapters to a Hugging Face ``transformers`` model in one call, and take them off.

Block-level (``placement='ffn' | 'attn' | 'both'``, SPEC section 2): one
:class:`~mtlora_kernels.nn.MTLoRAAdapter` per transformer layer, in parallel with the whole
sub-layer::

    h1 = h + Attn(LN1(h));  z = LN2(h1);  out = h1 + FFN(z) + adapter(z)      # 'ffn'
    out = h + Attn(LN1(h)) + adapter(LN1(h))  (then the FFN as usual)         # 'attn'

The adapter is registered as a child ``mtlora_adapter`` of the sub-layer module (``mlp`` or the
attention module; the official code's ``block_adapter`` sits in the same place) and runs from
ONE forward hook on that module. In every supported layer the sub-layer is called on the norm's
output and on nothing else, so the hook's input *is* z; the hook passes the sub-layer's output
to the fused op as its residual (no extra pass over [T, d]). One hook with no state kept between
hooks is what makes this safe under gradient checkpointing (the recompute re-runs the same hook)
and under torch.compile (dynamo inlines it).

Component-level (``target_modules=['q_proj', 'v_proj']``, HydraLoRA's placement): each named
``nn.Linear`` (or transformers' ``Conv1D``, GPT-2's) is replaced by
:class:`~mtlora_kernels.nn.MTLoRALinear` wrapping it. This works on any model with such modules.

The base model is frozen. :meth:`MTLoRAHandle.disable` / :meth:`~MTLoRAHandle.enable` switch the
adapters off and on by their ``enabled`` flag, with modules and hooks left in place (so the
adapters move with the model, and torch.compile, which does not guard on hooks, sees the
switch); :meth:`MTLoRAHandle.remove` restores the original modules, hooks and ``requires_grad``
flags, so the model computes exactly what it did before. Nothing here imports
``transformers``: models are recognised by ``model.config.model_type`` and layer class names.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from mtlora_kernels._checks import as_int
from mtlora_kernels.losses import auxiliary_loss
from mtlora_kernels.nn import MTLoRAAdapter, MTLoRAConfig, MTLoRALinear
from mtlora_kernels.nn.adapter import linear_widths

BLOCK_PLACEMENTS = ("ffn", "attn", "both")
ADAPTER_ATTR = "mtlora_adapter"


@dataclass(frozen=True)
class _Family:
    """Where the pieces of one pre-LN transformer layer live, by attribute name."""

    layer_class: str
    attn: str
    attn_norm: str
    ffn: str
    ffn_norm: str


#: model_type -> layer layout. The norms are only checked to exist: the adapter's input is taken
#: from the sub-layer's own input, which these layers compute as ``sublayer(norm(h))``.
SUPPORTED_ARCHITECTURES: dict[str, _Family] = {
    "llama": _Family("LlamaDecoderLayer", "self_attn", "input_layernorm", "mlp",
                     "post_attention_layernorm"),
    "mistral": _Family("MistralDecoderLayer", "self_attn", "input_layernorm", "mlp",
                       "post_attention_layernorm"),
    "qwen2": _Family("Qwen2DecoderLayer", "self_attn", "input_layernorm", "mlp",
                     "post_attention_layernorm"),
    # The same layer code as LLaMA's in transformers 5 (their own norms, attention and MLP
    # inside; Gemma2/3, OLMo2 and Granite are not: extra norms or a scale after the sub-layer).
    "qwen3": _Family("Qwen3DecoderLayer", "self_attn", "input_layernorm", "mlp",
                     "post_attention_layernorm"),
    "gemma": _Family("GemmaDecoderLayer", "self_attn", "input_layernorm", "mlp",
                     "post_attention_layernorm"),
    "olmo": _Family("OlmoDecoderLayer", "self_attn", "input_layernorm", "mlp",
                    "post_attention_layernorm"),
    # In ViT the layer's hidden dropout applies to FFN(z) + adapter(z) together.
    "vit": _Family("ViTLayer", "attention", "layernorm_before", "mlp", "layernorm_after"),
}


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def _is_layer(module: nn.Module, class_name: str) -> bool:
    # By name through the MRO: no transformers import, and subclasses (FSDP's) still match.
    return any(cls.__name__ == class_name for cls in type(module).__mro__)


def _find_layers(model: nn.Module, family: _Family) -> list[tuple[str, nn.Module]]:
    layers = [(n, m) for n, m in model.named_modules() if _is_layer(m, family.layer_class)]
    if not layers:
        raise ValueError(f"model_type {_model_type(model)!r} but no {family.layer_class} module "
                         f"found in {type(model).__name__}")
    for name, layer in layers:
        absent = [a for a in (family.attn, family.attn_norm, family.ffn, family.ffn_norm)
                  if not isinstance(getattr(layer, a, None), nn.Module)]
        if absent:
            raise ValueError(
                f"{name} ({type(layer).__name__}) lacks the sub-modules {absent} that mtLoRA's "
                f"block-level placement expects; this transformers version lays the layer out "
                f"differently. Use component-level placement (target_modules=[...]) instead.")
    return layers


def _layer_indices(n: int, wanted: Sequence[int]) -> list[int]:
    """``wanted`` (negative counting from the end) as sorted, distinct indices into n layers,
    Python ints whatever integer type they came as (numpy, 0-d tensors: saved as JSON)."""
    wanted = [as_int(index, f"layers[{j}]") for j, index in enumerate(wanted)]
    bad = [i for i in wanted if not -n <= i < n]
    if bad:
        raise ValueError(f"layers: indices {bad} out of range for a model with {n} layers")
    return sorted({i % n for i in wanted})


def normalized_layers(model: nn.Module, layers: Sequence[int] | None) -> list[int] | None:
    """``layers`` as sorted non-negative indices, None (every layer) included, so that two
    ways of naming the same layers compare equal; as given on an unsupported architecture."""
    family = SUPPORTED_ARCHITECTURES.get(_model_type(model))
    if family is None:
        return None if layers is None else list(layers)
    n = len(_find_layers(model, family))
    return list(range(n)) if layers is None else _layer_indices(n, layers)


def _block_hook(module: nn.Module, args: tuple, kwargs: dict, output):
    """``output + adapter(z)`` with z the sub-layer's own input (positional or hidden_states=)."""
    z = args[0] if args else kwargs["hidden_states"]
    adapter = getattr(module, ADAPTER_ATTR)
    if isinstance(output, tuple):  # attention returns (attn_output, attn_weights)
        return (adapter(z, residual=output[0]), *output[1:])
    return adapter(z, residual=output)


class MTLoRAHandle:
    """What :func:`attach` returns: the adapters it added and the way to take them off.

    Attributes: ``model``, ``config`` (:class:`MTLoRAConfig`), ``placement`` ('ffn' | 'attn' |
    'both' | 'component'), ``target_modules`` (component-level), ``layers`` (indices or None),
    ``adapters`` (dict: module path -> :class:`MTLoRAAdapter`; the paths prefix the adapters'
    keys in ``model.state_dict()``).
    """

    def __init__(self, model: nn.Module, config: MTLoRAConfig, placement: str,
                 target_modules: list[str] | None, layers: list[int] | None) -> None:
        self.model = model
        self.config = config
        self.placement = placement
        self.target_modules = target_modules
        self.layers = layers
        self.adapters: dict[str, MTLoRAAdapter] = {}
        self._hosts: list[nn.Module] = []  # block: the sub-layers that carry an adapter
        self._hooks: list = []
        self._swaps: list[tuple[nn.Module, str, nn.Linear]] = []  # component: parent, name, base
        self._requires_grad: dict[str, bool] = {}  # by name: to_empty / FSDP2 swap the objects
        self._removed = False

    # --- queries -------------------------------------------------------------------------

    def parameters(self) -> Iterator[nn.Parameter]:
        """The adapters' parameters (what an optimizer should get)."""
        for adapter in self.adapters.values():
            yield from adapter.parameters()

    def num_parameters(self) -> int:
        """Adapter parameters: ``d*r + N*r*d + d*N*g`` per block adapter (no router when N = 1)."""
        return sum(p.numel() for p in self.parameters())

    def num_trainable_parameters(self) -> int:
        """Parameters of the whole model with ``requires_grad`` (the adapters, base frozen)."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def state_dict(self) -> dict[str, Tensor]:
        """The adapters' tensors only, keyed as in ``model.state_dict()``."""
        return {f"{name}.{k}": v.detach() for name, a in self.adapters.items()
                for k, v in a.state_dict().items()}

    def aux_loss(self, **kwargs) -> Tensor:
        """:func:`mtlora_kernels.losses.auxiliary_loss` of the model (balance + spectral terms of
        the last forward; keyword arguments go to it).

        The balance term raises if that forward's routing weights carry no graph while
        gradients are on (reentrant checkpointing runs the forward under no_grad; see
        :meth:`MTLoRAAdapter.balance_loss`), or if the adapters were disabled.
        """
        self._check_live()
        if not self.enabled:
            raise RuntimeError("the adapters are disabled: the last forward computed no routing "
                               "and adds nothing to the model; enable() them first")
        return auxiliary_loss(self.model, **kwargs)

    @property
    def enabled(self) -> bool:
        """Whether the adapters are in the forward path (their ``enabled`` flags)."""
        return all(a.enabled for a in self.adapters.values())

    def __repr__(self) -> str:
        where = (f"component {self.target_modules}" if self.placement == "component"
                 else self.placement)
        return (f"MTLoRAHandle({type(self.model).__name__}, {where}, {len(self.adapters)} "
                f"adapters, {self.num_parameters():,} parameters, enabled={self.enabled})")

    # --- switching -----------------------------------------------------------------------

    def enable(self) -> None:
        """Put the adapters in the forward path (the state right after :func:`attach`)."""
        self._switch(True)

    def disable(self) -> None:
        """Take the adapters out of the forward path: the model computes its base outputs.

        Each adapter's ``enabled`` flag goes False; modules, hooks and parameters stay where
        they are (``model.parameters()`` still lists the adapters, ``model.to(...)`` still
        moves them), and a compiled model recompiles for the new state. Do not switch while a
        DDP/FSDP wrapper is training (its set of used parameters changes).
        """
        self._switch(False)

    def _switch(self, on: bool) -> None:
        self._check_live()
        for adapter in self.adapters.values():
            adapter.enabled = on

    @contextlib.contextmanager
    def disabled(self):
        """``with handle.disabled(): base_out = model(x)``."""
        was = self.enabled
        self.disable()
        try:
            yield self
        finally:
            if was:
                self.enable()

    def remove(self) -> nn.Module:
        """Take the adapters off for good: modules, hooks and ``requires_grad`` flags are as
        they were before :func:`attach`. Returns the model."""
        self._check_live()
        self.disable()
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for parent, name, base in self._swaps:
            setattr(parent, name, base)
        for host in self._hosts:
            delattr(host, ADAPTER_ATTR)
        params = dict(self.model.named_parameters())  # the names of before attach() again
        for name, flag in self._requires_grad.items():
            if name in params:
                params[name].requires_grad_(flag)
        del self.model._mtlora_handle
        self._removed = True
        return self.model

    def _check_live(self) -> None:
        if self._removed:
            raise RuntimeError("these adapters were removed; attach() again to add new ones")


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside ``torch.compile``'s wrapper, else ``model``: the adapters are named
    after the model's own modules (the wrapper's names start with ``_orig_mod.``, which would
    reach checkpoint keys and keep a compiled and a plain model from sharing checkpoints)."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model


def get_handle(model: nn.Module) -> MTLoRAHandle | None:
    """The handle of the adapters attached to ``model`` (compiled or not), or None."""
    return getattr(unwrapped(model), "_mtlora_handle", None)


def _parse_targets(target_modules) -> list[str]:
    if isinstance(target_modules, str):
        target_modules = target_modules.split(",")
    targets = [t.strip() for t in target_modules if t.strip()]
    if not targets:
        raise ValueError("target_modules is empty; give module names such as "
                         "['q_proj', 'v_proj']")
    return targets


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def attach(
    model: nn.Module,
    config: MTLoRAConfig | None = None,
    *,
    placement: str | None = None,
    target_modules: Sequence[str] | str | None = None,
    layers: Sequence[int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> MTLoRAHandle:
    """Add mtLoRA adapters to ``model`` in place, freeze everything else, return the handle.

    Args:
        model: a transformers model. Block-level placement supports the model types in
            :data:`SUPPORTED_ARCHITECTURES` (llama, mistral, qwen2, qwen3, gemma, olmo
            decoders; vit); any model with the named ``nn.Linear`` (or ``Conv1D``) modules works
            component-level.
        config: the adapters' hyper-parameters (default :class:`MTLoRAConfig`()).
        placement: 'ffn' (default; the official setting), 'attn' or 'both': block-level.
        target_modules: module names (``['q_proj', 'v_proj']`` or ``'q_proj,v_proj'``; a name
            matches a module whose dotted path ends with it): component-level instead. Exclusive
            with ``placement``.
        layers: indices of the transformer layers to adapt (default all; negative counts from
            the end; the handle records them sorted and non-negative).
        dtype: the adapters' parameter dtype (fp32 master weights by default; the forward casts
            them to the activations' dtype).

    Everything is checked before the model is touched: on an error the model is unchanged.
    """
    model = unwrapped(model)
    if get_handle(model) is not None:
        raise RuntimeError(f"{type(model).__name__} already has mtLoRA adapters attached; call "
                           f"remove() on its handle first")
    cfg = config or MTLoRAConfig()
    if not isinstance(cfg, MTLoRAConfig):
        raise TypeError(f"config must be an MTLoRAConfig, got {type(cfg).__name__}")
    if target_modules is not None and placement is not None:
        raise ValueError(f"give either placement={placement!r} (block-level) or target_modules "
                         f"(component-level), not both")
    mtype = _model_type(model)
    family = SUPPORTED_ARCHITECTURES.get(mtype)
    supported = ", ".join(sorted(SUPPORTED_ARCHITECTURES))
    chosen = None
    if layers is not None:
        if len(layers) == 0:
            raise ValueError("layers=[] selects no layer; pass None for every layer")
        if family is None:
            raise ValueError(f"layers=... needs a supported architecture ({supported}); "
                             f"{type(model).__name__} has model_type {mtype!r}")
        every = _find_layers(model, family)
        layers = _layer_indices(len(every), layers)
        chosen = [every[i] for i in layers]

    if target_modules is not None:
        targets = _parse_targets(target_modules)
        scope = [name for name, _ in chosen] if chosen is not None else None

        def in_scope(name: str) -> bool:  # inside the layers=... chosen, when given
            return scope is None or any(name.startswith(s + ".") for s in scope)

        found: list[tuple[str, nn.Module]] = []
        for name, module in model.named_modules():
            if not any(_matches(name, t) for t in targets) or not in_scope(name):
                continue
            widths = linear_widths(module)
            if widths is None:
                raise TypeError(f"target {name} is a {type(module).__name__}; component-level "
                                f"mtLoRA wraps nn.Linear (and transformers' Conv1D) modules only")
            owner = model.get_submodule(name.rpartition(".")[0])
            if isinstance(owner, nn.MultiheadAttention):
                raise TypeError(f"target {name} belongs to an nn.MultiheadAttention, which reads "
                                f"its weight instead of calling it: an adapter there would "
                                f"never run")
            if widths[1] % cfg.groups:
                raise ValueError(f"groups={cfg.groups} must divide {name}'s output width "
                                 f"{widths[1]}")
            found.append((name, module))
        missing = [t for t in targets if not any(_matches(n, t) for n, _ in found)]
        if missing:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                             if linear_widths(m) is not None and in_scope(n)})
            where = (type(model).__name__ if scope is None
                     else f"layers {layers} of {type(model).__name__}")
            raise ValueError(f"target_modules {missing} match no nn.Linear (or Conv1D) in "
                             f"{where}; the Linear modules there are named {linear}")
        handle = MTLoRAHandle(model, cfg, "component", targets, layers)
        _freeze(handle)
        for name, linear in found:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            wrapper = MTLoRALinear(linear, cfg).train(linear.training)
            wrapper.adapter.to(dtype=dtype)
            handle._swaps.append((parent, child, linear))
            handle.adapters[f"{name}.adapter"] = wrapper.adapter
            setattr(parent, child, wrapper)
    else:
        placement = placement or "ffn"
        if placement not in BLOCK_PLACEMENTS:
            raise ValueError(f"placement must be one of {BLOCK_PLACEMENTS} (block-level), or "
                             f"pass target_modules=[...] for component-level; got {placement!r}")
        if family is None:
            raise NotImplementedError(
                f"block-level mtLoRA supports model types {supported}; {type(model).__name__} "
                f"has model_type {mtype!r}. Component-level placement (target_modules=[...]) "
                f"works on any model with nn.Linear (or Conv1D) modules.")
        if chosen is None:
            chosen = _find_layers(model, family)
        d = model.config.hidden_size
        if d % cfg.groups:
            raise ValueError(f"groups={cfg.groups} must divide hidden_size={d}")
        subs = {"ffn": [family.ffn], "attn": [family.attn],
                "both": [family.attn, family.ffn]}[placement]
        handle = MTLoRAHandle(model, cfg, placement, None, layers)
        _freeze(handle)
        for layer_name, layer in chosen:
            for sub in subs:
                host = getattr(layer, sub)
                ref = next(host.parameters(), None)
                adapter = MTLoRAAdapter(d, d, cfg).to(
                    device=ref.device if ref is not None else None, dtype=dtype)
                adapter.train(host.training)
                host.add_module(ADAPTER_ATTR, adapter)
                handle._hooks.append(host.register_forward_hook(_block_hook, with_kwargs=True))
                handle._hosts.append(host)
                handle.adapters[f"{layer_name}.{sub}.{ADAPTER_ATTR}"] = adapter
    model._mtlora_handle = handle  # the adapters start enabled
    return handle


def _freeze(handle: MTLoRAHandle) -> None:
    handle._requires_grad = {n: p.requires_grad for n, p in handle.model.named_parameters()}
    handle.model.requires_grad_(False)


__all__ = ["attach", "get_handle", "MTLoRAHandle", "SUPPORTED_ARCHITECTURES",
           "BLOCK_PLACEMENTS"]
