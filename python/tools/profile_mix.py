"""Per-kernel times of one fused mix forward + backward, for each backend available here.

    python python/tools/profile_mix.py [--tokens 8192] [--hidden 4096] [--rank 16]
                                       [--experts 16] [--groups 2] [--dtype bf16] [--out DIR]

The benchmark (``mtlora-kernels bench``) times whole calls; this splits one forward + backward
into its kernels with torch.profiler, so that a change to one kernel (the CUDA backward's dy,
dB and dA/dW kernels were rewritten without a GPU) can be judged on its own, next to the
Triton kernels doing the same work. Defaults: the SPEC's floor shape. On a machine without a
GPU it profiles the torch backend on the CPU (a dry run of this script).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from mtlora_kernels import backends
from mtlora_kernels.ops.mix import mix

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=4096, help="d_in = d_out")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--repeats", type=int, default=10, help="profiled calls per backend")
    p.add_argument("--out", type=Path, help="also write each backend's table to DIR/<name>.txt")
    args = p.parse_args()

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype] if dev.type == "cuda" else torch.float32
    activity = ProfilerActivity.CUDA if dev.type == "cuda" else ProfilerActivity.CPU
    sort_key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
    T, d, r, N, g = args.tokens, args.hidden, args.rank, args.experts, args.groups
    gen = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device=dev, generator=gen) * scale).to(dtype)

    x = rnd(T, d).requires_grad_()
    A = rnd(r, d, scale=d**-0.5).requires_grad_()
    B = rnd(N, d, r, scale=r**-0.5).requires_grad_()
    W = rnd(g * N, d, scale=d**-0.5).requires_grad_()
    dy = rnd(T, d)

    def step(backend: str) -> None:
        y = mix(x, A, B, W, groups=g, scaling=4.0, backend=backend)
        torch.autograd.backward(y, dy)

    for name in ("cuda", "triton", "torch"):
        ok, why = backends.available(name, dev)
        if not ok:
            print(f"== {name}: unavailable ({why})")
            continue
        for _ in range(3):  # warm-up: JIT compilation, autotuning, allocator
            step(name)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        with profile(activities=[activity]) as prof:
            for _ in range(args.repeats):
                step(name)
            if dev.type == "cuda":
                torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by=sort_key, row_limit=20)
        print(f"== {name}: T={T} d={d} r={r} N={N} g={g} {dtype}, {args.repeats} calls, "
              f"{dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'CPU'})")
        print(table)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"{name}.txt").write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
