"""Save and load mtLoRA adapters only: safetensors for the tensors, JSON for the config.

A saved directory holds ``adapter_model.safetensors`` (keys as in ``model.state_dict()``, e.g.
``model.layers.0.mlp.mtlora_adapter.lora_B``, and ``classifier.weight`` of a train module) and
``adapter_config.json`` (the :class:`MTLoRAConfig`, the placement, the train modules, the
adapters' names and widths, and their parameters' dtype).

Loading is safe and all-or-nothing:

- tensors are read only through safetensors; a pickle-based file (``.bin``, ``.pt``, a
  ``torch.save`` zip, a raw pickle) is refused before a byte of it is interpreted, because
  unpickling runs arbitrary code;
- every check (file integrity, config, key set, shapes, dtypes) passes before the first tensor
  is copied, so a truncated, mismatched or foreign file raises a clear error and leaves the
  model as it was (adapters attached for the load are taken off again).

HydraLoRA (component-level, ``lora_B{i}.weight``) and official mtLoRA (block-level,
``block_adapter.lora_B.{i}.weight``) checkpoints import through :func:`import_hydralora` and
:func:`import_official`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import Tensor, nn

from mtlora_kernels.integrations.hf import (MTLoRAHandle, attach, get_handle, hidden_size_of,
                                            normalized_layers, train_module_paths, unwrapped)
from mtlora_kernels.nn import MTLoRAConfig
from mtlora_kernels.nn.adapter import linear_widths
from mtlora_kernels.ops.mix import _FLOAT_DTYPES

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT = "mtlora-kernels/adapters"
# 1: adapters only. 2: adds ``train_modules`` and their tensors; written only by a save that has
# train modules, so that other files stay readable by releases that read 1 (and a release that
# cannot load a train module refuses the file by its version, not on its tensors' keys).
FORMAT_VERSION = 2
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# Fields that change what the weights mean. dropout is a training choice (restored when
# load_adapters attaches, not compared); backend names the machine that saved, so it is
# recorded but not restored (this machine's $MTLORA_BACKEND / auto picks one).
_WEIGHT_FIELDS = ("r", "num_experts", "groups", "alpha")


class AdapterLoadError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the mismatch."""


# --------------------------------------------------------------------------------------------
# Reading files safely.
# --------------------------------------------------------------------------------------------


def _refuse_pickle(path: Path) -> None:
    raise AdapterLoadError(
        f"{path} is a pickle-based checkpoint (torch.save / .bin); mtlora_kernels loads adapter "
        f"weights only from safetensors, because unpickling a file can run arbitrary code. "
        f"Convert it once where you trust the file, e.g. "
        f"safetensors.torch.save_file(torch.load(path, weights_only=True), "
        f"'{path.with_suffix('.safetensors').name}').")


def read_safetensors(path: str | os.PathLike) -> dict[str, Tensor]:
    """All tensors of a safetensors file (on the CPU), after checking that it is one.

    Raises :class:`AdapterLoadError` for a pickle-based file (by suffix or content), a file
    shorter than its header says (truncated), or any other malformed file.
    """
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        _refuse_pickle(path)
    if not path.is_file():
        raise FileNotFoundError(f"no adapter weights file at {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: u64 little-endian header length, then a JSON header starting with '{'.
    if len(head) == 9 and head[8:9] == b"{":
        header_len = int.from_bytes(head[:8], "little")
        if 8 + header_len > size:
            raise AdapterLoadError(f"{path} is truncated: its header needs {8 + header_len} "
                                   f"bytes, the file has {size}")
    elif head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in b"\x02\x03\x04\x05"):
        _refuse_pickle(path)
    else:
        raise AdapterLoadError(f"{path} is not a safetensors file ({size} bytes, it starts "
                               f"with {head[:9]!r}); it may be truncated")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except SafetensorError as exc:
        raise AdapterLoadError(f"{path} is not a valid safetensors file, possibly truncated: "
                               f"{exc}") from exc


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"no adapter config at {path}")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterLoadError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise AdapterLoadError(f"{path} holds a JSON {type(meta).__name__}, not an adapter config "
                               f"object")
    return meta


def _weights_in(directory: Path) -> Path:
    path = directory / WEIGHTS_NAME
    if not path.exists():
        pickled = [p.name for p in directory.glob("*") if p.suffix.lower() in PICKLE_SUFFIXES]
        if pickled:
            _refuse_pickle(directory / pickled[0])
    return path


# --------------------------------------------------------------------------------------------
# Our format.
# --------------------------------------------------------------------------------------------


def _resolve(model_or_handle) -> tuple[nn.Module, MTLoRAHandle | None]:
    if isinstance(model_or_handle, MTLoRAHandle):
        # A removed handle's adapters are no longer in the model: loading into them would
        # "succeed" and leave the model computing its base outputs.
        model_or_handle._check_live()
        return model_or_handle.model, model_or_handle
    model = unwrapped(model_or_handle)
    handle = get_handle(model)
    if handle is None and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module  # a DDP wrapper: the adapters live on the wrapped model
        handle = get_handle(model)
    return model, handle


def _refuse_dtype(dtype: torch.dtype | None, caller: str, model: nn.Module) -> None:
    """``dtype=`` sets the dtype of the adapters a load attaches; adapters attached already
    keep theirs, so it is refused there rather than ignored."""
    if dtype is not None:
        raise ValueError(f"dtype={dtype} is for the adapters {caller} attaches; "
                         f"{type(model).__name__} has them attached already")


def _is_dtensor(t: Tensor) -> bool:
    """A parameter of a model sharded with FSDP2 (``fully_shard``)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _distributed_rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def save_adapters(model_or_handle, directory: str | os.PathLike) -> Path:
    """Write the adapters of a model (or handle) to ``directory``; returns the directory.

    Only the adapters and the train modules (``attach(..., train_modules=...)``: their
    parameters and persistent buffers, under their model names, in the same safetensors file)
    are saved (``adapter_model.safetensors`` + ``adapter_config.json``, which lists the train
    modules), never the rest of the base model and never a pickle. Under torch.distributed
    only rank 0 writes, and the other ranks return at once: put a
    ``torch.distributed.barrier()`` between this and a load on every rank. A model sharded
    with FSDP2 must call this on every rank (gathering the shards is collective), and then
    every rank returns after rank 0 has written.
    """
    model, handle = _resolve(model_or_handle)
    if handle is None:
        raise ValueError(f"{type(model).__name__} has no mtLoRA adapters attached")
    directory = Path(directory)
    state = handle.state_dict()
    sharded = any(_is_dtensor(v) for v in state.values())
    tensors = {k: (v.full_tensor() if _is_dtensor(v) else v).contiguous().cpu()
               for k, v in state.items()}
    if _distributed_rank() == 0:
        _write(directory, tensors, handle, model)
    if sharded:  # every rank is here: let none read the directory before rank 0 has written it
        torch.distributed.barrier()
    return directory


def _write(directory: Path, tensors: dict[str, Tensor], handle: MTLoRAHandle, model: nn.Module
           ) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    # The config text first (a value JSON cannot hold fails before anything is written), then
    # each file beside its place and renamed: an interrupted save leaves no half-written file.
    config = _meta_text(handle, model)
    for name, write in ((WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"})),
                        (CONFIG_NAME, lambda p: p.write_text(config))):
        tmp = directory / (name + ".tmp")
        write(tmp)
        os.replace(tmp, directory / name)


def _meta_text(handle: MTLoRAHandle, model: nn.Module) -> str:
    """What ``adapter_config.json`` holds about ``handle``'s adapters, as JSON text (also a
    Trainer checkpoint's ``mtlora_adapters.json``)."""
    from mtlora_kernels import __version__

    return json.dumps({
        "format": FORMAT,
        "format_version": FORMAT_VERSION if handle.train_modules else 1,
        "mtlora_kernels_version": __version__,
        "config": handle.config.to_dict(),
        "placement": handle.placement,
        "target_modules": handle.target_modules,
        "layers": handle.layers,
        "train_modules": handle.train_modules,
        "model_type": getattr(getattr(model, "config", None), "model_type", None),
        "adapters": _adapter_widths(handle),
        "dtype": _adapters_dtype(handle),
    }, indent=2)


def _adapter_widths(handle: MTLoRAHandle) -> dict:
    """The adapters' module paths and widths, as the config file lists them."""
    return {name: {"d_in": a.d_in, "d_out": a.d_out} for name, a in handle.adapters.items()}


def _adapters_dtype(handle: MTLoRAHandle) -> str | None:
    """The adapters' parameter dtype ('bfloat16'), which a load that attaches restores; None
    when they do not share one (cast apart after attach)."""
    dtypes = {p.dtype for a in handle.adapters.values() for p in a.parameters()}
    return str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else None


def _saved_dtype(meta: dict, where: Path) -> torch.dtype | None:
    """The file's adapter dtype; None where it has none (files before it was saved, adapters
    of mixed dtypes). Read only where it is used: a load that attaches without ``dtype=``."""
    name = meta.get("dtype")
    if name is None:
        return None
    names = {str(d).removeprefix("torch."): d for d in _FLOAT_DTYPES}
    if not isinstance(name, str) or name not in names:
        raise AdapterLoadError(f"{where}: 'dtype' must be one of {sorted(names)} or null, got "
                               f"{name!r}")
    return names[name]


def _check_meta(meta: dict, where: Path) -> MTLoRAConfig:
    if meta.get("format") != FORMAT:
        raise AdapterLoadError(f"{where} is not an mtlora-kernels adapter config (format "
                               f"{meta.get('format')!r}, expected {FORMAT!r}); for HydraLoRA or "
                               f"official mtLoRA checkpoints use import_hydralora / "
                               f"import_official")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise AdapterLoadError(f"{where} has format_version {meta['format_version']}; this "
                               f"mtlora_kernels reads up to {FORMAT_VERSION}")
    train = meta.get("train_modules")  # absent from version 1 files
    if train is not None and not (isinstance(train, list) and train
                                  and all(isinstance(t, str) for t in train)):
        raise AdapterLoadError(f"{where}: 'train_modules' must be a non-empty list of module "
                               f"names or null, got {train!r}")
    try:
        return MTLoRAConfig(**{**meta["config"], "backend": None})
    except (TypeError, ValueError, KeyError) as exc:
        raise AdapterLoadError(f"{where}: bad 'config' entry: {exc}") from exc


def _config_diffs(cfg: MTLoRAConfig, handle: MTLoRAHandle, source: str = "file") -> list[str]:
    """The fields that shape or scale the weights (alpha: shapes cannot tell) that differ."""
    return [f"{k}: {source} has {getattr(cfg, k)!r}, the attached adapters have "
            f"{getattr(handle.config, k)!r}"
            for k in _WEIGHT_FIELDS if getattr(cfg, k) != getattr(handle.config, k)]


def _compare_meta(meta: dict, cfg: MTLoRAConfig, handle: MTLoRAHandle, where: Path) -> None:
    diffs = _config_diffs(cfg, handle)
    # The same adapters however they were named: layers counted from either end. Compared
    # canonical only: a raw == took a file's [0, true] for layers [0, 1]. Target names are not
    # compared ("q_proj" and "model.layers.0.self_attn.q_proj" can pick the same modules): the
    # tensor keys, checked next, name the adapters each side has. Nor are a component-level
    # attach's layers, which only narrow its targets (q_proj in layers [1] is
    # model.layers.1.self_attn.q_proj in every layer).
    # Train modules likewise by the modules the names select.
    same = {"placement": lambda v: v,
            "layers": lambda v: normalized_layers(handle.model, v, handle.placement),
            "train_modules": lambda v: [] if v is None else train_module_paths(handle.model, v)}
    if handle.placement == "component":
        del same["layers"]
    for key, canon in same.items():
        ours = getattr(handle, key)
        try:
            equal = canon(meta.get(key)) == canon(ours)
        # The file's layer indices do not fit this model (ValueError) or are not integers,
        # a JSON true or "3" (TypeError), its train modules select none here (ValueError): a
        # difference to report, not a traceback.
        except (TypeError, ValueError):
            equal = False
        if not equal:
            diffs.append(f"{key}: file has {meta.get(key)!r}, the attached adapters have "
                         f"{ours!r}")
    if diffs:
        raise AdapterLoadError(f"{where} does not match the attached adapters: "
                               + "; ".join(diffs))


def _check_same_adapters(meta: dict, handle: MTLoRAHandle, where: Path) -> None:
    """:func:`_compare_meta`, and the same adapters (module paths and widths) as the file lists:
    where no tensors are checked (a Trainer checkpoint, loaded by the Trainer's non-strict
    ``load_state_dict``), these stand for the tensor keys."""
    _compare_meta(meta, _check_meta(meta, where), handle, where)
    ours = _adapter_widths(handle)
    theirs = meta.get("adapters")
    if theirs != ours:
        theirs = theirs if isinstance(theirs, dict) else {}
        diffs = [f"{len(v)} only in the {side}, e.g. {v[:2]}" for side, v in (
            ("file", sorted(set(theirs) - set(ours))),
            ("model", sorted(set(ours) - set(theirs)))) if v]
        diffs += [f"{k}: {theirs[k]} in the file, {ours[k]} in the model"
                  for k in sorted(set(ours) & set(theirs)) if theirs[k] != ours[k]][:2]
        raise AdapterLoadError(f"{where} does not match the attached adapters: "
                               f"adapters {'; '.join(diffs)}")


def _validate_tensors(tensors: Mapping[str, Tensor], handle: MTLoRAHandle, where) -> None:
    """Every key present, none extra, every shape equal, every dtype floating (a train module's
    integer buffer, BatchNorm's ``num_batches_tracked``: its own dtype)."""
    want = handle.state_dict()
    missing = sorted(set(want) - set(tensors))
    extra = sorted(set(tensors) - set(want))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors, e.g. {missing[:3]}")
    if extra:
        problems.append(f"{len(extra)} unexpected tensors, e.g. {extra[:3]}")
    for key in sorted(set(want) & set(tensors)):
        got, exp = tensors[key], want[key]
        if tuple(got.shape) != tuple(exp.shape):
            problems.append(f"{key}: shape {tuple(got.shape)} in the file, "
                            f"{tuple(exp.shape)} in the model")
        elif (not got.is_floating_point() if exp.is_floating_point() else got.dtype != exp.dtype):
            problems.append(f"{key}: dtype {got.dtype} is not "
                            + ("floating" if exp.is_floating_point() else f"{exp.dtype}"))
    on_meta = [k for k, v in want.items() if v.is_meta]
    if on_meta:
        problems.append(f"{on_meta[0]} (and {len(on_meta) - 1} more tensors) live on the meta "
                        f"device, which holds no values; materialize the model first (e.g. "
                        f"model.to_empty(device=...)), then load")
    if problems:
        raise AdapterLoadError(f"{where} does not fit the attached adapters: "
                               + "; ".join(problems))


def _copy_all(tensors: Mapping[str, Tensor], handle: MTLoRAHandle) -> None:
    """Copy every tensor in (the adapters', the train modules'); an FSDP2-sharded parameter takes
    its shard (collective: every rank loads the same file)."""
    for key, param in handle._tensors().items():
        _copy_into(param, tensors[key])


def _copy_into(param: Tensor, value: Tensor) -> None:
    """``param.copy_(value)``; a parameter sharded with FSDP2 takes its shard of ``value``."""
    if _is_dtensor(param):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value.to(param.device, param.dtype), param.device_mesh,
                                  param.placements)
    with torch.no_grad():
        param.copy_(value)


def _attach_then(model: nn.Module, attach_kwargs: dict, fill: Callable[[MTLoRAHandle], None]
                 ) -> MTLoRAHandle:
    """Attach, run ``fill`` (which validates everything before copying); on any error take the
    adapters off again, so the model is left as it was."""
    handle = attach(model, **attach_kwargs)
    try:
        fill(handle)
    except BaseException:
        handle.remove()
        raise
    return handle


def load_adapters(model_or_handle, directory: str | os.PathLike, *,
                  dtype: torch.dtype | None = None) -> MTLoRAHandle:
    """Load adapters saved by :func:`save_adapters`; returns the handle.

    If the model has no adapters yet they are attached with the saved config, placement,
    train modules and parameter dtype (``dtype=`` another; a file that records none, saved
    before the dtype was or by adapters of several dtypes: ``attach``'s default, fp32). If it
    has, they keep their dtype (``dtype=`` is refused), and the saved config (r, N, g, alpha,
    placement, block-level layers, the modules train_modules select) must match them, and the
    file must hold exactly their tensors (the same adapted modules, however the targets and a
    component-level attach's layers named them), the train modules' included. A file of
    format version 1 (no train modules) loads as before.
    Raises :class:`AdapterLoadError` naming the mismatch; the model is then unchanged.
    """
    directory = Path(directory)
    if directory.is_file():
        raise AdapterLoadError(f"{directory} is a file; pass the directory that holds "
                               f"{WEIGHTS_NAME} and {CONFIG_NAME}")
    meta = _read_json(directory / CONFIG_NAME)
    cfg = _check_meta(meta, directory / CONFIG_NAME)
    weights = _weights_in(directory)
    tensors = read_safetensors(weights)
    model, handle = _resolve(model_or_handle)

    def fill(h: MTLoRAHandle) -> None:
        _validate_tensors(tensors, h, weights)
        _copy_all(tensors, h)

    if handle is not None:
        _refuse_dtype(dtype, "load_adapters", model)
        _compare_meta(meta, cfg, handle, directory / CONFIG_NAME)
        fill(handle)
        return handle
    kwargs = {"config": cfg, "layers": meta.get("layers"),
              "train_modules": meta.get("train_modules"),
              "dtype": dtype or _saved_dtype(meta, directory / CONFIG_NAME) or torch.float32}
    if meta.get("placement") == "component":
        kwargs["target_modules"] = meta.get("target_modules")
    else:
        kwargs["placement"] = meta.get("placement")
    return _attach_then(model, kwargs, fill)


# --------------------------------------------------------------------------------------------
# Foreign checkpoints.
# --------------------------------------------------------------------------------------------

_HYDRA_KEY = re.compile(r"^(?P<module>.+)\.(?P<leaf>lora_A\.weight|lora_B\d+\.weight|"
                        r"lora_route\.weight)$")
_OFFICIAL_KEY = re.compile(r"^(?P<module>.+)\.block_adapter\.(?P<leaf>lora_A\.weight|"
                           r"lora_B\.\d+\.weight|lora_route\.weight)$")


def _group(tensors: Mapping[str, Tensor], pattern: re.Pattern, source: str, where
           ) -> dict[str, dict[str, Tensor]]:
    groups: dict[str, dict[str, Tensor]] = {}
    foreign = []
    for key, value in tensors.items():
        m = pattern.match(key)
        if m is None:
            foreign.append(key)
        else:
            groups.setdefault(m["module"], {})[m["leaf"]] = value
    if foreign:
        other, name = ((_OFFICIAL_KEY, "official") if pattern is _HYDRA_KEY else
                       (_HYDRA_KEY, "hydralora"))
        hint = (f"they are {name} adapter keys: use import_{name}"
                if any(other.match(k) for k in foreign) else
                "the import loads adapters only: load the other tensors (base weights, "
                "modules_to_save, biases) into the model yourself and pass a dict of the "
                "adapter keys")
        raise AdapterLoadError(f"{where}: {len(foreign)} keys are not {source} adapter weights, "
                               f"e.g. {foreign[:3]}; {hint}")
    return groups


def _dotted_suffix(a: str, b: str) -> bool:
    return a == b or a.endswith("." + b) or b.endswith("." + a)


def _match_modules(ours: list[str], theirs: list[str], where) -> dict[str, str]:
    """Our module path -> the checkpoint's; they agree up to a wrapper prefix such as PEFT's
    ``base_model.model.`` (one must be a dotted suffix of the other, uniquely both ways: a
    checkpoint's ``layers.0.self_attn.q_proj`` names an encoder-decoder's two such modules)."""
    mapping, problems = {}, []
    for name in ours:
        hits = [t for t in theirs if _dotted_suffix(name, t)]
        if len(hits) != 1:
            problems.append(f"{name}: {'no' if not hits else len(hits)} matching checkpoint "
                            f"modules{'' if not hits else ' ' + str(hits[:3])}")
        else:
            mapping[name] = hits[0]
    for t in theirs:
        here = sorted(n for n, hit in mapping.items() if hit == t)
        if len(here) > 1:
            problems.append(f"checkpoint module {t} matches {len(here)} modules here: "
                            f"{here[:3]}")
    unused = sorted(set(theirs) - set(mapping.values()))
    if unused:
        problems.append(f"checkpoint modules with no adapter here: {unused[:3]}"
                        f"{' ...' if len(unused) > 3 else ''}")
    if problems:
        raise AdapterLoadError(f"{where} does not match the attached adapters: "
                               + "; ".join(problems))
    return mapping


def _import(model_or_handle, source, *, kind: str, config: MTLoRAConfig | None,
            dtype: torch.dtype | None,
            attach_kwargs: Callable[[nn.Module, dict | None, list[str], str], dict]
            ) -> MTLoRAHandle:
    pattern, strip = {"hydralora": (_HYDRA_KEY, ".adapter"),
                      "official": (_OFFICIAL_KEY, ".mtlora_adapter")}[kind]
    peft_config = None
    if isinstance(source, Mapping):
        tensors, where = dict(source), f"the {kind} state dict"
    else:
        path = Path(source)
        if path.is_dir():
            if (path / CONFIG_NAME).is_file():
                peft_config = _read_json(path / CONFIG_NAME)
            path = _weights_in(path)
        tensors, where = read_safetensors(path), path
    groups = _group(tensors, pattern, kind, where)
    model, handle = _resolve(model_or_handle)

    def fill(h: MTLoRAHandle) -> None:
        ours = {name[: -len(strip)]: a for name, a in h.adapters.items() if name.endswith(strip)}
        if len(ours) != len(h.adapters):
            raise AdapterLoadError(f"{kind} checkpoints hold "
                                   f"{'component' if kind == 'hydralora' else 'block'}-level "
                                   f"adapters; these are placed {h.placement!r}")
        mapping = _match_modules(list(ours), list(groups), where)
        problems = [f"{name}: {p}" for name, a in ours.items()
                    for p in a._converted_problems(groups[mapping[name]], kind)]
        if problems:
            raise AdapterLoadError(f"{where} does not fit the attached adapters: "
                                   + "; ".join(problems))
        # Converted, then copied as load_adapters copies (into FSDP2 shards too).
        for name, adapter in ours.items():
            for key, value in adapter._converted(groups[mapping[name]], kind).items():
                _copy_into(getattr(adapter, key), value)

    if handle is not None:
        _refuse_dtype(dtype, f"import_{kind}", model)
        # The checkpoint's config (given, or its file's) must be the attached adapters': a
        # different alpha loads without a shape error and scales every output wrongly.
        if config is None and peft_config is not None:
            config = (hydralora_config(peft_config)[0] if kind == "hydralora" else
                      official_config(peft_config, hidden_size_of(model))[0])
        diffs = _config_diffs(config, handle, "checkpoint") if config is not None else []
        if diffs:
            raise AdapterLoadError(f"{where} does not match the attached adapters: "
                                   + "; ".join(diffs))
        fill(handle)
        return handle
    kwargs = attach_kwargs(model, peft_config, list(groups), str(where))
    if dtype is not None:
        kwargs["dtype"] = dtype
    return _attach_then(model, kwargs, fill)


def _checkpoint_targets(model: nn.Module, theirs: list[str], where: str) -> list[str]:
    """The paths of this model's Linear (or Conv1D) modules that the checkpoint's module names
    name, up to a wrapper prefix such as PEFT's ``base_model.model.``."""
    linear = [n for n, m in model.named_modules() if linear_widths(m) is not None]
    found = sorted({n for t in theirs for n in linear if _dotted_suffix(n, t)})
    if not found:
        raise AdapterLoadError(f"{where}: none of its modules (e.g. {theirs[:3]}) is an "
                               f"nn.Linear of {type(model).__name__}")
    return found


def _need_config(config: MTLoRAConfig | None, kind: str) -> MTLoRAConfig:
    if config is not None:
        return config
    raise AdapterLoadError(f"importing a {kind} checkpoint into a model without adapters needs "
                           f"config=MTLoRAConfig(...) or a directory with its {CONFIG_NAME}")


def hydralora_config(peft_config: Mapping) -> tuple[MTLoRAConfig, list[str]]:
    """Our config and target modules from a HydraLoRA ``adapter_config.json`` (its fields ``r``,
    ``lora_alpha``, ``lora_nums``, ``lora_dropout``, ``target_modules``).

    The official mtLoRA code's component-level checkpoints have these keys too; with
    ``enable_fine_grained_routing`` their g is each module's ``out_features /
    routing_group_size``, which one config cannot say: that raises, asking for ``config=``."""
    if peft_config.get("enable_fine_grained_routing"):
        raise AdapterLoadError(
            f"this adapter config routes fine-grained (routing_group_size "
            f"{peft_config.get('routing_group_size')}): groups is out_features / "
            f"routing_group_size of each module; pass config=MTLoRAConfig(..., groups=g) with "
            f"that g (all target modules must share it)")
    try:
        cfg = MTLoRAConfig(r=int(peft_config["r"]), num_experts=int(peft_config["lora_nums"]),
                           groups=1, alpha=float(peft_config["lora_alpha"]),
                           dropout=float(peft_config.get("lora_dropout") or 0.0))
        targets = peft_config["target_modules"]
    except KeyError as exc:
        raise AdapterLoadError(f"HydraLoRA adapter config lacks {exc}") from exc
    return cfg, [targets] if isinstance(targets, str) else list(targets)


def official_config(peft_config: Mapping, hidden_size: int) -> tuple[MTLoRAConfig, str]:
    """Our config and placement from an official mtLoRA ``adapter_config.json`` (block-level,
    ``block_adapter_style='lowrank'``; g = hidden_size / routing_group_size when fine-grained)."""
    if not peft_config.get("enable_block_adapter"):
        raise AdapterLoadError("this official mtLoRA config is component-level "
                               "(enable_block_adapter is false); import_official reads block-level "
                               "checkpoints")
    style = peft_config.get("block_adapter_style", "lowrank")
    if style != "lowrank":
        raise AdapterLoadError(f"block_adapter_style {style!r} has a non-linearity or learned "
                               f"scales; only 'lowrank' is the mtLoRA adapter")
    groups = 1
    if peft_config.get("enable_fine_grained_routing"):
        size = int(peft_config.get("routing_group_size", 1))
        if size < 1 or hidden_size % size:
            raise AdapterLoadError(f"routing_group_size {size} must divide the model's "
                                   f"hidden_size {hidden_size}")
        groups = hidden_size // size
    placements = {"attention": "attn", "ffn": "ffn", "both": "both"}
    kind = peft_config.get("block_adapter_type", "attention")  # the released code's default
    if kind not in placements:
        raise AdapterLoadError(f"block_adapter_type must be one of {sorted(placements)}, got "
                               f"{kind!r}")
    rank = peft_config.get("block_adapter_rank") or peft_config.get("r")
    if rank is None or "lora_alpha" not in peft_config:
        raise AdapterLoadError("official mtLoRA adapter config lacks "
                               + ("block_adapter_rank (or r)" if rank is None else "lora_alpha"))
    cfg = MTLoRAConfig(r=int(rank), num_experts=int(peft_config.get("lora_nums") or 1),
                       groups=groups, alpha=float(peft_config["lora_alpha"]),
                       dropout=float(peft_config.get("lora_dropout") or 0.0))
    return cfg, placements[kind]


def import_hydralora(model_or_handle, source, *, config: MTLoRAConfig | None = None,
                     target_modules=None, dtype: torch.dtype | None = None) -> MTLoRAHandle:
    """Load a HydraLoRA checkpoint (keys ``<module>.lora_A.weight``, ``<module>.lora_B{i}.weight``,
    ``<module>.lora_route.weight``, any PEFT prefix) into component-level adapters. With
    ``groups`` g > 1 the router is [g*N, d_in], rows ``G*N + e``: the official mtLoRA code's
    component-level fine-grained checkpoints.

    ``source``: a directory (its ``adapter_model.safetensors``, and ``adapter_config.json`` for
    the config when the model has no adapters yet), a ``.safetensors`` file, or a dict of
    tensors. Without attached adapters, ``config`` (or the directory's config) gives the
    hyper-parameters, and the adapters go on ``target_modules`` or, by default, on exactly the
    modules the checkpoint holds (the config's ``target_modules`` may be a regex string or a bare
    suffix that PEFT matches differently). Module names match up to a wrapper prefix (PEFT's
    ``base_model.model.``); one that fits several modules here (``layers.0.self_attn.q_proj``
    in an encoder-decoder) is refused. The adapters it attaches hold ``dtype`` (default
    ``attach``'s, fp32, whatever the checkpoint's tensors hold; they are cast to it); adapters
    attached already keep theirs (``dtype=`` is refused), as in :func:`load_adapters`.
    Everything is checked first; on an error the model is unchanged.
    """
    def kwargs(model, peft_config, modules, where):
        cfg = config
        if cfg is None and peft_config is not None:
            cfg = hydralora_config(peft_config)[0]
        targets = target_modules
        if targets is None:
            targets = _checkpoint_targets(model, modules, where)
        return {"config": _need_config(cfg, "HydraLoRA"), "target_modules": targets}

    return _import(model_or_handle, source, kind="hydralora", config=config, dtype=dtype,
                   attach_kwargs=kwargs)


def import_official(model_or_handle, source, *, config: MTLoRAConfig | None = None,
                    placement: str | None = None, dtype: torch.dtype | None = None
                    ) -> MTLoRAHandle:
    """Load an official mtLoRA block-level checkpoint (keys ``<layer>.mlp.block_adapter.lora_A
    .weight``, ``...lora_B.{i}.weight``, ``...lora_route.weight``, any PEFT prefix; router rows
    ``G*N + e`` as ours). ``source``, ``dtype`` and the all-or-nothing rule as in
    :func:`import_hydralora`."""
    def kwargs(model, peft_config, _modules, _where):
        cfg, where = config, placement
        if peft_config is not None and (cfg is None or where is None):
            cfg_p, where_p = official_config(peft_config, hidden_size_of(model))
            cfg, where = cfg or cfg_p, where or where_p
        return {"config": _need_config(cfg, "official mtLoRA"),
                "placement": where or "ffn"}

    return _import(model_or_handle, source, kind="official", config=config, dtype=dtype,
                   attach_kwargs=kwargs)


__all__ = ["save_adapters", "load_adapters", "read_safetensors", "import_hydralora",
           "import_official", "hydralora_config", "official_config", "AdapterLoadError",
           "WEIGHTS_NAME", "CONFIG_NAME"]
