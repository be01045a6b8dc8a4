"""``mtlora-kernels bench`` / ``info``: providers checked before they are timed, end-to-end run
on tiny sizes, memory measurement, and the command entry points."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from mtlora_kernels import backends, bench
from mtlora_kernels.cli import main

CPU = torch.device("cpu")
TINY = bench.Shape(tokens=9, d_in=32, d_out=32, rank=4, experts=4, groups=2)


class _Scaled(bench.Runner):
    """Our op, but off by 2% in its output (a wrong kernel)."""

    def __init__(self, w, s):
        super().__init__()
        self.inner = bench._EagerRunner(w, s)

    def forward(self, x):
        return 1.02 * self.inner(x)

    def grads(self):
        return self.inner.grads()


class _FrozenRouter(bench._EagerRunner):
    """Right output, but the router gets no gradient (a wrong backward)."""

    def forward(self, x):
        s = self.shape
        return bench.hydralora_eager(x, self.A, self.B, self.route.detach(), groups=s.groups,
                                     scaling=s.scaling)


@pytest.mark.parametrize("groups", [1, 2])
def test_every_provider_agrees_with_the_reference(groups):
    """The check bench_shape runs before timing, on every provider incl. interpreted Triton."""
    shape = dataclasses.replace(TINY, groups=groups)
    w, x, dy = bench.make_inputs(shape, CPU)
    ref = bench.reference(w, x, dy, shape)
    providers, _ = bench.default_providers(CPU, interpreted=True)
    assert {"hydralora-loop", "torch-eager", "mtlora-torch"} <= {p.name for p in providers}
    for p in providers:
        runner = p.make(w, shape)
        errs = bench.check(runner, x, dy, ref, shape)
        assert runner.training  # checked without dropout, timed with it (--dropout)
        assert set(errs) == {"y", "dx", "dA", "dB", "droute"}
        assert max(errs.values()) <= bench.CHECK_TOL[torch.float32], (p.name, errs)


def test_interpreted_triton_is_a_provider_only_when_asked_for(monkeypatch):
    """On the CPU the triton backend runs in Triton's interpreter: a provider only with
    ``interpreted`` (the CLI: when --providers names it), else listed with the reason."""
    monkeypatch.setattr(backends, "available", lambda name, device=None: (True, ""))
    providers, missing = bench.default_providers(CPU)
    assert [p.name for p in providers] == ["hydralora-loop", "torch-eager", "mtlora-torch",
                                           "mtlora-cuda"]
    assert list(missing) == ["mtlora-triton"] and "--providers" in missing["mtlora-triton"]
    providers, missing = bench.default_providers(CPU, interpreted=True)
    assert "mtlora-triton" in [p.name for p in providers] and not missing


def test_a_wrong_provider_is_refused_and_not_timed():
    good = [bench.Provider("hydralora-loop", bench._LoopRunner)]
    wrong = [bench.Provider("scaled", _Scaled), bench.Provider("frozen-router", _FrozenRouter)]
    records = {r["provider"]: r for r in bench.bench_shape(TINY, good + wrong, CPU, 0.0)}
    scaled, frozen = records["scaled"], records["frozen-router"]
    assert scaled["status"] == frozen["status"] == "refused"
    assert "fwd" not in scaled and "fwd+bwd" not in frozen
    assert "y rel. err" in scaled["reason"]
    assert "droute rel. err" in frozen["reason"] and "y rel. err" not in frozen["reason"]
    assert records["hydralora-loop"]["status"] == "ok"
    assert records["hydralora-loop"]["fwd+bwd"]["median_ms"] > 0


def test_timings_give_quartiles_and_how_many_there_were(monkeypatch):
    """bench.json says how many timings each median is of, and their quartiles (it held the
    median alone: a median of 3 under a drifting load read like one of 300)."""
    ticks = iter(range(1000))
    clock = {"t": 0.0}

    costs = [0.010] * 4 + [0.001, 0.002, 0.003]

    def slow_then_fast():  # 10 ms per call, then 1, 2, 3 ms: the spread must show
        clock["t"] += costs[next(ticks)]

    with monkeypatch.context() as m:
        m.setattr(bench.time, "perf_counter", lambda: clock["t"])
        (t,) = bench.time_in_turns([slow_then_fast], CPU, min_time=0.0, min_reps=5)
    # 2 untimed calls (warm-up, calibration), then blocks of 1 call: 10, 10, 1, 2, 3 ms
    assert (t["reps"], t["calls_per_rep"]) == (5, 1)
    assert t["median_ms"] == pytest.approx(3.0)
    assert (t["q1_ms"], t["q3_ms"]) == (pytest.approx(2.0), pytest.approx(10.0))
    (rec,) = bench.bench_shape(TINY, [bench.Provider("hydralora-loop", bench._LoopRunner)], CPU,
                               0.0)
    for name in bench.PASSES:
        m = rec[name]
        assert m["reps"] >= 3 and m["calls_per_rep"] >= 1
        assert 0 < m["q1_ms"] <= m["median_ms"] <= m["q3_ms"]


def test_flops_and_bytes_are_those_of_the_layer():
    """Shape.flops is the layer's matmul FLOPs as torch's FlopCounterMode counts them on the
    eager formulation (forward; forward + backward w.r.t. x and every weight), router
    included; bytes_moved reads x and the weights and writes y, and the backward adds dy, x
    again, dx and the weights' gradients."""
    from torch.utils.flop_counter import FlopCounterMode

    s = bench.Shape(tokens=5, d_in=12, d_out=24, rank=4, experts=3, groups=2, dtype="fp64")
    w, x, dy = bench.make_inputs(s, CPU, seed=1)
    runner, xg = bench._EagerRunner(w, s), x.clone().requires_grad_()
    with FlopCounterMode(display=False) as fwd:
        y = runner(xg)
    with FlopCounterMode(display=False) as bwd:
        y.backward(dy)
    assert s.flops(False) == fwd.get_total_flops()
    assert s.flops(True) == fwd.get_total_flops() + bwd.get_total_flops()
    weights = [w.A, w.B, w.route]
    forward = [x, y, *weights]
    assert s.bytes_moved(False) == sum(t.numel() * t.element_size() for t in forward)
    backward = [dy, x, xg.grad, runner.A.grad, runner.B.grad, runner.route.grad]
    assert s.bytes_moved(True) == sum(t.numel() * t.element_size() for t in forward + backward)


def test_speedups_and_rates_come_from_the_medians(monkeypatch):
    """A provider's speed-up is the HydraLoRA loop's median over its own (found by name, not
    position); GB/s, TFLOP/s and the roofline fraction (on a GPU of GPU_PEAKS: the time the
    bytes or the FLOPs take at its peak, whichever is longer, over the median) come from the
    pass's bytes and FLOPs. The GPU is a stand-in: the inputs stay on the CPU."""
    medians = {"fwd": [0.5, 4.0], "fwd+bwd": [3.0, 12.0]}  # eager, loop
    passes = iter(bench.PASSES)

    def fake_timings(fns, device, min_time):
        return [{"median_ms": m, "q1_ms": m, "q3_ms": m, "reps": 3, "calls_per_rep": 1}
                for m in medians[next(passes)]]

    make_inputs = bench.make_inputs
    monkeypatch.setattr(bench, "make_inputs", lambda s, device, seed=0: make_inputs(s, CPU, seed))
    monkeypatch.setattr(bench, "time_in_turns", fake_timings)
    monkeypatch.setattr(bench, "peak_bytes", lambda fn, device: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    providers = [bench.Provider("torch-eager", bench._EagerRunner),
                 bench.Provider("hydralora-loop", bench._LoopRunner)]
    gpu = types.SimpleNamespace(type="cuda")
    eager, loop = bench.bench_shape(TINY, providers, gpu, 0.0)
    assert (eager["fwd"]["speedup"], eager["fwd+bwd"]["speedup"]) == (8.0, 4.0)
    assert loop["fwd"]["speedup"] == loop["fwd+bwd"]["speedup"] == 1.0
    bw, flops = 2.0e12, 378e12 / 3  # H100 PCIe, fp32 (tf32x3)
    for name, back, ms in (("fwd", False, 0.5), ("fwd+bwd", True, 3.0)):
        nbytes, nflops = TINY.bytes_moved(back), TINY.flops(back)
        assert eager[name]["GBps"] == pytest.approx(nbytes / ms / 1e6)
        assert eager[name]["TFLOPs"] == pytest.approx(nflops / ms / 1e9)
        floor_ms = 1e3 * max(nbytes / bw, nflops / flops)
        assert eager[name]["roofline"] == pytest.approx(floor_ms / ms)


def test_an_unrunnable_provider_is_reported():
    def broken(w, s):
        raise RuntimeError("no kernel for this shape")

    (rec,) = bench.bench_shape(TINY, [bench.Provider("broken", broken)], CPU, 0.0)
    assert rec["status"] == "error" and "no kernel for this shape" in rec["reason"]


def test_bench_quick_end_to_end_writes_json_and_png(tmp_path, capsys):
    out = tmp_path / "bo"
    rc = main(["bench", "--quick", "--hidden", "32", "--tokens", "8,17", "--experts", "4",
               "--groups", "1,2", "--rank", "4", "--min-time", "0.005", "--no-progress",
               "--dropout", "0.1", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "hydralora-loop" in text and "mtlora-torch" in text and "vs HydraLoRA" in text
    data = json.loads((out / "bench.json").read_text())
    assert data["machine"]["device"] == "cpu"
    results = data["results"]
    assert len(results) == 4 * 3  # 2 T x 2 g x (loop, eager, mtlora-torch)
    assert {r["shape"]["groups"] for r in results} == {1, 2}
    assert all(r["status"] == "ok" and r["shape"]["dropout"] == 0.1 for r in results)
    loop = [r for r in results if r["provider"] == "hydralora-loop"]
    assert all(r["fwd"]["speedup"] == 1.0 for r in loop)
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {out / 'bench.json'} and {out / 'bench.png'}" in " ".join(text.split())


def test_a_second_run_says_it_replaced_the_first(tmp_path, capsys):
    """A run into an --out that holds a previous run's files replaces them and says so (--help
    says it too); they were overwritten without a word."""
    argv = ["bench", "--hidden", "16", "--tokens", "4", "--experts", "2", "--groups", "1",
            "--rank", "2", "--min-time", "0.001", "--no-progress", "--providers",
            "hydralora-loop", "--out", str(tmp_path)]
    assert main(argv) == 0
    assert f"wrote {tmp_path / 'bench.json'}" in capsys.readouterr().out
    assert main(argv[:2] + ["24"] + argv[3:]) == 0
    text = " ".join(capsys.readouterr().out.split())  # rich wraps at 160 columns
    assert f"replaced {tmp_path / 'bench.json'} and {tmp_path / 'bench.png'}" in text
    (rec,) = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert rec["shape"]["d_in"] == 24  # the second run's
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert "which a run replaces" in " ".join(capsys.readouterr().out.split())


def test_bench_help_gives_every_default(capsys):
    """--help names what a plain run and a --quick run sweep, on a CPU and on a GPU (it gave
    examples, and no default for T, N, g or --min-time)."""
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for defaults in ["512,2048 on a CPU, 2048,8192 on a GPU; --quick: 512,2048 / 8192",  # T
                     "8,16 on a CPU, 8,16,32 on a GPU; --quick: 16 / 16",  # N
                     "1,2 on a CPU, 1,2,8 on a GPU; --quick: 2 / 2",  # g
                     "16 on a CPU, 16 on a GPU; --quick: 16 / 16",  # r
                     "fp32 on a CPU, bf16 on a GPU; --quick: fp32 / bf16",
                     "1 on a CPU, 0.5 on a GPU; --quick: 0.3 / 0.2"]:  # --min-time
        assert f"(default {defaults})" in text
    assert "dropout while timing (default 0;" in text


def test_the_plot_names_the_machine(monkeypatch, tmp_path):
    """The figure's title names what the numbers ran on (it named nothing: a plot copied out of
    bench_out/ lost the machine), a GPU by its name."""
    cpu = bench.machine(CPU)
    assert bench.machine_label(cpu) == (f"CPU {cpu['cpu']}, {bench.threads(cpu['threads'])}; "
                                        f"torch {torch.__version__}")
    assert bench.machine_label(dict(cpu, threads=1)).startswith(f"CPU {cpu['cpu']}, 1 thread;")
    assert bench.machine_label(dict(cpu, threads=4)).startswith(f"CPU {cpu['cpu']}, 4 threads;")
    gpu = dict(cpu, gpu="NVIDIA H100 80GB HBM3")
    assert bench.machine_label(gpu) == f"NVIDIA H100 80GB HBM3; torch {torch.__version__}"
    titles = []
    monkeypatch.setattr("matplotlib.figure.Figure.suptitle",
                        lambda fig, text, **kw: titles.append(text))
    bench.plot([], tmp_path / "bench.png", gpu)
    assert titles == [bench.machine_label(gpu)]


def test_the_plot_labels_its_log_axis_in_plain_numbers(monkeypatch, tmp_path):
    """Tick labels of the log y axis are plain numbers, minor ticks labelled where the times
    span under a decade (matplotlib's default read "4×10⁰"), none where they span more."""
    import matplotlib.figure

    figures = []
    save = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *a, **kw: (figures.append(fig), save(fig, *a, **kw))[1])
    gen = torch.Generator().manual_seed(0)

    def records(*ranges):  # a's fwd, fwd+bwd medians, then b's: drawn in these ranges (ms)
        ms = [lo + (hi - lo) * torch.rand((), generator=gen).item() for lo, hi in ranges]
        return [{"status": "ok", "label": TINY.label(), "provider": name,
                 "fwd": {"median_ms": ms[2 * k]}, "fwd+bwd": {"median_ms": ms[2 * k + 1]}}
                for k, name in enumerate(("a", "b"))]

    def labels(ax, minor):
        lo, hi = ax.get_ylim()
        return [t.get_text() for t, v in zip(ax.yaxis.get_ticklabels(minor=minor),
                                             ax.yaxis.get_ticklocs(minor=minor))
                if lo <= v <= hi and t.get_text()]

    plain = re.compile(r"\d+(\.\d+)?")
    bench.plot(records(*[(2.0, 3.0)] * 2, *[(6.0, 9.0)] * 2), tmp_path / "narrow.png",
               bench.machine(CPU))
    for ax in figures[-1].axes:
        minor = labels(ax, minor=True)
        assert len(minor) >= 3 and all(plain.fullmatch(t) for t in minor), minor
    bench.plot(records(*[(0.01, 0.05)] * 2, *[(200.0, 900.0)] * 2), tmp_path / "wide.png",
               bench.machine(CPU))
    for ax in figures[-1].axes:
        major = labels(ax, minor=False)
        assert len(major) >= 4 and all(plain.fullmatch(t) for t in major), major
        assert not labels(ax, minor=True)


def test_the_machine_is_named_by_the_cpus_model(monkeypatch, tmp_path, capsys):
    """bench.json, the plot and ``info`` name the CPU's model from /proc/cpuinfo (they said
    "x86_64", which tells an Intel Xeon from an AMD EPYC no better than nothing)."""
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\n"
                    "model name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: fpu avx512f\n")
    monkeypatch.setattr(bench, "_CPUINFO", info)
    meta = bench.machine(CPU)
    assert meta["cpu"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert bench.machine_label(meta).startswith("CPU Intel(R) Xeon(R) Platinum 8480+, ")
    if not torch.cuda.is_available():
        assert main(["info"]) == 0
        assert "cpu (Intel(R) Xeon(R) Platinum 8480+, " in capsys.readouterr().out
    # No model name there (an ARM kernel's cpuinfo) or no file at all: platform's word for it.
    import platform

    info.write_text("processor\t: 0\nCPU implementer\t: 0x41\n")
    assert bench.cpu_name() == (platform.processor() or platform.machine())
    monkeypatch.setattr(bench, "_CPUINFO", tmp_path / "none")
    assert bench.cpu_name() == (platform.processor() or platform.machine())


def test_bench_rejects_unknown_providers_and_bad_shapes(tmp_path, capsys):
    assert main(["bench", "--providers", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown providers ['nope']" in capsys.readouterr().err
    assert main(["bench", "--hidden", "30", "--groups", "4", "--out", str(tmp_path)]) == 2
    assert "groups=4 must divide d_out=30" in capsys.readouterr().err
    assert main(["bench", "--dropout", "1.5", "--out", str(tmp_path)]) == 2  # before any work
    assert "dropout must be in [0, 1), got 1.5" in capsys.readouterr().err
    assert main(["bench", "--alpha", "nan", "--out", str(tmp_path)]) == 2
    assert "alpha must be finite and nonzero, got nan" in capsys.readouterr().err
    # s = 0 zeroes every output and gradient, the reference's too: the check proved nothing.
    assert main(["bench", "--alpha", "0", "--tokens", "4", "--hidden", "16", "--experts", "2",
                 "--groups", "1", "--min-time", "0.01", "--no-progress",
                 "--out", str(tmp_path)]) == 2
    assert "alpha must be finite and nonzero, got 0.0" in capsys.readouterr().err
    assert not (tmp_path / "bench.json").exists()
    # An --out that cannot be a directory is refused before the sweep, not after it.
    (tmp_path / "file").write_text("")
    assert main(["bench", "--tokens", "4", "--hidden", "16", "--experts", "2", "--groups", "1",
                 "--out", str(tmp_path / "file")]) == 2
    assert f"--out {tmp_path / 'file'}: it exists and is not a directory" in (
        capsys.readouterr().err)
    # ... and an --out where bench.json cannot be written (it ran the sweep, then crashed).
    (tmp_path / "dir" / "bench.json").mkdir(parents=True)
    assert main(["bench", "--tokens", "4", "--hidden", "16", "--experts", "2", "--groups", "1",
                 "--out", str(tmp_path / "dir")]) == 2
    assert "bench.json is a directory" in capsys.readouterr().err
    # A refused run leaves no --out directory behind.
    assert main(["bench", "--providers", "nope", "--out", str(tmp_path / "new")]) == 2
    assert not (tmp_path / "new").exists()


def test_bench_reports_a_shape_whose_inputs_cannot_be_made(monkeypatch):
    def no_memory(*_):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory\nmore")

    monkeypatch.setattr(bench, "make_inputs", no_memory)
    records = bench.bench_shape(TINY, [bench.Provider("hydralora-loop", bench._LoopRunner),
                                       bench.Provider("eager", bench._LoopRunner)], CPU, 0.0)
    assert [r["provider"] for r in records] == ["hydralora-loop", "eager"]
    assert all(r["status"] == "error" and r["reason"] == "inputs or reference: RuntimeError: "
               "DefaultCPUAllocator: can't allocate memory" for r in records)


def test_bench_sizes_are_deduplicated_and_labels_tell_shapes_apart():
    from mtlora_kernels.cli import _ints, _names

    assert _ints("16,8,16,016") == [16, 8] and _names("fp32, fp32,bf16") == ["fp32", "bf16"]
    labels = {bench.Shape(4).label(), bench.Shape(4, alpha=32.0).label(),
              bench.Shape(4, dropout=0.1).label()}
    assert len(labels) == 3 and bench.Shape(4, alpha=32.0, dropout=0.1).label().endswith(
        "fp32 alpha=32 dropout=0.1")


@pytest.mark.parametrize("value,text", [(None, "-"), (19.47, "19.5x"), (0.96, "1.0x"),
                                        (0.5, "0.5x"), (0.0021, "0.0021x")])
def test_speedups_below_one_keep_two_digits(value, text):
    assert bench._speedup(value) == text


@pytest.mark.parametrize("argv,message", [
    (["params", "--hidden-size", "0"], "--hidden-size: expected a positive integer, got '0'"),
    (["params", "--rank", "0"], "--rank: expected a positive integer"),
    (["params", "--experts", "x"], "--experts: expected a positive integer, got 'x'"),
    (["bench", "--tokens", "16,0"], "--tokens: expected comma-separated positive integers"),
    (["bench", "--tokens", ","], "--tokens: expected comma-separated positive integers"),
    (["bench", "--dtype", ""], "--dtype: expected at least one comma-separated value"),
    (["bench", "--min-time", "inf"], "--min-time: expected a positive finite number"),
    (["bench", "--min-time", "nan"], "--min-time: expected a positive finite number"),
    (["bench", "--min-time", "-1"], "--min-time: expected a positive finite number"),
])
def test_non_positive_sizes_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_bench_refuses_a_device_or_providers_it_cannot_run(tmp_path, capsys):
    small = ["--tokens", "4", "--hidden", "16", "--experts", "2", "--groups", "1",
             "--out", str(tmp_path)]
    if not torch.cuda.is_available():
        assert main(["bench", "--device", "cuda:1", *small]) == 2
        assert "--device cuda:1, but torch sees no CUDA GPU" in capsys.readouterr().err
    assert main(["bench", "--device", "cpu", "--providers", "mtlora-cuda", *small]) == 2
    assert "none of the requested providers can run here (mtlora-cuda:" in \
        capsys.readouterr().err


def test_bench_exits_1_when_a_provider_is_refused(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench, "default_providers", lambda device, interpreted=False: (
        [bench.Provider("hydralora-loop", bench._LoopRunner), bench.Provider("scaled", _Scaled)],
        {}))
    assert main(["bench", "--device", "cpu", "--tokens", "4", "--hidden", "16", "--experts",
                 "2", "--groups", "1", "--rank", "2", "--min-time", "0.001", "--no-progress",
                 "--out", str(tmp_path)]) == 1
    text = " ".join(capsys.readouterr().out.split())
    assert "scaled refused at T=4" in text and "y rel. err" in text


def test_bench_runs_on_the_threads_it_is_given(tmp_path):
    before = torch.get_num_threads()
    try:
        assert main(["bench", "--device", "cpu", "--threads", str(before + 1), "--tokens", "4",
                     "--hidden", "16", "--experts", "2", "--groups", "1", "--rank", "2",
                     "--min-time", "0.001", "--no-progress", "--providers", "hydralora-loop",
                     "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(before)
    meta = json.loads((tmp_path / "bench.json").read_text())["machine"]
    assert meta["threads"] == before + 1


def test_bench_in_fp64_accepts_hydraloras_fp32_softmax(tmp_path):
    """HydraLoRA takes its softmax in fp32 even for fp64 inputs (3e-8 off the fp64 reference):
    the check must not refuse the baseline the table is relative to."""
    assert main(["bench", "--device", "cpu", "--dtype", "fp64", "--tokens", "16", "--hidden",
                 "64", "--experts", "4", "--groups", "2", "--min-time", "0.01", "--no-progress",
                 "--providers", "hydralora-loop,mtlora-torch", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert {r["provider"] for r in results} == {"hydralora-loop", "mtlora-torch"}
    assert all(r["status"] == "ok" for r in results)


def test_cpu_peak_memory_sees_torch_allocations():
    """4 MB, then 8 MB while it is alive, then 4 MB freed: peak 12 MB (tracemalloc sees ~0)."""
    def f():
        a = torch.ones(1024, 1024)
        b = torch.ones(2048, 1024)
        del a
        return b.sum()

    peak = bench.peak_bytes(f, CPU)
    assert 12 * 2**20 <= peak < 12 * 2**20 + 2**16


def test_info_prints_backends_and_build_metadata(monkeypatch, capsys):
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert f"torch  {torch.__version__}" in text and "available" in text
    import importlib.metadata

    for name in ("transformers", "accelerate"):  # the integrations' libraries (CI has both)
        assert f"{name}  {importlib.metadata.version(name)}" in text
    # A backend that is not available is listed with the reason.
    monkeypatch.setattr(backends, "report", lambda: {
        "torch": "available", "triton": "triton is not installed (no module named 'triton')",
        "cuda": "the CUDA extension needs a CUDA tensor (no GPU here)"})
    assert main(["info"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "     torch  available" in lines
    assert "    triton  triton is not installed (no module named 'triton')" in lines
    assert "      cuda  the CUDA extension needs a CUDA tensor (no GPU here)" in lines
    # The build facts come from the loaded extension (a stand-in with _C's attributes here).
    ext = types.SimpleNamespace(arch_list="800,900", cuda_version="13.0", torch_version="2.11.0")
    monkeypatch.setattr(backends, "_cuda_extension", lambda: (ext, ""))
    main(["info"])
    text = capsys.readouterr().out
    assert '"extension_archs": [\n    "sm_80",\n    "sm_90"\n  ]' in text
    assert '"extension_torch": "2.11.0"' in text and '"extension_cuda": "13.0"' in text


def test_python_dash_m_runs_the_cli():
    proc = subprocess.run([sys.executable, "-m", "mtlora_kernels", "--help"],
                          capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0
    for cmd in ("bench", "info", "params"):
        assert cmd in proc.stdout


@pytest.mark.parametrize("argv", [[], ["frobnicate"]])
def test_missing_or_unknown_subcommand_exits_2(argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


def test_reference_in_chunks_equals_one_piece():
    w, x, dy = bench.make_inputs(TINY, CPU)
    whole, chunked = (bench.reference(w, x, dy, TINY, chunk=c) for c in (TINY.tokens, 4))
    for k in whole:
        torch.testing.assert_close(chunked[k], whole[k], rtol=1e-12, atol=1e-12)


def test_bench_json_is_strict_json_when_a_provider_is_refused(tmp_path):
    """A refused provider's rel. err can be inf; JSON has no Infinity (strict parsers reject
    it), so the file says null there."""
    records = bench.bench_shape(TINY, [bench.Provider("hydralora-loop", bench._LoopRunner),
                                       bench.Provider("frozen-router", _FrozenRouter)], CPU, 0.0)
    assert records[1]["status"] == "refused" and records[1]["rel_err"]["droute"] == float("inf")
    bench.write_json(records, bench.machine(CPU), tmp_path / "bench.json")
    text = (tmp_path / "bench.json").read_text()
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
    assert data["results"][1]["rel_err"]["droute"] is None
    assert data["results"][0]["fwd"]["median_ms"] > 0


@pytest.mark.parametrize("name,dtype,want", [
    ("NVIDIA H100 80GB HBM3", "bf16", (3.35e12, 989e12)),
    ("NVIDIA H100 PCIe", "bf16", (2.0e12, 756e12)),
    ("NVIDIA H100 NVL", "fp16", (3.9e12, 835e12)),
    ("NVIDIA H200", "fp32", (4.8e12, 494e12 / 3)),
    ("NVIDIA H200 NVL", "bf16", (4.8e12, 835e12)),
    ("NVIDIA GH200 480GB", "bf16", None),  # not an H200
    ("NVIDIA A100-SXM4-40GB", "bf16", (1.555e12, 312e12)),
    ("NVIDIA A100 80GB PCIe", "bf16", (1.935e12, 312e12)),
    ("NVIDIA A100-SXM4-80GB", "bf16", (2.039e12, 312e12)),
    ("NVIDIA GeForce RTX 4090", "bf16", None),
    ("NVIDIA H100 80GB HBM3", "fp64", None),
])
def test_gpu_peaks_match_the_card_variant(name, dtype, want):
    assert bench.gpu_peaks(name, dtype) == want


def test_gpu_columns_render():
    """The GPU table (GB/s, TFLOP/s, roofline share) from records as bench_shape writes them."""
    from rich.console import Console

    records = bench.bench_shape(TINY, [bench.Provider("hydralora-loop", bench._LoopRunner)],
                                CPU, 0.0)
    records[0]["fwd"]["roofline"] = 0.25
    con = Console(width=200, record=True)
    con.print(bench.table(records, on_gpu=True))
    text = con.export_text()
    assert "GB/s" in text and "TFLOP/s" in text and "25%" in text and "n/a" in text


@pytest.mark.parametrize("jobs", ["0", "-3", "two"])
def test_kernels_refuses_a_number_of_jobs_below_one(jobs, capsys):
    """`kernels --jobs -3` passed argparse and failed in the process pool with a traceback (0
    meant the default silently); a usage error now, before anything compiles."""
    with pytest.raises(SystemExit) as exc:
        main(["kernels", "--jobs", jobs, "--no-cuda"])
    assert exc.value.code == 2 and "--jobs" in capsys.readouterr().err
