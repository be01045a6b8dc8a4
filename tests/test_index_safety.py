"""Index safety beyond 2^31 elements: T * d_in or T * d_out >= 2^31 must not wrap an offset.

Triton kernels (no GPU and no 8+ GB tensors needed). The launchers of the package run on
``meta`` tensors at shapes past 2^31 elements with every registered kernel replaced by a
recorder, which keeps the grid and the integer arguments of each launch. Each recorded launch is
compiled for sm_90 with ``triton.compile`` (in a subprocess without ``TRITON_INTERPRET``), and an
interval analysis of its Triton IR propagates exact ranges from those arguments, the program ids
(0 .. grid - 1), ``tl.arange`` and loop bounds through every integer op. A 32-bit add, sub or mul
whose range leaves [-2^31, 2^31) and whose value reaches a pointer offset (``tt.addptr``) is a
wrap-around: the test names it. The analysis is itself tested on two small kernels, one that
computes ``row * stride`` in 32 bits (must be flagged) and one that widens first (must pass).

The CUDA kernels in the emulator (``slow``): forward and backward of the last two token blocks
of inputs whose x or y has more than 2^31 elements, the other blocks skipped.

The CUDA extension's kernels, statically: clang-tidy over the emulator's C++ form of csrc/
finds the implicit narrowings of 64-bit integers and the int products widened into offsets that
it can see (each widening reviewed, REVIEWED_WIDENINGS); what it cannot see is listed above that
table.

The torch backend at such a size needs real memory: ``test_torch_backend_past_2_pow_31`` runs
it (forward, T * d_out = 2^31 + 3 * 2^16 in fp16, 9.1 GB peak RSS measured) and is marked ``slow``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parents[1]
I32 = (-(2**31), 2**31 - 1)

# --------------------------------------------------------------------------------------------
# Launch capture and compilation (runs in a subprocess without TRITON_INTERPRET).
# --------------------------------------------------------------------------------------------

# Shapes past 2^31 elements (2^20 + 37 tokens): name -> how to call the launchers on them.
BIG_T = 2**20 + 37


def _scenarios():
    """name -> (function calling the Triton launchers on meta tensors)."""
    from mtlora_kernels.triton import mix as tmix
    from mtlora_kernels.triton import rsvd

    meta = torch.device("meta")

    def t(*shape, dtype=torch.bfloat16):
        return torch.empty(*shape, dtype=dtype, device=meta)

    def mix_case(T, d_in, d_out, r, N, g, *, router="fused", dropout=0.1, residual=True,
                 deterministic=False, dpi=False, dtype=torch.bfloat16):
        def run():
            x, A, B = t(T, d_in, dtype=dtype), t(r, d_in, dtype=dtype), t(N, d_out, r, dtype=dtype)
            W = t(g * N, d_in, dtype=dtype) if router == "fused" else None
            L = t(T, g * N, dtype=torch.float32) if router == "logits" else None
            res = t(T, d_out, dtype=dtype) if residual else None
            y, h, pi = tmix.forward(x, A, B, W, L, res, g, 2.0, dropout, 1234)
            tmix.backward(y, x, A, B, W, h, pi, t(T, g, N, dtype=torch.float32) if dpi else None,
                          g, 2.0, dropout, 1234, deterministic)
            tmix.dropout_keep_mask(1234, T, d_in, dropout, meta)
        return run

    def bmm_case(nb, P, Q, L, transpose):
        def run():
            a = t(nb, Q, P).transpose(1, 2) if transpose else t(nb, P, Q)
            rsvd.bmm(a, t(nb, Q, L, dtype=torch.float32))
        return run

    return {
        # T * d = 2^32: one group block, folded GEMM, fused dA/dW atomics.
        "mix_d4096_g2": mix_case(BIG_T, 4096, 4096, 16, 16, 2),
        "mix_d4096_g2_deterministic": mix_case(BIG_T, 4096, 4096, 16, 16, 2,
                                               deterministic=True, dpi=True),
        # fp32 inputs have kernels of their own (registered as *_fp32)
        "mix_d4096_g2_fp32": mix_case(BIG_T, 4096, 4096, 16, 16, 2, deterministic=True,
                                      dtype=torch.float32),
        # g = d_out (epilogue form, c = 1) and a router of several blocks (g*N = 8192).
        "mix_g_eq_dout": mix_case(BIG_T, 2048, 4096, 8, 2, 4096, dropout=0.0),
        "mix_logits_wide_in": mix_case(BIG_T, 8192, 64, 64, 4, 1, router="logits"),
        "mix_plain_lora_wide_out": mix_case(BIG_T, 64, 8192, 128, 1, 1, router="none",
                                            residual=False),
        # randomized SVD GEMMs: a batch of 2^31+ elements (each matrix < 2^31).
        "rsvd_bmm_batch": bmm_case(2048, 4096, 300, 32, transpose=False),
        "rsvd_bmm_batch_transposed": bmm_case(2048, 4096, 300, 32, transpose=True),
        # one matrix of 2^31+ elements (a 2^19 x 4104 weight, e.g. a large embedding table)
        "rsvd_bmm_one_big_matrix": bmm_case(1, 2**19, 4104, 32, transpose=False),
        "rsvd_bmm_one_big_matrix_transposed": bmm_case(1, 2**19, 4104, 32, transpose=True),
    }


@dataclasses.dataclass
class Launch:
    scenario: str
    kernel: str
    grid: list
    ints: list  # the non-constexpr arguments in order; None where not an int
    constexprs: dict
    options: dict
    ttir: str = ""
    dtype: str = ""  # Triton's name of the first tensor argument's dtype ("bf16", "fp32", ...)


_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
                 torch.bool: "i1"}


def _capture(scenarios: dict) -> list[Launch]:
    """Every kernel launch of each scenario, by swapping the registered kernels for recorders."""
    import importlib

    from mtlora_kernels.triton.registry import all_kernels

    specs = all_kernels()
    launches: list[Launch] = []
    current = [""]

    class Recorder:
        """Stands in for one @triton.jit function; several registry entries may share it (one
        per input dtype family): the launch's first tensor picks the entry."""

        def __init__(self, fn_specs):
            self.specs = fn_specs

        def __getitem__(self, grid):
            def launch(*args, num_warps=4, num_stages=3, **constexprs):
                grid3 = list(grid) + [1] * (3 - len(grid))
                ints = [a if isinstance(a, int) and not isinstance(a, bool) else None
                        for a in args]
                dtype = _TRITON_DTYPE[next(a for a in args if torch.is_tensor(a)).dtype]
                spec = next((s for s in self.specs if dtype in s.dtypes), self.specs[0])
                launches.append(Launch(current[0], spec.name, grid3, ints, constexprs,
                                       {"num_warps": num_warps, "num_stages": num_stages},
                                       dtype=dtype if dtype in spec.dtypes else spec.dtypes[0]))
            return launch

    by_fn: dict[int, list] = {}
    for spec in specs:
        by_fn.setdefault(id(spec.fn), []).append(spec)
    saved = []
    for fn_specs in by_fn.values():
        fn = fn_specs[0].fn
        module = importlib.import_module(fn.__module__)
        for attr, value in list(vars(module).items()):
            if value is fn:
                saved.append((module, attr, value))
                setattr(module, attr, Recorder(fn_specs))
    try:
        for name, run in scenarios.items():
            current[0] = name
            run()
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)
    return launches


def _compile_ttir(fn, signature: dict, constexprs: dict, options: dict) -> str:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mtlora_kernels.kernel_report import _full_signature, _jit_function

    jit = _jit_function(fn)
    sig, consts, attrs = _full_signature(jit, signature, constexprs)
    compiled = triton.compile(ASTSource(fn=jit, signature=sig, constexprs=consts, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options=options)
    return compiled.asm["ttir"]


def _subprocess_main() -> None:
    """Capture, compile (deduplicated), and print the launches as JSON."""
    from mtlora_kernels.triton.registry import all_kernels

    specs = {s.name: s for s in all_kernels()}
    launches = _capture(_scenarios())
    cache: dict = {}
    for ln in launches:
        spec = specs[ln.kernel]
        sig = {k: v.format(dtype=ln.dtype) for k, v in spec.signature.items()}
        # As Triton's launcher does: an int argument past int32 is passed (and compiled) as i64.
        for name, value in zip(sig, ln.ints):
            if value is not None and not I32[0] <= value <= I32[1]:
                sig[name] = "i64"
        key = (ln.kernel, json.dumps(sig), json.dumps(ln.constexprs, sort_keys=True),
               json.dumps(ln.options))
        if key not in cache:
            cache[key] = _compile_ttir(spec.fn, sig, ln.constexprs, ln.options)
        ln.ttir = cache[key]
    for name, (fn, sig, grid, ints) in _SAMPLES.items():
        ttir = _compile_ttir(fn, sig, {"BLOCK": 64}, {"num_warps": 4, "num_stages": 1})
        launches.append(Launch(name, name, grid, ints, {"BLOCK": 64}, {}, ttir))
    print(json.dumps({"registered": sorted(specs),
                      "launches": [dataclasses.asdict(ln) for ln in launches]}))


# --------------------------------------------------------------------------------------------
# Two sample kernels the analysis must tell apart: rows * stride in 32 bits, and widened.
# --------------------------------------------------------------------------------------------

@triton.jit
def _copy_rows_i32(src, dst, T, stride, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(src + rows * stride, mask=rows < T)  # wraps once rows * stride >= 2^31
    tl.store(dst + rows, v, mask=rows < T)


@triton.jit
def _copy_rows_i64(src, dst, T, stride, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(src + rows.to(tl.int64) * stride, mask=rows < T)
    tl.store(dst + rows, v, mask=rows < T)


_SAMPLE_SIG = {"src": "*fp32", "dst": "*fp32", "T": "i32", "stride": "i32"}
# T = 2^20 rows of stride 4096: row * stride reaches 2^32.
_SAMPLES = {
    "sample_i32": (_copy_rows_i32, _SAMPLE_SIG, [2**20 // 64, 1, 1], [None, None, 2**20, 4096]),
    "sample_i64": (_copy_rows_i64, _SAMPLE_SIG, [2**20 // 64, 1, 1], [None, None, 2**20, 4096]),
}


# --------------------------------------------------------------------------------------------
# Interval analysis of Triton IR.
# --------------------------------------------------------------------------------------------

_VALUE = re.compile(r"%[\w$.\-]+(?:#\d+)?")
_INT_TYPE = re.compile(r"(?:^|x|<)i(\d+)>?$")


def _strip_locations(text: str) -> str:
    """Drop every ``loc(...)`` (balanced parentheses, may nest and hold quoted names)."""
    out, i = [], 0
    while True:
        j = text.find("loc(", i)
        if j < 0:
            out.append(text[i:])
            return "".join(out)
        out.append(text[i:j])
        depth, k, quoted = 0, j + 3, False
        while k < len(text):
            ch = text[k]
            if ch == '"':
                quoted = not quoted
            elif not quoted and ch == "(":
                depth += 1
            elif not quoted and ch == ")":
                depth -= 1
                if depth == 0:
                    break
            k += 1
        i = k + 1


def _int_bits(type_str: str) -> int | None:
    """Bit width of an integer scalar / tensor type, None for anything else."""
    type_str = type_str.strip()
    if "ptr" in type_str:
        return None
    m = _INT_TYPE.search(type_str)
    return int(m.group(1)) if m else None


def _full(bits: int) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if bits > 1 else (0, 1)


@dataclasses.dataclass
class Finding:
    value: str
    op: str
    interval: tuple[int, int]
    line: str


def _result_type(op: str, rest: str) -> str:
    """The type of an op's (first) result from the text after its operands."""
    if ":" not in rest:
        return ""
    tail = rest.rsplit(":", 1)[1] if op != "tt.addptr" else rest.split(":", 1)[1].split(",")[0]
    for sep in (" to ", "->"):
        if sep in tail:
            tail = tail.split(sep)[-1]
    return tail.strip()


def analyse(ttir: str, ints: list, grid: list) -> tuple[list[Finding], int, int]:
    """32-bit integer wrap-arounds that reach a pointer offset, the number of addptr ops and
    the largest offset an addptr can receive.

    ``ints``: the function's non-constexpr arguments in order (an int, or None for pointers and
    floats). Ranges are exact for constants, arguments, program ids and ``make_range``; they
    are combined by interval arithmetic; anything the analysis does not model (loads, loop-
    carried values, bit operations) gets its type's full range, which only makes it stricter.
    """
    text = _strip_locations(ttir)
    iv: dict[str, tuple[int, int]] = {}  # unique value id -> interval (integers only)
    deps: dict[str, list[str]] = {}  # unique value id -> operand ids
    scope: dict[str, str] = {}  # printed name -> current unique id (names repeat in regions)
    overflow: dict[str, Finding] = {}
    offsets: list[str] = []
    counter = [0]

    def define(name: str, interval, operands=(), finding=None) -> None:
        counter[0] += 1
        uid = f"{name}@{counter[0]}"
        scope[name] = uid
        if interval is not None:
            iv[uid] = interval
        deps[uid] = [scope[o.split("#")[0]] for o in operands if o.split("#")[0] in scope]
        if finding is not None:
            overflow[uid] = finding

    def get(name: str, bits: int = 32) -> tuple[int, int]:
        uid = scope.get(name.split("#")[0])
        return iv.get(uid, _full(bits)) if uid else _full(bits)

    sig = re.search(r"tt\.func\s+public\s+@\w+\((.*?)\)\s*(?:attributes|\{)", text, re.S)
    args = re.findall(r"(%[\w$.\-]+)\s*:\s*([^,{]+?)(?:\s*\{[^}]*\})?\s*(?:,|$)", sig.group(1))
    if len(args) != len(ints):
        raise AssertionError(f"IR has {len(args)} arguments, the launch passed {len(ints)}")
    for (name, type_str), value in zip(args, ints):
        bits = _int_bits(type_str)
        if value is not None and bits and not _full(bits)[0] <= value <= _full(bits)[1]:
            raise AssertionError(f"argument {name}={value} does not fit its type {type_str}")
        define(name, (value, value) if value is not None and bits else None)

    n_addptr = 0
    for raw in text.splitlines():
        line = raw.strip()
        m = re.match(r"(?:(%[\w$.\-]+)(?::\d+)?\s*=\s*)?(scf\.for)\s+(%[\w$.\-]+)\s*=\s*(%\S+)"
                     r"\s+to\s+(%\S+)\s+step\s+(%\S+)(.*)$", line)
        if m:
            res, _, ivar, lb, ub, _step, rest = m.groups()
            lo, hi = get(lb)[0], get(ub)[1] - 1
            define(ivar, (lo, max(lo, hi)), (lb, ub))
            for a, init in re.findall(r"(%[\w$.\-]+)\s*=\s*(%[\w$.\-]+)", rest):
                define(a, None, (init,))  # loop-carried: unknown (full range if an integer)
            if res:
                define(res, None)
            continue
        m = re.match(r"(%[\w$.\-]+)(?::\d+)?\s*=\s*([\w.]+)\s*(.*)$", line)
        if not m:
            if line.startswith("^bb"):
                for a in _VALUE.findall(line):
                    define(a, None)
            continue
        res, op, rest = m.groups()
        operands = _VALUE.findall(rest)
        bits = _int_bits(_result_type(op, rest))
        ops = [get(o, bits or 32) for o in operands]
        interval = None if bits is None else _full(bits)
        finding = None
        if op == "tt.addptr":
            n_addptr += 1
            offsets.append(scope.get(operands[1].split("#")[0]))
        if bits is None:
            define(res, None, operands)
            continue
        if op == "arith.constant":
            c = re.match(r"(?:dense<)?(-?\d+)>?\s*:", rest)
            interval = (int(c.group(1)), int(c.group(1))) if c else _full(bits)
        elif op == "tt.get_program_id":
            axis = "xyz".index(rest.split()[0])
            interval = (0, grid[axis] - 1)
        elif op == "tt.get_num_programs":
            axis = "xyz".index(rest.split()[0])
            interval = (grid[axis], grid[axis])
        elif op == "tt.make_range":
            s = int(re.search(r"start = (-?\d+)", rest).group(1))
            e = int(re.search(r"end = (-?\d+)", rest).group(1))
            interval = (s, e - 1)
        elif op in ("tt.splat", "tt.broadcast", "tt.expand_dims", "tt.reshape", "tt.trans",
                    "ttg.convert_layout", "arith.extsi", "arith.index_cast"):
            interval = ops[0]
        elif op == "arith.extui":
            interval = ops[0] if ops[0][0] >= 0 else (0, 2**bits - 1)
        elif op == "arith.trunci":
            interval = ops[0] if _full(bits)[0] <= ops[0][0] <= ops[0][1] <= _full(bits)[1] \
                else _full(bits)
        elif op in ("arith.addi", "arith.subi", "arith.muli"):
            (a0, a1), (b0, b1) = ops
            if op == "arith.addi":
                interval = (a0 + b0, a1 + b1)
            elif op == "arith.subi":
                interval = (a0 - b1, a1 - b0)
            else:
                prods = [a0 * b0, a0 * b1, a1 * b0, a1 * b1]
                interval = (min(prods), max(prods))
            lo, hi = _full(bits)
            if interval[0] < lo or interval[1] > hi:
                finding = Finding(res, op, interval, raw.strip()[:300])
                interval = (lo, hi)  # what the hardware computes after wrapping
        elif op in ("arith.divsi", "arith.divui"):
            (a0, a1), (b0, b1) = ops
            if b0 > 0:
                cands = [a0 // b0, a0 // b1, a1 // b0, a1 // b1]
                interval = (min(cands), max(cands)) if a0 >= 0 else (min(a0, 0), max(a1, 0))
            else:
                interval = (-max(abs(a0), abs(a1)), max(abs(a0), abs(a1)))
        elif op in ("arith.remsi", "arith.remui"):
            (a0, a1), (b0, b1) = ops
            m_ = max(abs(b0), abs(b1)) - 1
            interval = (0, min(a1, m_)) if a0 >= 0 else (-m_, m_)
        elif op in ("arith.minsi", "arith.maxsi"):
            (a0, a1), (b0, b1) = ops
            f = min if op == "arith.minsi" else max
            interval = (f(a0, b0), f(a1, b1))
        elif op == "arith.select":
            (a0, a1), (b0, b1) = ops[1], ops[2]
            interval = (min(a0, b0), max(a1, b1))
        elif op == "arith.andi" and all(o[0] >= 0 for o in ops):
            interval = (0, min(o[1] for o in ops))
        elif op == "arith.cmpi":
            interval = (0, 1)
        define(res, interval, operands, finding)

    # Which wrap-arounds reach an address: walk back from every addptr offset.
    seen, stack, findings = set(), [o for o in offsets if o], []
    while stack:
        uid = stack.pop()
        if uid in seen:
            continue
        seen.add(uid)
        if uid in overflow:
            findings.append(overflow[uid])
        stack.extend(deps.get(uid, []))
    largest = max((iv[o][1] for o in offsets if o in iv), default=0)
    return findings, n_addptr, largest


# --------------------------------------------------------------------------------------------
# The tests.
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compiled() -> dict:
    """``{"registered": kernel names, "launches": {scenario: [Launch]}}`` with the Triton IR of
    every launch (one subprocess for the whole module)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"),
                                         env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", "import test_index_safety as t; t._subprocess_main()"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    out: dict[str, list[Launch]] = {}
    for d in result["launches"]:
        out.setdefault(d["scenario"], []).append(Launch(**d))
    return {"registered": result["registered"], "launches": out}


@pytest.fixture(scope="module")
def launches(compiled) -> dict[str, list[Launch]]:
    return compiled["launches"]


SCENARIOS = [  # static (the launch capture itself runs in the subprocess)
    "mix_d4096_g2", "mix_d4096_g2_deterministic", "mix_d4096_g2_fp32", "mix_g_eq_dout",
    "mix_logits_wide_in",
    "mix_plain_lora_wide_out", "rsvd_bmm_batch", "rsvd_bmm_batch_transposed",
    "rsvd_bmm_one_big_matrix",
    "rsvd_bmm_one_big_matrix_transposed",
]


def _scenario_names() -> list[str]:
    return [p.values[0] if hasattr(p, "values") else p for p in SCENARIOS]


def test_analysis_flags_a_32_bit_row_offset_and_passes_the_widened_one(launches):
    (bad,), (good,) = launches["sample_i32"], launches["sample_i64"]
    findings, n, _ = analyse(bad.ttir, bad.ints, bad.grid)
    assert n == 2 and [f.op for f in findings] == ["arith.muli"], findings
    assert findings[0].interval[1] >= 2**32 - 4096  # rows * stride up to 2^32
    findings, n, largest = analyse(good.ttir, good.ints, good.grid)
    assert n == 2 and findings == [] and largest >= 2**32 - 4096


def test_every_registered_kernel_is_launched_by_a_scenario(compiled):
    """A kernel added to the registry without a scenario here fails this test."""
    launches = compiled["launches"]
    assert set(launches) == set(_scenario_names()) | set(_SAMPLES)
    for name in _scenario_names():
        assert launches[name], f"{name}: no kernel was launched"
    launched = {ln.kernel for n in _scenario_names() for ln in launches[n]}
    assert set(compiled["registered"]) <= launched, \
        f"never launched here: {sorted(set(compiled['registered']) - launched)}"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_no_32_bit_offset_wraps_past_2_pow_31(launches, scenario):
    problems, largest = [], 0
    for ln in launches[scenario]:
        findings, n, big = analyse(ln.ttir, ln.ints, ln.grid)
        assert n > 0, f"{ln.kernel}: no addptr found (is the IR format understood?)"
        largest = max(largest, big)
        problems += [f"{ln.kernel} {ln.constexprs}: {f.op} range {f.interval} in {f.line}"
                     for f in findings]
    assert not problems, "\n".join(problems)
    # The shapes really put offsets past 2^31, and the analysis followed them there (in 64 bits).
    # Not so for the transposed matrix: its kernel walks the long dimension by bumping a (64-bit)
    # pointer in the loop, so no single offset gets large.
    if scenario != "rsvd_bmm_one_big_matrix_transposed":
        assert largest >= 2**31, f"largest pointer offset {largest} < 2^31"


# --------------------------------------------------------------------------------------------
# The torch backend, for real.
# --------------------------------------------------------------------------------------------


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


@pytest.mark.slow
def test_torch_backend_past_2_pow_31():
    """y [T, d_out] of 2^31 + 3 * 2^16 fp16 elements: the rows past the 2^31-th element are right.

    Forward only: the backward would add dy (4.3 GB) and its intermediates. T * d_in past 2^31 is
    not run: the CPU path up-casts x to fp32 for the GEMMs (8.6 GB more per copy).
    """
    from mtlora_kernels.ops.mix import mix
    from mtlora_kernels.reference import mix_reference

    T, d_in, d_out, r, N = 2**15 + 3, 16, 2**16, 4, 2
    need = 2 * T * d_out * 2 + 2**31  # the bmm output and its scaled copy (y), plus slack
    if _available_bytes() < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free memory")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(T, d_in, generator=gen).half()
    A = (torch.randn(r, d_in, generator=gen) / 4).half()
    B = (torch.randn(N, d_out, r, generator=gen) / 2).half()
    W = torch.randn(N, d_in, generator=gen).half()
    with torch.no_grad():
        y = mix(x, A, B, W, groups=1, scaling=2.0, backend="torch")
    assert y.shape == (T, d_out) and T * d_out > 2**31
    rows = torch.tensor([0, T // 2, T - 2, T - 1])  # the last rows start past element 2^31
    assert (T - 2) * d_out >= 2**31
    want = mix_reference(x[rows].double(), A.double(), B.double(), W.double(), scaling=2.0)
    from conftest import assert_close_to_reference

    assert_close_to_reference(y[rows], want, torch.float16, "rows past 2^31")


# --------------------------------------------------------------------------------------------
# The CUDA kernels, run in the emulator at the far end of inputs past 2^31 elements.
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.emulator
@pytest.mark.parametrize("case", ["x_past_2_pow_31", "y_past_2_pow_31"])
def test_cuda_kernels_past_2_pow_31_in_the_emulator(case, monkeypatch):
    """Forward and backward of the last two token blocks of inputs whose x (d_in = 2^16, with
    dropout, whose Philox offsets pass 2^31 too) or y, residual and dy (d_out = 2^16, g = 2)
    hold more than 2^31 fp16 elements. The emulator runs 1e6 elements a second, so the launches
    skip the rest (`Emulated.windows`): the token blocks below the last two, and the token
    splits below them in dB and dA / dW, whose slabs are zero (the workspace is zeroed before
    each phase that splits). With 2^20 SMs every 64 tokens are a split. The inputs are NaN
    outside the computed rows, so a read at an offset that wraps into the input shows in the
    result, and y and dx must stay NaN outside them, so a write at one does too; an offset that
    wraps below the buffer (a signed 32-bit wrap) reads or writes outside it, which may crash
    the process. Peak memory ~10 GB (x, dx) / ~14 GB (y, residual, dy)."""
    import cuda_emu
    from conftest import assert_close_to_reference
    from mtlora_kernels.reference import mix_reference

    big = 2**16
    d_in, d_out, g = (big, 64, 1) if case == "x_past_2_pow_31" else (64, big, 2)
    T = 2**31 // big + 64 + 5  # the last token block is partial
    r, N, scaling, seed = 4, 2, 2.0, 2**33 + 7
    p = 0.1 if d_in == big else 0.0
    need = 2 * T * (2 * d_in + 3 * d_out) + 2**31
    if _available_bytes() < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free memory")
    emu = cuda_emu.load()
    monkeypatch.setattr(emu, "num_sms", 2**20)
    monkeypatch.setattr(emu, "max_cluster", 1)
    blocks = -(-T // 64)
    lo = (blocks - 2) * 64  # the first row computed
    rows = T - lo
    assert lo * max(d_in, d_out) >= 2**31
    _, db_splits, daw_splits, _ = emu.backward_plan(T, d_in, d_out, r, N, g, True)
    assert db_splits == daw_splits == blocks  # a split per token block: split q starts at 64 q
    windows = {name: (blocks - 2, 0, 0) for name in
               ("forward_kernel", "backward_dy_kernel", "backward_dx_kernel")}
    windows["softmax_backward_kernel"] = (lo * g // 256, 0, 0)  # rows (token, group), 256 a block
    windows["backward_db_kernel"] = windows["backward_daw_kernel"] = (0, 0, blocks - 2)
    zero = ("backward_dy_kernel", "backward_db_kernel", "backward_daw_kernel")

    gen = torch.Generator().manual_seed(0)
    x = cuda_emu._poisoned(T, d_in, dtype=torch.float16)
    x[lo:] = torch.randn(rows, d_in, generator=gen).half()
    A = (torch.randn(r, d_in, generator=gen) / d_in**0.5).half()
    B = (torch.randn(N, d_out, r, generator=gen) / 2).half()
    W = (torch.randn(g * N, d_in, generator=gen) / d_in**0.5).half()
    residual = None
    if d_out == big:
        residual = cuda_emu._poisoned(T, d_out, dtype=torch.float16)
        residual[lo:] = torch.randn(rows, d_out, generator=gen).half()
    with emu.windows(windows):
        y, h, pi = emu.launch_forward(x, A, B, W, None, residual, g, scaling, p, seed)
    assert torch.isnan(y[:lo]).all() and torch.isnan(h[:lo]).all()
    y_rows = y[lo:].clone()
    res_rows = None if residual is None else residual[lo:].clone()
    del y, residual

    dy = cuda_emu._poisoned(T, d_out, dtype=torch.float16)
    dy[lo:] = torch.randn(rows, d_out, generator=gen).half()
    with emu.windows(windows, zero_workspace_before=zero):
        dx, dA, dB, dW, _ = emu.launch_backward(dy, x, A, B, W, h, pi, None, g, scaling, p,
                                                  seed)
    assert torch.isnan(dx[:lo]).all()

    mask = None
    if p > 0:
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # read when the kernel is decorated

        @triton.jit
        def rand_from(out, seed, base, n, BLOCK: tl.constexpr):  # tl.rand(seed, base + i)
            offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            tl.store(out + offs, tl.rand(seed, base + offs.to(tl.int64)), mask=offs < n)

        # Triton's own Philox (an independent implementation) at the 64-bit offsets.
        u = torch.empty(rows * d_in)
        rand_from[(triton.cdiv(rows * d_in, 4096),)](u, seed, lo * d_in, rows * d_in,
                                                     BLOCK=4096)
        mask = (u >= p).view(rows, d_in)
    leaves = [t.double().requires_grad_() for t in (x[lo:], A, B, W)]
    ref = mix_reference(*leaves, groups=g, scaling=scaling, dropout_mask=mask, dropout_p=p)
    if res_rows is not None:
        ref = ref + res_rows.double()
    (ref * dy[lo:].double()).sum().backward()
    for name, got, want in (("y", y_rows, ref.detach()), ("dx", dx[lo:], leaves[0].grad),
                            ("dA", dA, leaves[1].grad), ("dB", dB, leaves[2].grad),
                            ("dW_route", dW, leaves[3].grad)):
        assert_close_to_reference(got, want, torch.float16, f"{case}: {name}")


# --------------------------------------------------------------------------------------------
# The CUDA extension's kernels, statically (clang-tidy over the emulator's C++ form of csrc/).
# --------------------------------------------------------------------------------------------

# The index rule of csrc/: token offsets and every product that can reach T * d are int64_t;
# ints hold only what is bounded by kMaxRowLength (d_in, d_out, r, g * N < 2^26, checked in
# bindings.cpp) or by a tile. Two clang-tidy checks find where code leaves that rule implicitly:
# - bugprone-narrowing-conversions: a 64-bit integer stored in a narrower one. None allowed.
# - bugprone-implicit-widening-of-multiplication-result: a product computed in int and then
#   widened (to int64_t, or as a pointer offset), which wraps before the widening if it can
#   pass 2^31. Each one is reviewed below (file, the line's text) with why it cannot; a new
#   copy of a reviewed line in the same file passes unreviewed.
# Not covered: an int product added to a pointer whose type depends on a template parameter
# (`const T* x`: clang-tidy matches the template's definition, where that sum is unresolved, not
# its instantiations; float* workspace pointers and int64_t results are seen); explicit casts to
# int (`int(x)`), reviewed by hand (mix_backward_dy.cu and mix_backward_w.cu cast dims and tile
# indices only; ColLoader's `int(ldg)` is bounded by the static_assert beside it); unsigned
# arithmetic. test_cuda_kernels_past_2_pow_31_in_the_emulator runs them at such sizes.
CLANG_TIDY_CHECKS = ("bugprone-narrowing-conversions,"
                     "bugprone-implicit-widening-of-multiplication-result")
REVIEWED_WIDENINGS = {
    ("common.cuh", "const int64_t col = col0 + (q % PER_ROW) * V;"): "< KC (a chunk's columns)",
    ("common.cuh", "if (KSTEP * i < left) {"): "KSTEP * i < KC",
    ("common.cuh", "raw.set(i, base[KSTEP * i * int(ldg)]);"):
        "KC * kMaxRowLength <= 2^31 (static_assert in ColLoader)",
    ("common.cuh", "nvcuda::wmma::store_matrix_sync(Cs + wm * 16 * LDC + (wn * FN + f) * 16, "
                   "acc[f], LDC,"): "shared memory tile",
    ("common.cuh", "if constexpr (kAsyncA) a.issue(k_begin + st * KC, st);"): "st < stages",
    ("common.cuh", "b.issue(k_begin + st * KC, st);"): "st < stages",
    ("mix_backward_dy.cpp", "const float* pi_t = pi + (t0 + rr) * gN + G * N + e0;"):
        "G * N < g * N (the token product is int64_t)",
    ("mix_backward_dy.cpp", "const float* u_t = Cs + rr * LDC + k;"): "shared memory tile",
    ("mix_backward_dy.cpp", "for (int e = 0; e < nu; ++e) sum += pi_t[e] * u_t[e * w];"):
        "shared memory tile (e * w < 64)",
    ("mix_backward_dy.cpp", "const float* u_e = Cs + rr * LDC + e * w;"): "shared memory tile",
    ("mix_backward_w.cpp", "const float* pi_q = pi + G * N + e0 + min(col_of_thread<BN>() / w, "
                           "nu - 1);"): "G * N < g * N",
}
_TIDY_LINE = re.compile(
    r"^(?P<path>[^:\n]+):(?P<line>\d+):\d+: warning: (?P<msg>.*) \[(?P<check>[\w.,-]+)\]$", re.M)


def _clang_tidy() -> str:
    import shutil

    exe = shutil.which("clang-tidy", path=f"{Path(sys.executable).parent}{os.pathsep}"
                                          f"{os.environ.get('PATH', '')}")
    if exe is None:
        pytest.skip("needs clang-tidy (requirements-dev.txt: the clang-tidy wheel)")
    return exe


def _tidy(exe: str, src_dir: Path, units: list[str]) -> list[tuple[str, str, str, str]]:
    """(file, line text, check, message) of every finding in src_dir's files."""
    from concurrent.futures import ThreadPoolExecutor

    include = ROOT / "tests" / "cuda_emu" / "include"

    def one(unit: str) -> str:
        r = subprocess.run([exe, f"-checks=-*,{CLANG_TIDY_CHECKS}", "-header-filter=.*",
                            "-config={CheckOptions: {bugprone-narrowing-conversions."
                            "WarnOnFloatingPointNarrowingConversion: false, "
                            "bugprone-narrowing-conversions."
                            "WarnOnIntegerToFloatingPointNarrowingConversion: false}}",
                            str(src_dir / unit), "--", "-std=c++20", f"-I{include}",
                            f"-I{src_dir}"], capture_output=True, text=True)
        assert "error:" not in r.stdout + r.stderr, r.stdout + r.stderr
        return r.stdout

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        out = "".join(pool.map(one, units))
    found = set()
    for m in _TIDY_LINE.finditer(out):
        path = Path(m["path"]).resolve()
        if path.parent != src_dir.resolve():
            continue  # emu.h's own constants
        text = path.read_text().splitlines()[int(m["line"]) - 1].strip()
        found.add((path.name, text, m["check"], m["msg"]))
    return sorted(found)


def _problems(findings) -> list[str]:
    bad = []
    for name, text, check, msg in findings:
        if check == "bugprone-narrowing-conversions":
            # threadIdx / blockIdx (unsigned, < 2^31) into int is not a 64-bit narrowing.
            if not (msg.startswith("narrowing conversion from 'unsigned int' to signed type 'int'")
                    and re.search(r"\b(threadIdx|blockIdx)\.", text)):
                bad.append(f"{name}: {text}  ({msg})")
        elif (name, text) not in REVIEWED_WIDENINGS:
            bad.append(f"{name}: {text}  ({msg})")
    return bad


def test_clang_tidy_flags_a_32_bit_row_offset(tmp_path):
    """The checks see the two ways a row offset wraps in 32 bits, and pass the widened one."""
    exe = _clang_tidy()
    (tmp_path / "k.cpp").write_text(
        "#include <cstdint>\n"
        "float at_product(const float* x, int t, int d) { return x[t * d]; }\n"
        "int narrowed(int64_t t, int64_t d) { const int o = t * d; return o; }\n"
        "float widened(const float* x, int t, int d) { return x[int64_t(t) * d]; }\n")
    findings = _tidy(exe, tmp_path, ["k.cpp"])
    assert [text for _, text, _, _ in findings] == [
        "float at_product(const float* x, int t, int d) { return x[t * d]; }",
        "int narrowed(int64_t t, int64_t d) { const int o = t * d; return o; }"], findings
    assert len(_problems(findings)) == 2


def test_cuda_kernels_keep_offsets_in_64_bits(tmp_path):
    import cuda_emu

    exe = _clang_tidy()
    src = cuda_emu.write_sources(tmp_path / "src")
    findings = _tidy(exe, src, cuda_emu.unit_names())
    assert not _problems(findings), "\n".join(_problems(findings))
    seen = {(name, text) for name, text, _, _ in findings}
    stale = sorted(set(REVIEWED_WIDENINGS) - seen)
    assert not stale, f"reviewed widenings no longer in csrc/ (remove them): {stale}"
