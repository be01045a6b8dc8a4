"""The layer microbenchmark behind ``mtlora-kernels bench``: HydraLoRA vs eager PyTorch vs ours.

For every shape of a sweep, every provider (HydraLoRA's published loop, the best eager
formulation, each available backend of the fused op) is first checked against one fp64
reference on the same inputs, output and every gradient; a provider that disagrees is refused
and not timed. The others are timed (median of repeated calls, forward under no_grad and
forward+backward w.r.t. x and every adapter weight; bench.json adds the quartiles and the
number of timings) and their peak extra memory is measured.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` above what was allocated before the
call. On the CPU the profiler's allocation events (``profile_memory=True``) give the running
total of the CPU allocator during the call; its maximum is the peak. tracemalloc cannot do this:
it saw 80 bytes for a freshly allocated 16 MB tensor (torch allocates outside Python's heap).
Buffers that oneDNN/MKL allocate privately are not seen by either counter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from mtlora_kernels import backends
from mtlora_kernels.compat.hydralora import HydraLoRALayer, hydralora_eager
from mtlora_kernels.nn import MTLoRAAdapter, MTLoRAConfig
from mtlora_kernels.reference import mix_reference

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "fp64": torch.float64}

# Relative error (||out - ref|| / ||ref||, per output and per gradient) a provider may show
# against the fp64 reference before it is refused. Looser than the unit-test table because the
# benchmark reduces over d_in = 4096 and N*r = 256 terms, and because HydraLoRA rounds pi to the
# input dtype (and takes its softmax in fp32 even for fp64 inputs: 3e-8 off at fp64); this
# guards against wrong providers, it is not a precision test.
CHECK_TOL = {torch.float64: 1e-6, torch.float32: 1e-4, torch.float16: 1e-2,
             torch.bfloat16: 5e-2}

# Peak HBM bandwidth (B/s) and dense tensor-core throughput (FLOP/s: bf16 / fp16, and TF32) from
# the vendor data sheets, for the roofline fraction. Matched on the device name as CUDA reports
# it ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA A100-SXM4-40GB", ...): the first
# entry whose every word is a word of the name (split at spaces and hyphens: a GH200 is not an
# H200), so the specific variants come before their family.
GPU_PEAKS = (
    (("H200", "NVL"), 4.8e12, 835e12, 418e12),
    (("H200",), 4.8e12, 989e12, 494e12),
    (("H100", "PCIe"), 2.0e12, 756e12, 378e12),
    (("H100", "NVL"), 3.9e12, 835e12, 418e12),
    (("H100",), 3.35e12, 989e12, 494e12),  # SXM
    (("A100", "40GB"), 1.555e12, 312e12, 156e12),
    (("A100", "80GB", "PCIe"), 1.935e12, 312e12, 156e12),
    (("A100",), 2.039e12, 312e12, 156e12),  # SXM4 80GB
)


@dataclass(frozen=True)
class Shape:
    """One point of the sweep (block-level by default: d_in = d_out)."""

    tokens: int
    d_in: int = 4096
    d_out: int = 4096
    rank: int = 16
    experts: int = 16
    groups: int = 2
    alpha: float = 64.0
    dtype: str = "fp32"
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.d_out % self.groups:
            raise ValueError(f"groups={self.groups} must divide d_out={self.d_out}")
        if min(self.tokens, self.d_in, self.d_out, self.rank, self.experts) < 1:
            raise ValueError(f"every size must be >= 1, got {self}")
        if not math.isfinite(self.alpha) or self.alpha == 0:
            # alpha = 0: every output and gradient is zero, and so is the reference: the check
            # before timing would pass any provider.
            raise ValueError(f"alpha must be finite and nonzero, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def label(self) -> str:
        """The shape's sizes and dtype, then alpha and dropout where they are not the defaults'
        (two shapes with the same label measure the same thing)."""
        extra = "".join([f" alpha={self.alpha:g}" if self.alpha != Shape.alpha else "",
                         f" dropout={self.dropout:g}" if self.dropout else ""])
        return (f"T={self.tokens} d={self.d_in}x{self.d_out} r={self.rank} N={self.experts} "
                f"g={self.groups} {self.dtype}{extra}")

    def flops(self, backward: bool) -> float:
        """~2*T*(d_in*r + d_in*g*N + N*r*d_out) for the forward; the backward does ~2x that."""
        fwd = 2.0 * self.tokens * (self.d_in * self.rank + self.d_in * self.groups * self.experts
                                   + self.experts * self.rank * self.d_out)
        return 3.0 * fwd if backward else fwd

    def bytes_moved(self, backward: bool) -> float:
        """The floor of SPEC section 3: x in + y out + weights (forward); the backward adds dy
        in, x in again, dx out and the weight gradients."""
        elt = torch.empty((), dtype=self.torch_dtype).element_size()
        params = (self.rank * self.d_in + self.experts * self.d_out * self.rank
                  + self.groups * self.experts * self.d_in)
        if backward:
            return elt * (3 * self.tokens * self.d_in + 2 * self.tokens * self.d_out + 2 * params)
        return elt * (self.tokens * self.d_in + self.tokens * self.d_out + params)


@dataclass
class Weights:
    """The adapter's weights in mtLoRA's layout, shared by every provider of one shape."""

    A: Tensor  # [r, d_in]
    B: Tensor  # [N, d_out, r]
    route: Tensor  # [g*N, d_in]


class Runner(nn.Module):
    """What a provider builds: ``forward(x) -> y`` plus its gradients in mtLoRA's layout."""

    def grads(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        raise NotImplementedError


@dataclass(frozen=True)
class Provider:
    """A named way of computing the layer: ``make(weights, shape)`` returns a :class:`Runner`
    holding its own copy of the weights (as trainable parameters)."""

    name: str
    make: Callable[[Weights, Shape], Runner]


class _LoopRunner(Runner):
    def __init__(self, w: Weights, s: Shape) -> None:
        super().__init__()
        self.layer = HydraLoRALayer(s.d_in, s.d_out, s.rank, s.experts, s.alpha, s.dropout,
                                    groups=s.groups).to(w.A)
        self.layer.load_stacked(w.A, w.B, w.route)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)

    def grads(self):
        lay = self.layer
        gb = [lay.expert(i).weight.grad for i in range(lay.num_experts)]
        return (lay.lora_A.weight.grad, None if gb[0] is None else torch.stack(gb),
                lay.lora_route.weight.grad)


class _EagerRunner(Runner):
    def __init__(self, w: Weights, s: Shape) -> None:
        super().__init__()
        self.shape = s
        self.A, self.B, self.route = (nn.Parameter(t.clone()) for t in (w.A, w.B, w.route))

    def forward(self, x: Tensor) -> Tensor:
        s = self.shape
        return hydralora_eager(x, self.A, self.B, self.route, groups=s.groups, scaling=s.scaling,
                               dropout_p=s.dropout, training=self.training)

    def grads(self):
        return self.A.grad, self.B.grad, self.route.grad


class _OursRunner(Runner):
    def __init__(self, w: Weights, s: Shape, backend: str) -> None:
        super().__init__()
        cfg = MTLoRAConfig(r=s.rank, num_experts=s.experts, groups=s.groups, alpha=s.alpha,
                           dropout=s.dropout, backend=backend)
        self.adapter = MTLoRAAdapter(s.d_in, s.d_out, cfg).to(w.A)
        with torch.no_grad():
            self.adapter.lora_A.copy_(w.A)
            self.adapter.lora_B.copy_(w.B)
            if self.adapter.lora_route is not None:
                self.adapter.lora_route.copy_(w.route)

    def forward(self, x: Tensor) -> Tensor:
        return self.adapter(x)

    def grads(self):
        a = self.adapter
        return a.lora_A.grad, a.lora_B.grad, None if a.lora_route is None else a.lora_route.grad


def default_providers(device: torch.device, interpreted: bool = False
                      ) -> tuple[list[Provider], dict[str, str]]:
    """The HydraLoRA loop, the eager formulation and every backend of ours available on
    ``device``; plus ``{provider: why it is not there}`` for the others. Triton kernels run by
    the interpreter on CPU tensors (TRITON_INTERPRET=1) count only with ``interpreted``: they
    are a correctness tool (a 2048x512x4096 GEMM took 109 s), not a path worth timing."""
    providers = [Provider("hydralora-loop", _LoopRunner), Provider("torch-eager", _EagerRunner)]
    missing = {}
    for name in ("torch", "triton", "cuda"):
        ok, why = backends.available(name, device)
        if ok and name == "triton" and device.type == "cpu" and not interpreted:
            ok, why = False, ("runs in Triton's interpreter on the CPU (TRITON_INTERPRET=1); "
                              "name it in --providers to include it anyway")
        if ok:
            providers.append(Provider(f"mtlora-{name}",
                                      lambda w, s, b=name: _OursRunner(w, s, b)))
        else:
            missing[f"mtlora-{name}"] = why
    return providers, missing


# --------------------------------------------------------------------------------------------
# Inputs, the reference and the check.
# --------------------------------------------------------------------------------------------


def make_inputs(s: Shape, device: torch.device, seed: int = 0) -> tuple[Weights, Tensor, Tensor]:
    """Random weights (every B nonzero, routing far from uniform), x [T, d_in], dy [T, d_out]."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    dt = s.torch_dtype

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dt)

    w = Weights(A=rnd(s.rank, s.d_in, scale=s.d_in ** -0.5),
                B=rnd(s.experts, s.d_out, s.rank, scale=s.rank ** -0.5),
                route=rnd(s.groups * s.experts, s.d_in, scale=2.0 * s.d_in ** -0.5))
    return w, rnd(s.tokens, s.d_in), rnd(s.tokens, s.d_out)


def reference(w: Weights, x: Tensor, dy: Tensor, s: Shape, chunk: int = 1024
              ) -> dict[str, Tensor]:
    """The fp64 oracle (mix_reference, no dropout): y and the gradients of x, A, B, route.

    Tokens are independent, so it runs ``chunk`` tokens at a time (the weight gradients add
    up over chunks): its autograd graph keeps ~2N fp64 [T, d_out] tensors, 17 GB at T = 8192,
    N = 32 in one piece.
    """
    weights = {k: t.detach().double().requires_grad_() for k, t in
               (("A", w.A), ("B", w.B), ("route", w.route))}
    ys, dxs = [], []
    for xs, dys in zip(x.split(chunk), dy.split(chunk)):
        xl = xs.detach().double().requires_grad_()
        y = mix_reference(xl, weights["A"], weights["B"], weights["route"], groups=s.groups,
                          scaling=s.scaling)
        y.backward(dys.double())
        ys.append(y.detach())
        dxs.append(xl.grad)
    return {"y": torch.cat(ys), "dx": torch.cat(dxs),
            **{f"d{k}": t.grad for k, t in weights.items()}}


def _rel_err(out: Tensor | None, ref: Tensor) -> float:
    if out is None:  # no gradient at all: right only if the reference's is zero (N = 1 router)
        return 0.0 if not ref.any() else math.inf
    out = out.detach().double()
    if out.shape != ref.shape or not torch.isfinite(out).all():
        return math.inf
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def check(runner: Runner, x: Tensor, dy: Tensor, ref: dict[str, Tensor], s: Shape
          ) -> dict[str, float]:
    """Relative error of y and of every gradient against ``ref`` (dropout off: eval mode)."""
    runner.eval()
    xi = x.detach().clone().requires_grad_()
    y = runner(xi)
    y.backward(dy)
    dA, dB, dR = runner.grads()
    runner.zero_grad(set_to_none=True)
    runner.train()
    got = {"y": y, "dx": xi.grad, "dA": dA, "dB": dB, "droute": dR}
    return {k: _rel_err(v, ref[k]) for k, v in got.items()}


# --------------------------------------------------------------------------------------------
# Timing and memory.
# --------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_in_turns(fns: list[Callable[[], object]], device: torch.device, min_time: float,
                  min_reps: int = 3) -> list[dict]:
    """Wall time per call of each of ``fns``, timed in turns: round after round, one block of
    each, for at least ``min_reps`` rounds and ``min_time`` seconds per function on average.
    Per function: ``median_ms``, the quartiles ``q1_ms`` and ``q3_ms`` of the blocks' times per
    call (how much the load moved them; ``min_reps`` >= 2), ``reps`` (blocks timed) and
    ``calls_per_rep``.

    Taking turns puts every provider under the same background load: on a shared 2-core
    machine the load drifts by 2-3x within a minute, which timing one provider after the
    other turned into speed-ups that moved by as much. A block repeats a function until it
    lasts ~1 ms, so that on a GPU the synchronisation at its end is amortised over many
    launches; on the CPU the layer is slower than that and a block is one call.
    """
    numbers = []
    for fn in fns:
        fn()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        numbers.append(min(1000, max(1, int(1e-3 / max(time.perf_counter() - t0, 1e-7)))))
    times: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()
    while len(times[0]) < min_reps or time.perf_counter() - start < min_time * len(fns):
        for fn, number, ts in zip(fns, numbers, times):
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            _sync(device)
            ts.append((time.perf_counter() - t0) / number)
    out = []
    for ts, number in zip(times, numbers):
        q1, med, q3 = statistics.quantiles(ts, n=4, method="inclusive")  # med: the median
        out.append({"median_ms": med * 1e3, "q1_ms": q1 * 1e3, "q3_ms": q3 * 1e3,
                    "reps": len(ts), "calls_per_rep": number})
    return out


@contextlib.contextmanager
def _stderr_to_devnull():
    """Silence file descriptor 2: kineto prints start/stop lines and, on a CUDA build of torch
    without a GPU, an ERROR about the device count, straight from C++ on every profile."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_bytes(fn: Callable[[], object]) -> int | None:
    """Peak of the CPU allocator's running total during ``fn`` (profiler allocation events)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        from torch._C._profiler import _EventType
    except ImportError:  # pragma: no cover - private API; report "n/a" rather than guess
        return None
    with _stderr_to_devnull(), profile(activities=[ProfilerActivity.CPU],
                                       profile_memory=True) as prof:
        fn()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            events.append((e.start_time_ns, e.extra_fields.alloc_size))
        stack.extend(e.children)
    running = peak = 0
    for _, size in sorted(events):
        running += size
        peak = max(peak, running)
    return peak


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak memory allocated by ``fn`` beyond what was live before it (see module doc)."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    return _cpu_peak_bytes(fn)


# --------------------------------------------------------------------------------------------
# The run.
# --------------------------------------------------------------------------------------------

PASSES = ("fwd", "fwd+bwd")


def gpu_peaks(gpu_name: str, dtype: str) -> tuple[float, float] | None:
    """(bytes/s, FLOP/s) that bound a ``dtype`` run on the GPU named ``gpu_name``, or None for a
    GPU not in GPU_PEAKS. fp32 is bound by TF32 / 3: the fastest near-fp32 tensor-core product
    is three TF32 products (tf32x3, about 22 bits: what the Triton kernels use, but for the fp32
    forward's router logits, which run on the FMA units as torch's fp32 matmul and the CUDA
    kernels' fp32 tiles do)."""
    name_words = set(re.split(r"[\s-]+", gpu_name))
    for words, bw, half, tf32 in GPU_PEAKS:
        if name_words.issuperset(words):
            return {"bf16": (bw, half), "fp16": (bw, half), "fp32": (bw, tf32 / 3)}.get(dtype)
    return None


def bench_shape(s: Shape, providers: list[Provider], device: torch.device, min_time: float,
                advance: Callable[[str], None] = lambda _: None) -> list[dict]:
    """Check every provider, then time (in turns) and measure the memory of those that agree;
    one record per provider (all of them "error" when the shape's inputs cannot be made)."""
    records = [{"shape": dataclasses.asdict(s), "label": s.label(), "provider": p.name}
               for p in providers]
    advance(f"inputs and fp64 reference {s.label()}")
    try:
        w, x, dy = make_inputs(s, device)
        ref = reference(w, x, dy, s)
    except (RuntimeError, MemoryError) as exc:  # out of memory, most likely: the next shape
        for rec in records:
            rec.update(status="error", reason=f"inputs or reference: {type(exc).__name__}: "
                                              f"{str(exc).splitlines()[0]}")
        return records
    tol = CHECK_TOL[s.torch_dtype]
    runners = []
    for p, rec in zip(providers, records):
        advance(f"checking {p.name} {s.label()}")
        try:
            runner = p.make(w, s)
            errs = check(runner, x, dy, ref, s)
        except Exception as exc:  # a provider that cannot run this shape is reported, not timed
            rec.update(status="error", reason=f"{type(exc).__name__}: {exc}")
            continue
        rec["rel_err"] = errs
        bad = {k: v for k, v in errs.items() if not v <= tol}
        if bad:
            rec.update(status="refused", reason="disagrees with the fp64 reference: " + ", ".join(
                f"{k} rel. err {v:.3g} > {tol:g}" for k, v in bad.items()))
            continue
        rec["status"] = "ok"
        runners.append((rec, runner))
    if not runners:
        return records
    xg = x.detach().clone().requires_grad_()

    def drop_grads(runner):
        xg.grad = None
        runner.zero_grad(set_to_none=True)

    def fwd(runner):
        with torch.no_grad():
            return runner(x)

    def fwd_bwd(runner):
        drop_grads(runner)
        runner(xg).backward(dy)

    peaks = None if device.type != "cuda" else gpu_peaks(torch.cuda.get_device_name(device),
                                                          s.dtype)
    for name, body in zip(PASSES, (fwd, fwd_bwd)):
        advance(f"timing {name} {s.label()}")
        fns = [functools.partial(body, runner) for _, runner in runners]
        timings = time_in_turns(fns, device, min_time)
        back = name != "fwd"
        for (rec, runner), fn, t in zip(runners, fns, timings):
            drop_grads(runner)  # so that the last call's gradients are not counted as live
            sec = t["median_ms"] / 1e3
            rec[name] = {**t, "peak_bytes": peak_bytes(fn, device),
                         "GBps": s.bytes_moved(back) / sec / 1e9,
                         "TFLOPs": s.flops(back) / sec / 1e12}
            if peaks is not None:
                floor = max(s.bytes_moved(back) / peaks[0], s.flops(back) / peaks[1])
                rec[name]["roofline"] = floor / sec
    base = next((r for r, _ in runners if r["provider"] == "hydralora-loop"), None)
    for rec, _ in runners:
        for name in PASSES:
            if base is not None:
                rec[name]["speedup"] = base[name]["median_ms"] / rec[name]["median_ms"]
    return records


def sweep(tokens, experts, groups, ranks, dtypes, d_in: int = 4096, d_out: int | None = None,
          alpha: float = 64.0, dropout: float = 0.0) -> list[Shape]:
    """The cartesian product of the given sizes, as shapes."""
    return [Shape(tokens=t, d_in=d_in, d_out=d_in if d_out is None else d_out, rank=r,
                  experts=n, groups=g, alpha=alpha, dtype=dt, dropout=dropout)
            for dt, r, g, n, t in itertools.product(dtypes, ranks, groups, experts, tokens)]


def run(shapes: list[Shape], providers: list[Provider], device: torch.device, min_time: float,
        progress: bool = True) -> list[dict]:
    """Every shape x provider, with a progress bar (rich) when ``progress``."""
    from rich.console import Console
    from rich.progress import Progress

    records: list[dict] = []
    # On stderr: stdout carries the table, and a transient bar left a blank line there.
    with Progress(console=Console(stderr=True), disable=not progress, transient=True) as bar:
        task = bar.add_task("bench", total=len(shapes))
        for s in shapes:
            def advance(what: str) -> None:
                bar.update(task, description=what)
            records += bench_shape(s, providers, device, min_time, advance)
            bar.update(task, advance=1)
    return records


_CPUINFO = Path("/proc/cpuinfo")


def cpu_name() -> str:
    """The CPU's model name ("AMD EPYC", "Intel(R) Xeon(R) Platinum 8480+") from /proc/cpuinfo;
    where that has none (not Linux, an ARM kernel), what :mod:`platform` says. On Linux
    ``platform.processor()`` is "" or "x86_64": bench.json and the plot's title named no machine,
    and runs on an Intel Xeon and an AMD EPYC read the same."""
    try:
        with _CPUINFO.open() as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict:
    """What the numbers were measured on."""
    info = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": cpu_name(), "cpu_count": os.cpu_count(),
            "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        # The roofline's (bytes/s, FLOP/s) per dtype; None: a GPU not in GPU_PEAKS.
        info["roofline_peaks"] = {d: gpu_peaks(info["gpu"], d) for d in ("bf16", "fp16", "fp32")}
    return info


# --------------------------------------------------------------------------------------------
# Output: table, JSON, plot.
# --------------------------------------------------------------------------------------------


def _mib(b: int | None) -> str:
    return "n/a" if b is None else f"{b / 2**20:,.2f}"


def _speedup(x: float | None) -> str:
    """One decimal from 1x up (what a reader compares), two significant digits below it: a
    backend 500x slower than the loop printed as "0.0x"."""
    if x is None:
        return "-"
    return f"{x:.1f}x" if x >= 0.95 else f"{x:.2g}x"


def table(records: list[dict], on_gpu: bool):
    """A rich Table: one row per shape x provider x pass."""
    from rich.table import Table

    t = Table(title="mtLoRA layer vs HydraLoRA (median time; peak = extra memory of the call)")
    for col in ("shape", "provider", "pass", "median ms", "vs HydraLoRA", "peak MiB"):
        t.add_column(col, justify="left" if col in ("shape", "provider", "pass") else "right")
    if on_gpu:
        for col in ("GB/s", "TFLOP/s", "% roofline"):
            t.add_column(col, justify="right")
    last = None
    for r in records:
        label = r["label"] if r["label"] != last else ""
        last = r["label"]
        if r["status"] != "ok":  # the reason is printed under the table (cli)
            t.add_row(label, r["provider"], "", f"[red]{r['status']}[/]", "", "")
            continue
        for name in PASSES:
            m = r[name]
            row = [label, r["provider"], name, f"{m['median_ms']:.2f}",
                   _speedup(m.get("speedup")), _mib(m["peak_bytes"])]
            if on_gpu:
                roof = m.get("roofline")
                row += [f"{m['GBps']:.0f}", f"{m['TFLOPs']:.2f}",
                        "n/a" if roof is None else f"{100 * roof:.0f}%"]
            t.add_row(*row)
            label = ""
    return t


def _finite(obj):
    """``obj`` with every non-finite float as None (JSON has no Infinity / NaN: a refused
    provider's rel. err is inf, which strict parsers reject)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(records: list[dict], meta: dict, path: Path) -> None:
    path.write_text(json.dumps(_finite({"machine": meta, "results": records}), indent=2,
                               allow_nan=False))


def _tick(label: str) -> str:
    """A shape label on short lines (about 13 characters): one line ran into the next shape's
    at the figure's ~1.2 inch per shape."""
    words = label.split()
    return "\n".join([words[0], words[1], " ".join(words[2:5]), " ".join(words[5:])])


def threads(n: int) -> str:
    """A count of threads in words: "1 thread", "4 threads"."""
    return f"{n} thread{'' if n == 1 else 's'}"


def machine_label(meta: dict) -> str:
    """One line naming what the numbers were measured on (:func:`machine`'s dict): the GPU, or
    the CPU and its threads; torch's version."""
    where = meta.get("gpu") or f"CPU {meta['cpu']}, {threads(meta['threads'])}"
    return f"{where}; torch {meta['torch']}"


def plot(records: list[dict], path: Path, meta: dict) -> None:
    """Median time per shape and provider (log scale), one panel per pass, titled with the
    machine (``meta``: :func:`machine`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogFormatter

    class PlainLog(LogFormatter):
        """Labels the ticks matplotlib's log formatter labels (minor ones too where the axis
        spans under a decade), as plain numbers: "4", "0.3", not "4×10⁰"."""

        def __call__(self, x, pos=None):
            return f"{x:g}" if super().__call__(x, pos) else ""

    ok = [r for r in records if r["status"] == "ok"]
    labels = list(dict.fromkeys(r["label"] for r in records))
    names = list(dict.fromkeys(r["provider"] for r in ok))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(labels) + 4), 4.5), squeeze=False)
    width = 0.8 / max(1, len(names))
    for ax, pas in zip(axes[0], PASSES):
        for k, name in enumerate(names):
            xs, ys = [], []
            for i, lab in enumerate(labels):
                hit = [r for r in ok if r["label"] == lab and r["provider"] == name]
                if hit:
                    xs.append(i + k * width)
                    ys.append(hit[0][pas]["median_ms"])
            ax.bar(xs, ys, width, label=name)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(PlainLog())
        ax.yaxis.set_minor_formatter(PlainLog())
        ax.set_title(pas)
        ax.set_ylabel("median ms (log)")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))])
        ax.set_xticklabels([_tick(lab) for lab in labels], fontsize=7)
    if names:  # else nothing ran: empty panels, and no legend to draw
        axes[0][0].legend(fontsize=8)
    fig.suptitle(machine_label(meta), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
