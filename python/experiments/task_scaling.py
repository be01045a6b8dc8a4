"""(a) Task scaling, 5 -> 10 -> 15 tasks: routing vs naive expert averaging.

The paper (DOTA): multi-task LoRA with naive expert averaging falls from 88.2% at 5 tasks to
2.0% at 15, while routed experts hold. Here: block-level FFN adapters (r = 16, N = 8, g = 1) on a
frozen random tiny Llama, trained on the synthetic permutation tasks of ``common.py`` (chance =
1/32). "Averaging" replaces the router by equal weights (pi = 1/N, router frozen at zero), which
makes the N experts one rank-r LoRA; "routing" learns the router (with the 0.01 balance loss).

Writes task_scaling.md and task_scaling.png to --out (default: results/ beside this file).
Run from the repository root: ``.venv/bin/python python/experiments/task_scaling.py``
(about a minute of CPU on one core: the run time its results file records).
"""

from __future__ import annotations

import argparse
import time

import torch

import common
from mtlora_kernels import MTLoRAConfig


def run(tasks_list, seeds, steps):
    rows = {}
    for n in tasks_list:
        for mode in ("routing", "averaging"):
            accs = []
            for seed in seeds:
                tasks = common.Tasks.make(n, seed=seed)
                cfg = MTLoRAConfig(r=16, num_experts=8, groups=1, alpha=32.0, dropout=0.0)
                model, handle = common.adapted(n, cfg, seed=seed, placement="ffn")
                if mode == "averaging":
                    common.uniform_routing(handle)
                common.train(model, handle, tasks, steps=steps, seed=seed)
                accs.append(common.accuracy(model, tasks))
                print(f"{n:2d} tasks, {mode:9s}, seed {seed}: mean acc "
                      f"{accs[-1].mean():.3f} (worst task {accs[-1].min():.3f})", flush=True)
            rows[n, mode] = torch.stack(accs)  # [seeds, tasks]
    return rows


def main() -> None:
    start = time.perf_counter(), time.process_time()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=common.positive_int, nargs="+", default=[5, 10, 15])
    ap.add_argument("--steps", type=common.positive_int, default=500)
    common.add_common_args(ap)
    args = ap.parse_args()
    args.tasks = sorted(set(args.tasks))  # the x axis of the plot
    out = common.output_dir(ap, args.out)
    info = common.provenance(args)
    common.setup()
    import matplotlib.pyplot as plt

    rows = run(args.tasks, list(range(args.seeds)), args.steps)
    table = [[n, mode, f"{acc.mean():.3f}", f"{acc.mean(1).min():.3f} - {acc.mean(1).max():.3f}",
              f"{acc.min(1).values.mean():.3f}"]
             for (n, mode), acc in rows.items()]
    markdown = (
        "# (a) Task scaling: routing vs naive expert averaging\n\n"
        f"Block-level FFN adapters, r=16, N=8, g=1, {args.steps} Adam steps (lr {common.LR:g}, "
        f"batch {common.BATCH}) on a frozen random 2-layer Llama (d={common.HIDDEN}); "
        f"{args.seeds} seeds; chance = 1/32 = 0.031.\n\n"
        + common.markdown_table(["tasks", "mode", "mean accuracy", "range over seeds",
                                 "worst task (mean over seeds)"], table)
        + common.provenance_markdown(info, start))

    def plot():
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for mode, marker in (("routing", "o"), ("averaging", "s")):
            means = [rows[n, mode].mean().item() for n in args.tasks]
            ax.plot(args.tasks, means, marker=marker, label=mode)
        ax.axhline(1 / common.SYMBOLS, color="gray", ls=":", label="chance")
        ax.set(xlabel="number of tasks", ylabel="mean task accuracy", ylim=(0, 1.05),
               xticks=args.tasks, title="Task scaling (block-level FFN)")
        ax.legend()
        return fig

    common.publish(out, "task_scaling", markdown, plot)


if __name__ == "__main__":
    main()
