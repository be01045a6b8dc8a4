"""Attach mtLoRA adapters to a Hugging Face ``transformers`` model in one call, and take them off.

Block-level (``placement='ffn' | 'attn' | 'both'``, SPEC section 2): one
:class:`~mtlora_kernels.nn.MTLoRAAdapter` per transformer layer, in parallel with the whole
sub-layer::

    h1 = h + Attn(LN1(h));  z = LN2(h1);  out = h1 + FFN(z) + adapter(z)      # 'ffn'
    out = h + Attn(LN1(h)) + adapter(LN1(h))  (then the FFN as usual)         # 'attn'

The adapter is registered as a child ``mtlora_adapter`` of the sub-layer module (the FFN, ``mlp`` or
Granite-MoE's ``block_sparse_moe`` or MPT's ``ffn``, or the attention module: ``self_attn``, GPT-2's
``attn``, in a hybrid stack the token mixer each layer has, ``self_attn``, ``linear_attn``,
``mamba`` or ``conv``, Nemotron-H's and Mamba's ``mixer``; the official code's ``block_adapter``
sits in the same place) and runs from ONE forward hook on that module. In most supported layers the
sub-layer's first argument (positional or by keyword) is its z, and the only other activation it
gets is BLOOM's and MPT's residual, which those modules add to their output themselves: the hook's
input *is* z. The hook passes the sub-layer's output to the fused op as its residual (no extra pass
over [T, d]). In BERT's layer (kind 4 of the layouts) the module that ends the sub-layer adds the
residual stream, which is z there, itself and normalizes the sum: the adapter sits on that module,
and ONE forward pre-hook replaces its residual argument z by ``z + adapter(z)`` (z the fused op's
residual). Pre-LN encoders built of BERT's modules (ESM's layout: esm, xlm-roberta-xl,
roberta-prelayernorm, megatron-bert) add the residual r in the same module, with no norm after, and
z is LN(r): the same pre-hook applies the sub-layer's norm module to r again and passes ``r +
adapter(LN(r))``. One hook with no state kept between hooks is what makes this safe under gradient
checkpointing (the recompute re-runs the same hook) and under torch.compile (dynamo inlines it). The
exception: where no one module is the FFN (OPT's, XGLM's, BioGPT's, BART's, Whisper's and MusicGen's
``fc1`` ... ``fc2`` loose in the layer: the table's ``ffn_first``), the adapter sits on the last, a
pre-hook on the first hands z to it and the hook on the last adds ``adapter(z)`` to its output and
drops z. The layer calls the two one after the other, in its forward and in a checkpoint's recompute
alike.

The layer layouts it knows, by ``config.model_type`` (:data:`SUPPORTED_ARCHITECTURES`, in four
kinds), are in :mod:`mtlora_kernels.integrations.layouts`; docs/MODELS.md lists them for users.

Multimodal models go by their language model: where ``config.model_type`` is not in the table
and ``config.text_config.model_type`` is (tested: gemma3, gemma4, llava, mistral3, fuyu,
qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_vl_moe, qwen3_5, qwen3_5_moe, qwen4_exp, lfm3_vl,
dots3_note, cohere_compass, inkling_mm_model, emu3, apertus1p5, and on audio qwen2_audio and
voxtral; nemotron_h_omni, its language model tested on text; llama4, tried once; gemma3n, whose
vision tower needs timm, not tried), that entry is used: its layer class names the language
model's layers, which the vision tower (SigLIP, CLIP, Pixtral, Qwen-VL's and Gemma 4's blocks)
does not contain, and ``text_config.hidden_size`` is the adapters' width. As a guard, layers of
the class found in more than one place (a vision tower built of them, extra prediction layers)
are refused, except an encoder-decoder's encoder and decoder stacks. A dual encoder
(:data:`DUAL_ENCODERS`: clip, siglip, ...) goes by its ``vision_config``'s entry instead: its
image classifier (``CLIPForImageClassification``) holds the vision tower alone and gets adapters
there; the dual encoder itself (``CLIPModel``), a text tower of the same layer class beside it,
is refused by that guard (attach to its ``vision_model``).

Component-level (``target_modules=['q_proj', 'v_proj']``, HydraLoRA's placement): each named
``nn.Linear`` (or transformers' ``Conv1D``, GPT-2's) is replaced by
:class:`~mtlora_kernels.nn.MTLoRALinear` wrapping it. This works on any model with such modules.

The base model is frozen, but for the modules named by ``train_modules`` (a task head), which
train in full beside the adapters. :meth:`MTLoRAHandle.disable` / :meth:`~MTLoRAHandle.enable`
switch the adapters off and on by their ``enabled`` flag, with modules and hooks left in place
(so the adapters move with the model, and torch.compile, which does not guard on hooks, sees the
switch); :meth:`MTLoRAHandle.remove` restores the original modules, hooks, ``requires_grad``
flags and train modules' values, so the model computes exactly what it did before. Nothing
here imports ``transformers``: models are recognised by ``model.config.model_type`` (or its
``text_config``'s, a dual encoder's ``vision_config``'s) and layer class names.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from mtlora_kernels._checks import as_int
from mtlora_kernels.integrations.layouts import (DUAL_ENCODERS, ENCODER_DECODERS,
                                                 SUPPORTED_ARCHITECTURES, LayerLayout)
from mtlora_kernels.losses import auxiliary_loss
from mtlora_kernels.nn import MTLoRAAdapter, MTLoRAConfig, MTLoRALinear
from mtlora_kernels.nn.adapter import linear_widths
from mtlora_kernels.ops.mix import _FLOAT_DTYPES

BLOCK_PLACEMENTS = ("ffn", "attn", "both")
ADAPTER_ATTR = "mtlora_adapter"


def _names(names: str | tuple[str, ...] | None) -> tuple[str, ...]:
    """A table field as a tuple of attribute names (none for None)."""
    return () if names is None else (names,) if isinstance(names, str) else tuple(names)


def _attribute(layer: nn.Module, path: str):
    """``layer``'s attribute at the dotted ``path`` (None: there is none)."""
    for name in path.split("."):
        layer = getattr(layer, name, None)
    return layer


def _holds(layer: nn.Module, family: LayerLayout, kind: str) -> bool:
    """Whether ``layer`` holds the sub-layer ``kind`` ('attn' or 'ffn'): every layer does but
    one of a family with ``sub_layer_by``, which holds the kind its attribute's value names, and
    one of a family without an FFN (``ffn`` None: Mamba's blocks), which holds a mixer only."""
    if family.sub_layer_by is None:
        return kind == "attn" or family.ffn is not None
    attr, mixers, ffns = family.sub_layer_by
    return getattr(layer, attr, None) in (mixers if kind == "attn" else ffns)


def _module_named(layer: nn.Module, names: str | tuple[str, ...]) -> str | None:
    """Of alternative names (dotted paths), the first that is a module of ``layer`` (None: none
    is)."""
    return next((n for n in _names(names) if isinstance(_attribute(layer, n), nn.Module)), None)


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def sub_config_name(model_type: str | None) -> str:
    """Which sub-config of a config whose own type is not in the table names the layers
    block-level placement adapts: a dual encoder's ``vision_config``, else ``text_config``."""
    return "vision_config" if model_type in DUAL_ENCODERS else "text_config"


def _layers_config(config):
    """The config of the layers block-level placement adapts: ``config`` where its model_type
    is in the table; for a dual encoder (:data:`DUAL_ENCODERS`) whose ``vision_config``'s is, that
    vision_config; for a multimodal model whose own type is not in the table, and whose
    ``text_config``'s is (LLaVA, Mistral 3, Gemma 3, Qwen-VL: a vision tower beside a language
    model built from text_config), that text_config; else None."""
    mtype = getattr(config, "model_type", None)
    if mtype in SUPPORTED_ARCHITECTURES:
        return config
    sub = getattr(config, sub_config_name(mtype), None)
    return sub if getattr(sub, "model_type", None) in SUPPORTED_ARCHITECTURES else None


def _family_of(model: nn.Module) -> tuple[LayerLayout, ...] | None:
    """The table's families for ``model`` (one per layer class of its stack), or None."""
    config = _layers_config(getattr(model, "config", None))
    if config is None:
        return None
    entry = SUPPORTED_ARCHITECTURES[config.model_type]
    return entry if isinstance(entry, tuple) else (entry,)


def _type_named(model: nn.Module) -> str:
    """The model's type as an error message names it (with its text_config's, where used)."""
    mtype = _model_type(model)
    config = _layers_config(getattr(model, "config", None))
    if config is None or config.model_type == mtype:
        return f"model_type {mtype!r}"
    return f"model_type {mtype!r} ({sub_config_name(mtype)}: {config.model_type!r})"


def hidden_size_of(model: nn.Module) -> int:
    """The width of the model's layers: ``hidden_size`` of the config :func:`_layers_config`
    picks (a multimodal model's text_config: its language model's width, where LLaVA's and
    Qwen-VL's configs have none of their own and Qwen-VL's vision_config has another; a dual
    encoder's vision_config: its vision tower's width, not its text tower's); of an
    unsupported model, ``config.hidden_size``, or its ``text_config``'s where it has none."""
    config = _layers_config(model.config) or model.config
    if getattr(config, "hidden_size", None) is None and hasattr(config, "text_config"):
        config = config.text_config
    return config.hidden_size


def _layer_width(model: nn.Module, layer: nn.Module) -> int:
    """The width of ``layer``'s residual stream: ``hidden_size`` of the config the layer keeps,
    where it keeps one (T5Gemma's encoder and decoder layers: their stack's own config, the two
    stacks' widths may differ), else :func:`hidden_size_of` the model."""
    width = getattr(getattr(layer, "config", None), "hidden_size", None)
    return width if isinstance(width, int) else hidden_size_of(model)


def _is_layer(module: nn.Module, class_name: str) -> bool:
    # By name through the MRO: no transformers import, and subclasses (FSDP's) still match.
    return any(cls.__name__ == class_name for cls in type(module).__mro__)


def _find_layers(model: nn.Module, families: tuple[LayerLayout, ...]
                 ) -> list[tuple[str, nn.Module, LayerLayout]]:
    """The model's layers of the families' classes, in order, each with its family."""
    layers = []
    for n, m in model.named_modules():
        family = next((f for f in families if _is_layer(m, f.layer_class)), None)
        if family is not None:
            layers.append((n, m, family))
    classes = " or ".join(f.layer_class for f in families)
    if not layers:
        raise ValueError(f"{_type_named(model)} but no {classes} module found in "
                         f"{type(model).__name__}")
    # One stack of layers: layers of that class anywhere else (a vision tower built of them,
    # extra prediction layers) would get adapters too, and shift the indices layers=... counts.
    # An encoder-decoder's two stacks are the exception (ENCODER_DECODERS).
    order = list(dict.fromkeys(n.rpartition(".")[0] for n, _, _ in layers))  # module order
    stacks = sorted(order)
    two = (_layers_config(model.config).model_type in ENCODER_DECODERS
           and _encoder_then_decoder(order))
    if len(stacks) > 1 and not two:
        raise ValueError(
            f"{classes} modules in {len(stacks)} places ({', '.join(stacks)}) of "
            f"{type(model).__name__}; block-level placement adapts one stack of layers. Attach "
            f"to the submodule that holds the stack you mean (a dual encoder's vision_model), "
            f"or use component-level placement (target_modules=[...]) instead.")
    # Every name the family gives must be there (of a tuple of alternatives, one; of the
    # transforms after a sub-layer, each): a module, or after a sub-layer a number or a tensor
    # too (Granite's multiplier, BEiT's layer-scale parameter). None, no norm there, is not
    # looked up.
    for name, layer, family in layers:
        kinds = {n: nn.Module for n in (family.attn, family.attn_norm, family.ffn,
                                        family.ffn_norm, family.ffn_first)}
        kinds.update({n: (nn.Module, Tensor, int, float)
                      for n in _names(family.attn_after) + _names(family.ffn_after)})
        kinds.pop(None, None)
        absent = [n for n, kind in kinds.items()
                  if not any(isinstance(_attribute(layer, a), kind) for a in _names(n))]
        # A residual argument must be a parameter of the module's forward, by that name.
        for sub, arg in ((family.attn, family.attn_residual), (family.ffn, family.ffn_residual)):
            path = _module_named(layer, sub)
            if (arg is not None and path is not None
                    and _argument_index(layer.get_submodule(path), arg) is None):
                absent.append(f"{path}({arg}=)")
        # A layer that is one sub-layer: its attribute must name a kind the family knows.
        if family.sub_layer_by is not None and not any(
                _holds(layer, family, kind) for kind in ("attn", "ffn")):
            attr, mixers, ffns = family.sub_layer_by
            absent.append(attr if not hasattr(layer, attr) else
                          f"{attr} one of {[*mixers, *ffns]} (it has {getattr(layer, attr)!r})")
        if absent:
            raise ValueError(
                f"{name} ({type(layer).__name__}) lacks {absent}, which mtLoRA's block-level "
                f"placement expects there; this transformers version lays the layer out "
                f"differently. Use component-level placement (target_modules=[...]) instead.")
        # The adapter becomes a child of its host: an nn.Sequential would run it as one more
        # stage, on the last stage's output (CTRL's FFN: its entry names the last Linear).
        stages = [p for p in (_module_named(layer, family.attn), _module_named(layer, family.ffn))
                  if p is not None and isinstance(layer.get_submodule(p), nn.Sequential)]
        if stages:
            raise ValueError(
                f"{name} ({type(layer).__name__}): {stages} is an nn.Sequential, which would run "
                f"an adapter registered in it as one more stage; the table must name a module "
                f"inside it (ffn_first ... ffn). Use component-level placement "
                f"(target_modules=[...]) instead.")
    return layers


def _encoder_then_decoder(stacks: list[str]) -> bool:
    """Whether ``stacks`` (paths, in module order) are an encoder-decoder's two: equal up to a
    part ``encoder`` in the first and ``decoder`` in the second (``encoder.block``,
    ``decoder.block``)."""
    if len(stacks) != 2:
        return False
    first, second = (path.split(".") for path in stacks)
    if "encoder" not in first:
        return False
    i = first.index("encoder")
    return (len(first) == len(second) and second[i] == "decoder"
            and first[:i] + first[i + 1:] == second[:i] + second[i + 1:])


def _layer_indices(n: int, wanted: Sequence[int]) -> list[int]:
    """``wanted`` (negative counting from the end) as sorted, distinct indices into n layers,
    Python ints whatever integer type they came as (numpy, 0-d tensors: saved as JSON)."""
    wanted = [as_int(index, f"layers[{j}]") for j, index in enumerate(wanted)]
    bad = [i for i in wanted if not -n <= i < n]
    if bad:
        raise ValueError(f"layers: indices {bad} out of range for a model with {n} layers")
    return sorted({i % n for i in wanted})


def normalized_layers(model: nn.Module, layers: Sequence[int] | None,
                      placement: str | None = None) -> list[int] | None:
    """``layers`` as sorted non-negative indices, None (every layer) included, so that two
    ways of naming the same layers compare equal; as given on an unsupported architecture. With
    a block-level ``placement``, the layers among them that get an adapter by it: where each
    layer is one sub-layer (Nemotron-H's blocks), those of the placement's kind, so that
    ``layers=None`` and the FFN blocks named one by one compare equal for ``'ffn'``."""
    families = _family_of(model)
    if families is None:
        return None if layers is None else list(layers)
    every = _find_layers(model, families)
    indices = list(range(len(every))) if layers is None else _layer_indices(len(every), layers)
    if placement not in BLOCK_PLACEMENTS:
        return indices
    kinds = ("attn", "ffn") if placement == "both" else (placement,)
    return [i for i in indices if any(_holds(every[i][1], every[i][2], k) for k in kinds)]


def _plus_adapter(module: nn.Module, z: Tensor, out: Tensor) -> Tensor:
    """``out + adapter(z)`` in one pass (``out`` the fused op's residual), by ``module``'s
    adapter. An ``out`` of another shape than z, as many elements (Llama 4's MoE block: [B*S, d],
    which its layer views back), gets the adapter's output in its own shape."""
    adapter = getattr(module, ADAPTER_ATTR)
    if out.shape == z.shape:
        return adapter(z, residual=out)
    return adapter(z, residual=out.reshape(z.shape)).reshape(out.shape)


def _input_of(module: nn.Module, args: tuple, kwargs: dict) -> Tensor:
    """The first argument of a call of ``module``, positional or by keyword (``hidden_states=``,
    or the name its forward gives it: DistilBERT's attention gets ``query=`` in transformers 4)."""
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    first = next(iter(inspect.signature(module.forward).parameters), None)
    if first not in kwargs:
        raise RuntimeError(
            f"the mtLoRA adapter on {type(module).__name__} found no input: the layer called it "
            f"with keywords {sorted(kwargs)}, neither a positional argument nor hidden_states= "
            f"nor {first}=; this transformers version calls the sub-layer otherwise than "
            f"block-level placement expects. Use component-level placement "
            f"(target_modules=[...]) instead.")
    return kwargs[first]


def _block_hook(module: nn.Module, args: tuple, kwargs: dict, output):
    """``output + adapter(z)`` with z the sub-layer's own input (:func:`_input_of`)."""
    z = _input_of(module, args, kwargs)
    # attention returns (attn_output, attn_weights), some MoE blocks (output, router_logits);
    # GPT-1's attention a list [attn_output, ...]
    if not isinstance(output, (tuple, list)):
        return _plus_adapter(module, z, output)
    y = (_plus_adapter(module, z, output[0]), *output[1:])
    return list(y) if isinstance(output, list) else y


class _SpanInput(threading.local):
    """Where the hooks of an FFN that is no one module (``ffn_first``) hand its input z over
    (``.z``), on the adapter as ``span_input``: one per thread, as a call of the layer runs its
    two hooks in one thread (a checkpoint's recompute too). Two threads running the model at
    once (serving under no_grad) each hand over their own; with one attribute, one thread's
    last module took the other's z (a silently wrong output) and the other's found none.
    Copies and pickles of the model get an empty one (a z lives within one call)."""

    z: Tensor | None = None

    def __reduce__(self):
        return type(self), ()


def _span_input_hook(module: nn.Module, args: tuple, kwargs: dict, *, last: nn.Module) -> None:
    """A forward pre-hook on the first module of an FFN that is no one module (``ffn_first``,
    OPT's ``fc1``): hands its input z to the adapter on the FFN's last module ``last``, for
    :func:`_span_output_hook` (:class:`_SpanInput`). The layer calls the two one after the
    other, in its forward and in a checkpoint's recompute alike."""
    getattr(last, ADAPTER_ATTR).span_input.z = _input_of(module, args, kwargs)


def _span_output_hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
    """A forward hook on the last module of such an FFN (OPT's ``fc2``): ``output + adapter(z)``,
    z what :func:`_span_input_hook` handed over in this call of the layer (taken, so that no
    activation outlives the call)."""
    span = getattr(module, ADAPTER_ATTR).span_input
    z, span.z = span.z, None
    if z is None:
        raise RuntimeError(
            f"the mtLoRA adapter on {type(module).__name__} got no FFN input: the module was "
            f"called without the FFN's first module before it; this transformers version "
            f"calls the FFN otherwise than block-level placement expects. Use component-level "
            f"placement (target_modules=[...]) instead.")
    return _plus_adapter(module, z, output)


def _span_end_hook(layer: nn.Module, args: tuple, output, *, last: nn.Module) -> None:
    """A forward hook on the layer of such an FFN, run even when its call raises
    (``always_call``): drops a z that :func:`_span_output_hook` did not take. Left on the
    adapter by an exception between the two hooks (an out-of-memory error, a failing module),
    it kept that input, and its graph, alive, and a later call of ``last`` alone used it
    instead of refusing."""
    getattr(last, ADAPTER_ATTR).span_input.z = None


def _sub_layer(layer: nn.Module, family: LayerLayout, kind: str
               ) -> tuple[str, str | None, nn.Module | None, str | None]:
    """Where sub-layer ``kind`` ('attn' or 'ffn') of ``layer`` gets its adapter: the path of the
    host module (of alternatives, the first the layer has), the residual argument it gets (kind
    4, else None), the norm the hook applies to that argument (``residual_normed``, ESM's
    layout: the sub-layer's own norm; else None) and the path of the module whose input is z
    where that is not the host (``ffn_first``, OPT's ``fc1``; else None)."""
    sub, residual, norm = ((family.ffn, family.ffn_residual, family.ffn_norm) if kind == "ffn"
                           else (family.attn, family.attn_residual, family.attn_norm))
    normed = layer.get_submodule(_module_named(layer, norm)) if family.residual_normed else None
    first = family.ffn_first if kind == "ffn" else None
    return _module_named(layer, sub), residual, normed, first


def _argument_index(module: nn.Module, arg: str) -> int | None:
    """The position of parameter ``arg`` of ``module``'s forward (None: it has none)."""
    params = list(inspect.signature(module.forward).parameters)
    return params.index(arg) if arg in params else None


def _residual_hook(module: nn.Module, args: tuple, kwargs: dict, *, arg: str, index: int,
                   norm: nn.Module | None = None):
    """A forward pre-hook on a module that adds the residual stream r it gets as argument ``arg``
    (positional at ``index``, or by keyword) to the sub-layer's output, then applies the post-LN
    (BERT's output modules): r is z there and becomes ``z + adapter(z)``, so the module computes
    ``LN(Sub(..) + z + adapter(z))``. With ``norm`` (a pre-LN sub-layer ended by such a module,
    no post-LN after the add: ESM's layout), z is ``norm(r)``, the sub-layer's input computed
    again by the same module on the same tensor (one norm more per adapted sub-layer; the norm
    is frozen base model, so only the adapter trains), and r becomes ``r + adapter(norm(r))``:
    the module computes ``Sub(norm(r)) + r + adapter(norm(r))``. Either way the adapter's
    output does not go through the module's dropout, which acts on the projection alone
    (identity in eval; StarCoder2's is the same)."""
    positional = len(args) > index
    r = args[index] if positional else kwargs[arg]
    # A disabled adapter returns r (as on every other hook): no norm computed for nothing.
    normed = norm is not None and getattr(module, ADAPTER_ATTR).enabled
    if normed and getattr(module, "_is_replica", False):
        # The norm is the layer's, not this module's: a copy of the model that nn.DataParallel
        # made for another GPU would apply the original one, on the first GPU.
        raise RuntimeError(
            f"block-level adapters on {type(module).__name__} (ESM's layout: the norm applied "
            f"again to the residual) do not run under nn.DataParallel; run one process per GPU "
            f"(torchrun --nproc_per_node=N: DistributedDataParallel) or use one GPU")
    y = _plus_adapter(module, norm(r) if normed else r, r)
    if positional:
        return (*args[:index], y, *args[index + 1:]), kwargs
    return args, {**kwargs, arg: y}


class MTLoRAHandle:
    """What :func:`attach` returns: the adapters it added and the way to take them off.

    Attributes: ``model``, ``config`` (:class:`MTLoRAConfig`), ``placement`` ('ffn' | 'attn' |
    'both' | 'component'), ``target_modules`` (component-level), ``layers`` (indices or None),
    ``train_modules`` (names as given, or None), ``adapters`` (dict: module path ->
    :class:`MTLoRAAdapter`; the paths prefix the adapters' keys in ``model.state_dict()``).

    What trains is the adapters and the train modules: :meth:`parameters`,
    :meth:`named_parameters`, :meth:`num_parameters` and :meth:`state_dict` cover both (the
    adapters first). The auxiliary losses (:meth:`aux_loss`) are the adapters' alone.
    """

    def __init__(self, model: nn.Module, config: MTLoRAConfig, placement: str,
                 target_modules: list[str] | None, layers: list[int] | None,
                 train_modules: list[str] | None = None) -> None:
        self.model = model
        self.config = config
        self.placement = placement
        self.target_modules = target_modules
        self.layers = layers
        self.train_modules = train_modules
        self.adapters: dict[str, MTLoRAAdapter] = {}
        self._train_paths: list[str] = []  # the modules train_modules selected
        # their parameters' and buffers' values at attach (path -> name -> copy), for remove()
        self._originals: dict[str, dict[str, Tensor]] = {}
        self._hosts: list[nn.Module] = []  # block: the sub-layers that carry an adapter
        self._hooks: list = []
        self._swaps: list[tuple[nn.Module, str, nn.Linear]] = []  # component: parent, name, base
        self._requires_grad: dict[str, bool] = {}  # by name: to_empty / FSDP2 swap the objects
        self._removed = False

    # --- queries -------------------------------------------------------------------------

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, parameter) of the adapters, then of the train modules, named as in
        ``model.named_parameters()`` (e.g. to give the head its own learning rate)."""
        for name, tensor in self._tensors(buffers=False).items():
            yield name, tensor

    def parameters(self) -> Iterator[nn.Parameter]:
        """The adapters' parameters, then the train modules' (what an optimizer should get)."""
        for _, p in self.named_parameters():
            yield p

    def num_parameters(self) -> int:
        """Parameters of :meth:`parameters`: ``d*r + N*r*d + d*N*g`` per block adapter (no router
        when N = 1), plus the train modules'."""
        return sum(p.numel() for p in self.parameters())

    def num_trainable_parameters(self) -> int:
        """Parameters of the whole model with ``requires_grad`` (the adapters, base frozen)."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def state_dict(self) -> dict[str, Tensor]:
        """The adapters' tensors and the train modules' (their ``state_dict()``: parameters and
        persistent buffers), keyed as in ``model.state_dict()``; no other base weight."""
        return {k: v.detach() for k, v in self._tensors().items()}

    def _tensors(self, buffers: bool = True) -> dict[str, Tensor]:
        """The live tensors of :meth:`state_dict` (``buffers=False``: the parameters alone), a
        tensor shared by two train modules (tied weights) once. Looked up by name each time:
        to_empty / FSDP2 swap the objects."""
        out = {f"{name}.{k}": p for name, a in self.adapters.items()
               for k, p in a.named_parameters()}
        seen: set[int] = set()
        for path in self._train_paths:
            module = self.model.get_submodule(path)
            items = (module.state_dict(keep_vars=True).items() if buffers
                     else module.named_parameters())
            for k, t in items:
                if id(t) not in seen:
                    seen.add(id(t))
                    out[f"{path}.{k}"] = t
        return out

    def aux_loss(self, **kwargs) -> Tensor:
        """:func:`mtlora_kernels.losses.auxiliary_loss` of the model (balance + spectral terms of
        the last forward the adapters ran enabled; keyword arguments go to it).

        The balance term raises if that forward's routing weights carry no graph while
        gradients are on (reentrant checkpointing runs the forward under no_grad; see
        :meth:`MTLoRAAdapter.balance_loss`). Refused while the adapters are disabled (inside
        :meth:`disabled`, after :meth:`disable`); with some switched off by hand (an ablation)
        the balance term is the others' (:func:`~mtlora_kernels.losses.balance_loss`).
        """
        self._check_live()
        if not any(a.enabled for a in self.adapters.values()):
            raise RuntimeError("the adapters are disabled: they add nothing to the model; "
                               "enable() them first (aux_loss then reads the last forward they "
                               "ran enabled)")
        return auxiliary_loss(self.model, **kwargs)

    @property
    def enabled(self) -> bool:
        """Whether the adapters are in the forward path (their ``enabled`` flags)."""
        return all(a.enabled for a in self.adapters.values())

    def __repr__(self) -> str:
        where = (f"component {self.target_modules}" if self.placement == "component"
                 else self.placement)
        train = f", train {self._train_paths}" if self._train_paths else ""
        return (f"MTLoRAHandle({type(self.model).__name__}, {where}{train}, "
                f"{len(self.adapters)} adapters, {self.num_parameters():,} parameters, "
                f"enabled={self.enabled})")

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

        The train modules are not touched: they are part of the model, not adapters, so a
        disabled model computes the base model with its trained head (their values and
        ``requires_grad`` stay); only :meth:`remove` gives their original values back.
        """
        self._switch(False)

    def _switch(self, on: bool) -> None:
        self._check_live()
        for adapter in self.adapters.values():
            adapter.enabled = on

    @contextlib.contextmanager
    def disabled(self):
        """``with handle.disabled(): base_out = model(x)``; afterwards each adapter's
        ``enabled`` flag is what it was before (one switched off by hand stays off)."""
        self._check_live()
        was = [(a, a.enabled) for a in self.adapters.values()]
        self.disable()
        try:
            yield self
        finally:
            if not self._removed:  # remove() inside the block: nothing to switch back
                for adapter, on in was:
                    adapter.enabled = on

    def remove(self) -> nn.Module:
        """Take the adapters off for good: modules, hooks and ``requires_grad`` flags are as
        they were before :func:`attach`, and the train modules' parameters and buffers hold
        their values of then again (from the copy attach kept; a model attached on the meta
        device had none to keep). Returns the model."""
        self._check_live()
        self.disable()
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for parent, name, base in self._swaps:
            setattr(parent, name, base)
        for host in self._hosts:
            delattr(host, ADAPTER_ATTR)
        with torch.no_grad():
            for path, originals in self._originals.items():
                module = self.model.get_submodule(path)
                live = {**dict(module.named_parameters()), **dict(module.named_buffers())}
                for k, value in originals.items():
                    if not value.is_meta:
                        live[k].copy_(value)
        self._originals.clear()
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


def _parse_targets(target_modules, field: str = "target_modules",
                   example: str = "['q_proj', 'v_proj']") -> list[str]:
    if isinstance(target_modules, str):
        target_modules = target_modules.split(",")
    targets = [t.strip() for t in target_modules if t.strip()]
    if not targets:
        raise ValueError(f"{field} is empty; give module names such as {example}")
    return targets


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _named_modules(model: nn.Module, remove_duplicate: bool = True
                   ) -> Iterator[tuple[str, nn.Module]]:
    """``model.named_modules()`` without the internals of ``torch.nn.utils.parametrize``: a
    parametrized module's ``parametrizations`` container, its ParametrizationLists and the
    parametrization modules in them (``proj.parametrizations.weight.0``), which targets are
    not meant to name and which a name such as ``'0'`` (a Sequential's child) or ``'weight'``
    matched, failing the attach. The parametrized module itself is matched as any other."""
    inner: list[str] = []  # the containers met so far (named_modules lists parents first)
    for name, module in model.named_modules(remove_duplicate=remove_duplicate):
        if any(name == p or name.startswith(p + ".") for p in inner):
            continue
        if torch.nn.utils.parametrize.is_parametrized(module):
            inner.append(f"{name}.parametrizations" if name else "parametrizations")
        yield name, module


def train_module_paths(model: nn.Module, names: list[str]) -> list[str]:
    """The paths of the modules ``names`` select, matched as ``target_modules`` are (a name
    matches a module whose dotted path ends with it), in model order, outermost only (a module
    inside another selected one trains with it). Every name must match, every module selected
    must have parameters."""
    found = [n for n, _ in _named_modules(model) if n and any(_matches(n, t) for t in names)]
    missing = [t for t in names if not any(_matches(n, t) for n in found)]
    if missing:
        named = sorted({n.rsplit(".", 1)[-1] for n, m in _named_modules(model)
                        if n and not n.rsplit(".", 1)[-1].isdigit()
                        and next(m.parameters(), None) is not None})
        raise ValueError(f"train_modules {missing} match no module of {type(model).__name__}; "
                         f"its modules with parameters are named {named}")
    outer = [n for n in found if not any(n.startswith(o + ".") for o in found)]
    empty = [n for n in outer if next(model.get_submodule(n).parameters(), None) is None]
    if empty:
        raise ValueError(f"train_modules: {empty} have no parameters to train")
    return outer


def _check_train_modules(model: nn.Module, names: list[str], adapted: list[str],
                         adapters: list[str]) -> list[str]:
    """The train modules' paths (:func:`train_module_paths`), none of them an ``adapted``
    module (a target Linear, a sub-layer that gets a block-level adapter), holding one, or
    sharing a parameter with one (tied weights), and no name one of the ``adapters`` to be."""
    own = [t for t in names if any(_matches(a, t) for a in adapters)]
    if own:
        raise ValueError(f"train_modules {own} name the mtLoRA adapters, which train anyway; "
                         f"name the modules that should train beside them (a task head)")
    paths = train_module_paths(model, names)
    for path in paths:
        params = list(model.get_submodule(path).parameters())
        ids = {id(p) for p in params}
        for host in adapted:
            if path == host or host.startswith(path + "."):
                what = "gets" if path == host else f"holds {host}, which gets"
                raise ValueError(f"train_modules: {path} {what} an adapter; a module that trains "
                                 f"must lie outside the adapted ones (the adapters train anyway)")
            if any(id(p) in ids for p in model.get_submodule(host).parameters()):
                raise ValueError(f"train_modules: {path} shares a parameter with {host} (tied "
                                 f"weights), which gets an adapter and must stay frozen")
        if not torch.is_inference_mode_enabled() and any(p.is_inference() for p in params):
            # requires_grad cannot be set on them here (it failed after the model was frozen)
            raise ValueError(f"train_modules: {path}'s parameters are inference tensors (the "
                             f"model was built or loaded under torch.inference_mode()), which "
                             f"cannot train; build the model outside inference_mode")
    return paths


def attach(
    model: nn.Module,
    config: MTLoRAConfig | None = None,
    *,
    placement: str | None = None,
    target_modules: Sequence[str] | str | None = None,
    layers: Sequence[int] | None = None,
    train_modules: Sequence[str] | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> MTLoRAHandle:
    """Add mtLoRA adapters to ``model`` in place, freeze everything else, return the handle.

    Args:
        model: a transformers model. Block-level placement supports the model types in
            :data:`SUPPORTED_ARCHITECTURES` (LLaMA-like, MoE, hybrid linear attention or SSM /
            full attention, parallel and post-norm decoders, ModernBERT, ViT-style vision
            encoders, BERT-style post-LN encoders, ESM-style pre-LN encoders, T5-style and
            BART-style encoder-decoders, speech and audio models: Whisper, wav2vec 2.0, ...; see
            the module docstring), multimodal models whose
            ``text_config`` has one of them (their language model's layers), and the image
            classifiers of :data:`DUAL_ENCODERS` (their vision tower's layers); any model with
            the named ``nn.Linear`` (or ``Conv1D``) modules works component-level.
        config: the adapters' hyper-parameters (default :class:`MTLoRAConfig`()).
        placement: 'ffn' (default; the official setting), 'attn' or 'both': block-level.
        target_modules: module names (``['q_proj', 'v_proj']`` or ``'q_proj,v_proj'``; a name
            matches a module whose dotted path ends with it; a parametrized module's
            ``parametrizations``, ``torch.nn.utils.parametrize``'s internals, are never
            matched): component-level instead. Exclusive with ``placement``. A Linear
            registered under several names (``self.b = self.a``) gets one adapter, named after
            its first path, in every place it is registered.
        layers: indices of the transformer layers to adapt (default all; negative counts from
            the end; the handle records them sorted and non-negative). An encoder-decoder's
            (:data:`ENCODER_DECODERS`) count the encoder's layers, then the decoder's. Where each
            layer is one sub-layer (Nemotron-H's blocks), blocks are counted, and a selected
            block of the other kind than ``placement``'s is skipped; a selection with none of it
            is refused.
        train_modules: modules that train in full beside the adapters, a task head
            (``'classifier'``, ``'score'``, ``'lm_head'``): named as ``target_modules`` are,
            matched in the whole model (``layers`` does not restrict them), none of them adapted
            or holding an adapted module. Their parameters get ``requires_grad=True`` and join
            the handle's :meth:`~MTLoRAHandle.parameters` and
            :meth:`~MTLoRAHandle.state_dict` (so :func:`~mtlora_kernels.io.save_adapters` saves
            them); a weight tied to another module's (``lm_head`` to the embeddings) trains with
            it. For :meth:`~MTLoRAHandle.remove` attach keeps a copy of their parameters and
            buffers, on their device: memory as large as the modules (an ``lm_head`` of a large
            vocabulary: vocabulary x width).
        dtype: the adapters' parameter dtype (fp32 master weights by default; the forward casts
            them to the activations' dtype).

    Everything is checked before the model is touched: on an error the model is unchanged.
    Under ``torch.inference_mode()`` too the adapters get ordinary parameters (not inference
    tensors), which a later :func:`~mtlora_kernels.io.load_adapters` and training can update.
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
    # Checked here, not met by the adapters' .to() after the model was frozen.
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dtype (the adapters' parameters) must be one of {_FLOAT_DTYPES}, got "
                        f"{dtype!r}")
    train = (None if train_modules is None
             else _parse_targets(train_modules, "train_modules", "'classifier'"))
    families = _family_of(model)
    supported = (", ".join(sorted(SUPPORTED_ARCHITECTURES))
                 + ", multimodal models whose text_config has one of these types, and the "
                 + "image classifiers of the dual encoders " + ", ".join(DUAL_ENCODERS))
    chosen = None
    if layers is not None:
        try:
            layers = list(layers)
        except TypeError:
            raise TypeError(f"layers must be a sequence of layer indices, got "
                            f"{type(layers).__name__} {layers!r}") from None
        if len(layers) == 0:
            raise ValueError("layers=[] selects no layer; pass None for every layer")
        if families is None:
            raise ValueError(f"layers=... needs a supported architecture ({supported}); "
                             f"{type(model).__name__} has {_type_named(model)}")
        every = _find_layers(model, families)
        layers = _layer_indices(len(every), layers)
        chosen = [every[i] for i in layers]

    if target_modules is not None:
        targets = _parse_targets(target_modules)
        scope = [name for name, _, _ in chosen] if chosen is not None else None

        def in_scope(name: str) -> bool:  # inside the layers=... chosen, when given
            return scope is None or any(name.startswith(s + ".") for s in scope)

        # Every path of every module: a module registered under two names (``self.b = self.a``)
        # runs under both, and is matched under either; its wrapper goes to all its paths.
        named = list(_named_modules(model, remove_duplicate=False))
        paths: dict[int, list[str]] = {}
        for name, module in named:
            paths.setdefault(id(module), []).append(name)
        found: list[tuple[str, nn.Module]] = []  # each module once, under its first path
        for name, module in named:
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
            if not any(m is module for _, m in found):
                found.append((paths[id(module)][0], module))
        missing = [t for t in targets if not any(_matches(n, t) for _, m in found
                                                 for n in paths[id(m)])]
        if missing:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in named
                             if linear_widths(m) is not None and in_scope(n)})
            where = (type(model).__name__ if scope is None
                     else f"layers {layers} of {type(model).__name__}")
            raise ValueError(f"target_modules {missing} match no nn.Linear (or Conv1D) in "
                             f"{where}; the Linear modules there are named {linear}")
        train_paths = [] if train is None else _check_train_modules(
            model, train, [n for n, _ in found], [f"{n}.adapter" for n, _ in found])
        handle = MTLoRAHandle(model, cfg, "component", targets, layers, train)
        _freeze(handle, train_paths)
        for name, linear in found:
            with _outside_inference_mode():
                wrapper = MTLoRALinear(linear, cfg).train(linear.training)
                wrapper.adapter.to(dtype=dtype)
            handle.adapters[f"{name}.adapter"] = wrapper.adapter
            swaps = {}  # (parent, child name) once: a shared parent lists its child twice
            for path in paths[id(linear)]:
                parent_name, _, child = path.rpartition(".")
                parent = model.get_submodule(parent_name)
                swaps[id(parent), child] = (parent, child)
            for parent, child in swaps.values():
                handle._swaps.append((parent, child, linear))
                setattr(parent, child, wrapper)
    else:
        placement = placement or "ffn"
        if placement not in BLOCK_PLACEMENTS:
            raise ValueError(f"placement must be one of {BLOCK_PLACEMENTS} (block-level), or "
                             f"pass target_modules=[...] for component-level; got {placement!r}")
        if families is None:
            raise NotImplementedError(
                f"block-level mtLoRA supports model types {supported}; {type(model).__name__} "
                f"has {_type_named(model)}. Component-level placement (target_modules=[...]) "
                f"works on any model with nn.Linear (or Conv1D) modules.")
        if chosen is None:
            chosen = _find_layers(model, families)
        widths = {name: _layer_width(model, layer) for name, layer, _ in chosen}
        for d in sorted(set(widths.values())):
            if d % cfg.groups:
                raise ValueError(f"groups={cfg.groups} must divide hidden_size={d}")
        kinds = {"ffn": ["ffn"], "attn": ["attn"], "both": ["attn", "ffn"]}[placement]
        for layer_name, layer, fam in chosen:
            if fam.refused_if and _attribute(layer, fam.refused_if[0]):
                raise NotImplementedError(
                    f"{layer_name} ({type(layer).__name__}) has {fam.refused_if[0]}="
                    f"{_attribute(layer, fam.refused_if[0])!r}: {fam.refused_if[1]}. Use "
                    f"component-level placement (target_modules=[...]).")
            if "ffn" in kinds and fam.ffn_refused_if and hasattr(layer, fam.ffn_refused_if[0]):
                raise NotImplementedError(
                    f"placement={placement!r}: {layer_name} ({type(layer).__name__}) has "
                    f"{fam.ffn_refused_if[0]!r}: {fam.ffn_refused_if[1]}. Use placement='attn' "
                    f"or component-level placement (target_modules=[...]).")
        # The sub-layers that get an adapter; in a layer that is one sub-layer (sub_layer_by),
        # the one it is.
        hosts = [(layer_name, layer, *_sub_layer(layer, fam, kind))
                 for layer_name, layer, fam in chosen for kind in kinds
                 if _holds(layer, fam, kind)]
        if not hosts and chosen[0][2].sub_layer_by is None:  # placement='ffn', layers with none
            fam = chosen[0][2]
            raise ValueError(
                f"placement='ffn': {type(model).__name__}'s layers ({fam.layer_class}) have no "
                f"FFN, each is one token mixer ({fam.attn}) on its norm; placement='attn' adapts "
                f"it (so does 'both', every sub-layer the layers have).")
        if not hosts:  # layers=... selected only blocks of the other kind (or the model has none)
            every = _find_layers(model, families)
            attr, mixers, ffns = chosen[0][2].sub_layer_by  # every chosen layer has one
            what = {"ffn": "FFN", "attn": "token-mixer"}[placement]
            have = [i for i, (_, m, f) in enumerate(every) if _holds(m, f, placement)]
            picked = (f"{type(model).__name__} has none" if layers is None else
                      f"layers {layers} select none: " + ", ".join(
                          f"{n} is {getattr(m, attr)!r}" for n, m, _ in chosen))
            raise ValueError(
                f"placement={placement!r} adapts the {what} blocks ({attr} one of "
                f"{list(ffns if placement == 'ffn' else mixers)}), and {picked}. The {what} "
                f"blocks are layers {have}; placement='both' adapts every block.")
        train_paths = [] if train is None else _check_train_modules(
            model, train, [f"{n}.{sub}" for n, _, sub, *_ in hosts],
            [f"{n}.{sub}.{ADAPTER_ATTR}" for n, _, sub, *_ in hosts])
        handle = MTLoRAHandle(model, cfg, placement, None, layers, train)
        _freeze(handle, train_paths)
        for layer_name, layer, sub, residual, norm, first in hosts:
            host = layer.get_submodule(sub)
            ref = next(host.parameters(), None)
            d = widths[layer_name]
            with _outside_inference_mode():
                adapter = MTLoRAAdapter(d, d, cfg).to(
                    device=ref.device if ref is not None else None, dtype=dtype)
            adapter.train(host.training)
            host.add_module(ADAPTER_ATTR, adapter)
            if first is not None:  # an FFN of loose Linear layers: z from its first module
                adapter.span_input = _SpanInput()
                handle._hooks += [
                    layer.get_submodule(first).register_forward_pre_hook(
                        functools.partial(_span_input_hook, last=host), with_kwargs=True),
                    host.register_forward_hook(_span_output_hook),
                    layer.register_forward_hook(functools.partial(_span_end_hook, last=host),
                                                always_call=True)]
            elif residual is None:
                handle._hooks.append(host.register_forward_hook(_block_hook, with_kwargs=True))
            else:
                handle._hooks.append(host.register_forward_pre_hook(functools.partial(
                    _residual_hook, arg=residual, index=_argument_index(host, residual),
                    norm=norm), with_kwargs=True))
            handle._hosts.append(host)
            handle.adapters[f"{layer_name}.{sub}.{ADAPTER_ATTR}"] = adapter
    model._mtlora_handle = handle  # the adapters start enabled
    return handle


def _outside_inference_mode():
    """Where attach builds the adapters. They are model state, not results: built (or loaded,
    import_*) under torch.inference_mode() their parameters would be inference tensors, which
    outside it can be neither written (a later load_adapters) nor saved for backward (training).
    Only they: the model's own tensors (a train module's) are what the caller made them, and an
    inference tensor takes requires_grad inside inference mode only. (Grad mode does not matter
    here: inference_mode(False) turns it on, and building records nothing.)"""
    return torch.inference_mode(False)


def _freeze(handle: MTLoRAHandle, train_paths: list[str]) -> None:
    """Freeze the model but the train modules, whose tensors are copied for remove()."""
    model = handle.model
    handle._requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(False)
    for path in train_paths:
        module = model.get_submodule(path)
        handle._originals[path] = {k: t.detach().clone() for k, t in
                                   [*module.named_parameters(), *module.named_buffers()]}
        module.requires_grad_(True)
    handle._train_paths = list(train_paths)


__all__ = ["attach", "get_handle", "MTLoRAHandle", "train_module_paths",
           "SUPPORTED_ARCHITECTURES", "DUAL_ENCODERS", "ENCODER_DECODERS", "BLOCK_PLACEMENTS"]
