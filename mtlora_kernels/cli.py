"""The ``mtlora-kernels`` command line: ``bench``, ``info``, ``kernels``, ``params``.

A subcommand is one function taking the parsed arguments and returning an exit code, plus a
function adding its arguments; :func:`subcommand` registers the pair.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from mtlora_kernels._checks import as_int
from mtlora_kernels.integrations.hf import sub_config_name

_COMMANDS: list[tuple[str, str, Callable[[argparse.ArgumentParser], None],
                      Callable[[argparse.Namespace], int]]] = []


def subcommand(name: str, help: str,
               arguments: Callable[[argparse.ArgumentParser], None] = lambda p: None):
    """Register ``fn(args) -> exit code`` as subcommand ``name``; ``arguments`` adds its flags."""
    def deco(fn: Callable[[argparse.Namespace], int]):
        _COMMANDS.append((name, help, arguments, fn))
        return fn
    return deco


def _console():
    from rich.console import Console

    # rich wraps at 80 columns when writing to a file or pipe; the bench table needs ~120
    return Console() if sys.stdout.isatty() else Console(width=160)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _ints(text: str) -> list[int]:
    try:
        return list(dict.fromkeys(_positive(v) for v in _names(text)))  # "16,016" is one
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got "
                                         f"{text!r}") from None


def _names(text: str) -> list[str]:
    """The comma-separated values, each once (a repeat was timed twice under one label)."""
    names = list(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
    if not names:  # `--tokens ,` ran an empty sweep and exited 0
        raise argparse.ArgumentTypeError(f"expected at least one comma-separated value, got "
                                         f"{text!r}")
    return names


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:  # inf timed forever; nan and negatives timed once, silently
        raise argparse.ArgumentTypeError(f"expected a positive finite number of seconds, got "
                                         f"{text!r}")
    return value


# --------------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------------

# Default sweeps. The CPU one stays small (2 cores: the HydraLoRA loop alone takes ~1.4 s per
# forward+backward at T = 2048); --quick is one shape per token count (N = 16, g = 2).
_SWEEPS = {
    "cpu": dict(tokens=[512, 2048], experts=[8, 16], groups=[1, 2], rank=[16], dtype=["fp32"],
                min_time=1.0),
    "cuda": dict(tokens=[2048, 8192], experts=[8, 16, 32], groups=[1, 2, 8], rank=[16],
                 dtype=["bf16"], min_time=0.5),
}
_QUICK = {
    "cpu": dict(tokens=[512, 2048], experts=[16], groups=[2], rank=[16], dtype=["fp32"],
                min_time=0.3),
    "cuda": dict(tokens=[8192], experts=[16], groups=[2], rank=[16], dtype=["bf16"],
                 min_time=0.2),
}


def _preset_help(key: str) -> str:
    """``key``'s defaults for --help, from the sweeps (--help did not say what a plain run
    sweeps): "default 512,2048 on a CPU, 2048,8192 on a GPU; --quick: 512,2048 / 8192"."""
    def text(device: str, sweeps: dict) -> str:
        v = sweeps[device][key]
        return ",".join(map(str, v)) if isinstance(v, list) else f"{v:g}"

    return (f"default {text('cpu', _SWEEPS)} on a CPU, {text('cuda', _SWEEPS)} on a GPU; "
            f"--quick: {text('cpu', _QUICK)} / {text('cuda', _QUICK)}")


def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=_ints,
                   help=f"T values, comma-separated ({_preset_help('tokens')})")
    p.add_argument("--experts", type=_ints, help=f"N values ({_preset_help('experts')})")
    p.add_argument("--groups", type=_ints,
                   help=f"g values, routing groups ({_preset_help('groups')})")
    p.add_argument("--rank", type=_ints, help=f"r values ({_preset_help('rank')})")
    p.add_argument("--dtype", type=_names,
                   help=f"fp32, bf16, fp16, fp64 ({_preset_help('dtype')})")
    p.add_argument("--hidden", type=_positive, default=4096, help="d_in (default 4096, LLaMA-2-7B)")
    p.add_argument("--d-out", type=_positive, help="d_out (default: = --hidden, block-level)")
    p.add_argument("--alpha", type=float, default=64.0, help="s = alpha / r, nonzero (default 64)")
    p.add_argument("--dropout", type=float, default=0.0,
                   help="dropout while timing (default 0; the correctness check always runs "
                        "without it)")
    p.add_argument("--min-time", type=_seconds, help="seconds of timing per provider and pass, "
                   f"on average, and at least 3 timings each ({_preset_help('min_time')})")
    p.add_argument("--providers", type=_names,
                   help="only these, e.g. hydralora-loop,mtlora-torch (default: all available)")
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda if available)")
    p.add_argument("--threads", type=_positive,
                   help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--out", type=Path, default=Path("bench_out"),
                   help="directory for bench.json and bench.png, which a run replaces "
                        "(default ./bench_out)")
    p.add_argument("--quick", action="store_true",
                   help="one small sweep (about a minute on a 2-core CPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


@subcommand("bench", "time the layer: HydraLoRA loop vs eager PyTorch vs our backends",
            _bench_args)
def _bench(args: argparse.Namespace) -> int:
    from mtlora_kernels import bench

    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as exc:
        print(f"mtlora-kernels bench: --device {args.device!r}: {exc}", file=sys.stderr)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"mtlora-kernels bench: --device {args.device}, but torch sees no CUDA GPU here",
              file=sys.stderr)
        return 2
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        print(f"mtlora-kernels bench: --device {args.device}, but torch sees "
              f"{torch.cuda.device_count()} CUDA GPU(s)", file=sys.stderr)
        return 2
    if device.type not in ("cuda", "cpu"):
        print(f"mtlora-kernels bench: --device must be cuda or cpu, got {args.device!r}",
              file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = (_QUICK if args.quick else _SWEEPS)["cuda" if device.type == "cuda" else "cpu"]
    pick = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in preset.items()}
    try:
        shapes = bench.sweep(pick["tokens"], pick["experts"], pick["groups"], pick["rank"],
                             pick["dtype"], d_in=args.hidden, d_out=args.d_out, alpha=args.alpha,
                             dropout=args.dropout)
    except ValueError as exc:
        print(f"mtlora-kernels bench: {exc}", file=sys.stderr)
        return 2
    providers, missing = bench.default_providers(
        device, interpreted="mtlora-triton" in (args.providers or ()))
    if args.providers:
        unknown = set(args.providers) - {p.name for p in providers} - set(missing)
        if unknown:
            print(f"mtlora-kernels bench: unknown providers {sorted(unknown)}; known: "
                  f"{[p.name for p in providers] + list(missing)}", file=sys.stderr)
            return 2
        providers = [p for p in providers if p.name in args.providers]
        if not providers:
            reasons = "; ".join(f"{n}: {missing[n]}" for n in args.providers)
            print(f"mtlora-kernels bench: none of the requested providers can run here "
                  f"({reasons})", file=sys.stderr)
            return 2
    try:  # before the sweep, which a bad --out would otherwise throw away at the end
        if args.out.exists() and not args.out.is_dir():  # mkdir's word for it: "File exists"
            raise NotADirectoryError("it exists and is not a directory")
        args.out.mkdir(parents=True, exist_ok=True)
        for name in ("bench.json", "bench.png"):
            if (args.out / name).is_dir():
                raise IsADirectoryError(f"{args.out / name} is a directory")
        tempfile.TemporaryFile(dir=args.out).close()  # writable (os.access trusts root)
    except OSError as exc:
        print(f"mtlora-kernels bench: --out {args.out}: {exc}", file=sys.stderr)
        return 2
    con = _console()
    for name, why in missing.items():
        con.print(f"[dim]{name} not benchmarked: {why}[/]")
    meta = bench.machine(device)
    records = bench.run(shapes, providers, device, pick["min_time"],
                        progress=not args.no_progress)
    meta["load_avg_1m_end"] = bench.machine(device)["load_avg_1m"]
    con.print(bench.table(records, on_gpu=device.type == "cuda"))
    # A previous run's files are replaced, and the line below says so (they went silently).
    verb = "replaced" if (args.out / "bench.json").exists() else "wrote"
    bench.write_json(records, meta, args.out / "bench.json")
    bench.plot(records, args.out / "bench.png", meta)
    con.print(f"{verb} {args.out / 'bench.json'} and {args.out / 'bench.png'} "
              f"({meta['device']}, {bench.threads(meta['threads'])}, 1-min load average "
              f"{meta['load_avg_1m']} before, {meta['load_avg_1m_end']} after)")
    failed = [r for r in records if r["status"] != "ok"]
    for r in failed:
        con.print(f"[red]{r['provider']} {r['status']} at {r['label']}: {r['reason']}[/]")
    return 1 if failed else 0


# --------------------------------------------------------------------------------------------
# info
# --------------------------------------------------------------------------------------------


@subcommand("info", "versions, device, available backends and CUDA build metadata")
def _info(args: argparse.Namespace) -> int:
    import mtlora_kernels
    from mtlora_kernels import backends, bench

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    con = _console()
    rows = {
        "mtlora-kernels": mtlora_kernels.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        # The integrations' libraries, read from their metadata (importing transformers is slow).
        **{name: backends._installed_version(name) or "not installed"
           for name in ("transformers", "accelerate")},
        "torch CUDA": torch.version.cuda or "none (CPU build)",
        "device": (torch.cuda.get_device_name(0) if torch.cuda.is_available()
                   else f"cpu ({bench.cpu_name()}, "
                        f"{bench.threads(torch.get_num_threads())}; no CUDA GPU)"),
    }
    for k, v in rows.items():
        con.print(f"[bold]{k:>15}[/]  {v}")
    con.print("[bold]backends[/]")
    states = backends.report()
    for name, state in states.items():
        style = "green" if state == "available" else "yellow"
        con.print(f"  {name:>8}  [{style}]{state}[/]")
    if states["cuda"] == "available":
        n = backends._cuda_extension()[0].forward_max_cluster(0)
        con.print("  cuda forward on device 0: " + (
            f"thread-block clusters of up to {n} (MTLORA_CUDA_CLUSTERS=0 turns them off)"
            if n > 1 else "no thread-block clusters (they need an sm_90+ GPU and device code "
                          "built for it; or MTLORA_CUDA_CLUSTERS=0 is set)"))
    con.print("[bold]CUDA build[/]  "
              + json.dumps(mtlora_kernels.build_info(), indent=2, default=str))
    return 0


# --------------------------------------------------------------------------------------------
# params
# --------------------------------------------------------------------------------------------


def _params_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path,
                   help="a Hugging Face config.json (or its directory); fields below override it")
    p.add_argument("--hidden-size", type=_positive, help="d (default 4096, LLaMA-2-7B)")
    p.add_argument("--layers", type=_positive, help="num_hidden_layers (default 32)")
    p.add_argument("--heads", type=_positive, help="num_attention_heads (default 32)")
    p.add_argument("--kv-heads", type=_positive, help="num_key_value_heads (default = heads)")
    p.add_argument("--head-dim", type=_positive, help="head_dim (default hidden_size / heads)")
    p.add_argument("--rank", type=_positive, default=16, help="r (default 16)")
    p.add_argument("--experts", type=_positive, default=16, help="N (default 16)")
    p.add_argument("--groups", type=_positive, default=2,
                   help="g of the fine-grained rows (default 2)")


#: The names config.json files give the sizes ``params`` reads, the usual first: GPT-2's and
#: GPT-J's ``n_embd`` / ``n_layer`` / ``n_head``, BLOOM's ``n_embed`` (its hub checkpoints';
#: transformers' BloomConfig reads it as hidden_size) / ``n_layer`` / ``n_head``, MPT's
#: ``d_model`` / ``n_layers`` / ``n_heads``, GPT-Neo's ``num_layers`` / ``num_heads``,
#: DistilBERT's ``dim``.
SIZE_KEYS = {"hidden_size": ("hidden_size", "n_embd", "n_embed", "d_model", "dim"),
             "num_hidden_layers": ("num_hidden_layers", "n_layer", "n_layers", "num_layers"),
             "num_attention_heads": ("num_attention_heads", "n_head", "n_heads", "num_heads")}


def model_dims(config: dict | None = None, **fields: int | None) -> dict[str, int]:
    """hidden_size, layers, q_out, v_out from a HF config dict and/or explicit fields (which
    win). A config's sizes go by any of their names in :data:`SIZE_KEYS`; without a config,
    LLaMA-2-7B's values where the fields do not say. TypeError names a size that is not an
    integer (a bool, a string, a float), ValueError one below 1, or a config that names no
    width or no depth (no LLaMA-2-7B default is taken for a model it is not)."""
    cfg = dict(config or {})

    def found(key: str) -> tuple[str, object]:  # (the name it goes by, its value or None)
        return next(((k, cfg[k]) for k in SIZE_KEYS.get(key, (key,)) if cfg.get(k) is not None),
                    (key, None))

    # A multimodal config: its language model's (text_config); a dual encoder's (CLIP's): its
    # vision tower's, whose image classifier is what block-level placement adapts.
    sub = sub_config_name(cfg.get("model_type"))
    if found("hidden_size")[1] is None and isinstance(cfg.get(sub), dict):
        cfg = cfg[sub]

    def size(field: str, key: str) -> int | None:
        """The flag ``field`` if given, else the config's ``key`` (None if neither says)."""
        name, value = (field, fields[field]) if fields.get(field) else found(key)
        return None if value is None else as_int(value, name, minimum=1)

    d = size("hidden_size", "hidden_size")
    layers = size("layers", "num_hidden_layers")
    heads = size("heads", "num_attention_heads")
    kv_heads = size("kv_heads", "num_key_value_heads")
    head_dim = size("head_dim", "head_dim")
    if config:
        missing = [f"{key} (nor {', '.join(SIZE_KEYS[key][1:])})"
                   for key, v in (("hidden_size", d), ("num_hidden_layers", layers)) if v is None]
        if missing:
            raise ValueError(f"the config names no {' and no '.join(missing)}: give the "
                             f"model's size by flag (--hidden-size, --layers)")
    d, layers, heads = d or 4096, layers or 32, heads or 32
    head_dim = head_dim or d // heads
    return {"hidden_size": d, "layers": layers, "q_out": heads * head_dim,
            "v_out": (kv_heads or heads) * head_dim}


def count_params(dims: dict[str, int], rank: int, experts: int, groups: int
                 ) -> list[tuple[str, int, int]]:
    """``(placement, counted, formula)`` adapter parameters of a whole model.

    ``counted`` sums ``numel`` of the modules built for every layer on the meta device (no
    memory); ``formula`` is the closed form (block: d*r + N*r*d + d*N*g per adapter; HydraLoRA
    on a linear d_in -> d_out: r*d_in + N*d_out*r + N*d_in).
    """
    from mtlora_kernels.compat.hydralora import HydraLoRALayer
    from mtlora_kernels.nn import MTLoRAAdapter, MTLoRAConfig

    d, L, r, n = dims["hidden_size"], dims["layers"], rank, experts

    def block(g: int) -> nn.Module:
        return MTLoRAAdapter(d, d, MTLoRAConfig(r=r, num_experts=n, groups=g))

    def hydra(d_out: int) -> nn.Module:
        return HydraLoRALayer(d, d_out, r, n)

    def block_formula(g: int) -> int:
        return d * r + n * r * d + (d * n * g if n > 1 else 0)  # N = 1 has no router

    def hydra_formula(d_out: int) -> int:
        return r * d + n * d_out * r + n * d

    rows = [
        ("HydraLoRA on W_q + W_v (component)",
         lambda: [hydra(dims["q_out"]), hydra(dims["v_out"])],
         hydra_formula(dims["q_out"]) + hydra_formula(dims["v_out"])),
        ("mtLoRA block FFN, g=1", lambda: [block(1)], block_formula(1)),
        (f"mtLoRA block FFN, g={groups}", lambda: [block(groups)], block_formula(groups)),
        (f"mtLoRA block attention, g={groups}", lambda: [block(groups)], block_formula(groups)),
        (f"mtLoRA block FFN + attention, g={groups}", lambda: [block(groups), block(groups)],
         2 * block_formula(groups)),
    ]
    out = []
    with torch.device("meta"):
        for name, build, per_layer in rows:
            model = nn.ModuleList(nn.ModuleList(build()) for _ in range(L))
            out.append((name, sum(p.numel() for p in model.parameters()), L * per_layer))
    return out


@subcommand("params", "adapter parameter count of a model by placement (no weights needed)",
            _params_args)
def _params(args: argparse.Namespace) -> int:
    from rich.table import Table

    config = None
    if args.config is not None:
        path = args.config / "config.json" if args.config.is_dir() else args.config
        try:
            config = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            print(f"mtlora-kernels params: cannot read --config {path}: {exc}", file=sys.stderr)
            return 2
        if not isinstance(config, dict):
            print(f"mtlora-kernels params: --config {path} holds a JSON "
                  f"{type(config).__name__}, not a model config (an object)", file=sys.stderr)
            return 2
    try:
        dims = model_dims(config, hidden_size=args.hidden_size, layers=args.layers,
                          heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim)
    except (TypeError, ValueError) as exc:  # a config.json's "4096" (TypeError) included
        print(f"mtlora-kernels params: {exc} (from --config or the flags)", file=sys.stderr)
        return 2
    if dims["hidden_size"] % args.groups:
        print(f"mtlora-kernels params: --groups {args.groups} must divide hidden_size "
              f"{dims['hidden_size']}", file=sys.stderr)
        return 2
    rows = count_params(dims, args.rank, args.experts, args.groups)
    t = Table(title=f"adapter parameters: d={dims['hidden_size']}, {dims['layers']} layers, "
                    f"W_q out {dims['q_out']}, W_v out {dims['v_out']}, r={args.rank}, "
                    f"N={args.experts}")
    for col in ("placement", "parameters", "exact", "per layer"):
        t.add_column(col, justify="left" if col == "placement" else "right")
    for name, counted, formula in rows:
        if counted != formula:  # the modules and the closed form must tell the same story
            print(f"mtlora-kernels params: {name}: the modules hold {counted:,} parameters but "
                  f"the formula gives {formula:,}", file=sys.stderr)
            return 1
        t.add_row(name, f"{counted / 1e6:.1f}M", f"{counted:,}", f"{counted // dims['layers']:,}")
    _console().print(t)
    return 0


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


def _kernels_args(p: argparse.ArgumentParser) -> None:
    from mtlora_kernels import kernel_report

    kernel_report.add_arguments(p)


@subcommand("kernels", "compile every kernel for sm_80 and sm_90 (no GPU needed): registers, "
            "spills, shared memory, tensor-core instructions, roofline", _kernels_args)
def _kernels(args: argparse.Namespace) -> int:
    from mtlora_kernels import kernel_report

    return kernel_report.run(args)


# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtlora-kernels",
                                     description="Fused multi-task LoRA (mtLoRA) kernels: tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text, arguments, fn in _COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        arguments(p)
        p.set_defaults(func=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
