"""(c) Fine-grained routing: g = 1 (one weight per expert, HydraLoRA) vs g > 1 groups.

The paper: giving each expert a weight per group of output dimensions adds expressive power
(it helps the reasoning benchmarks; on DOTA it can hurt). Here: 15 synthetic permutation tasks,
block-level FFN adapters with fewer experts than tasks (N = 4, r = 8), so that scalar routing
cannot give each task its own expert; g = 1, 2, 8, 64 (= d: per-dimension routing). The router
grows by d*N*(g-1) parameters, so two controls spend those parameters on more experts instead:
g = 1 with N = 7 (9,088 parameters, vs 9,216 for g = 8) and N = 32 (37,888, as g = 64).

Writes routing_groups.md and routing_groups.png to --out (default: results/ beside this file).
Run from the repository root: ``.venv/bin/python python/experiments/routing_groups.py``
(about a minute of CPU on one core: the run time its results file records).
"""

from __future__ import annotations

import argparse
import time

import torch

import common
from mtlora_kernels import MTLoRAConfig


def main() -> None:
    start = time.perf_counter(), time.process_time()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=common.positive_int, default=15)
    ap.add_argument("--groups", type=common.positive_int, nargs="+", default=[1, 2, 8, 64],
                    help=f"routing groups at N = 4; each must divide d = {common.HIDDEN}")
    ap.add_argument("--controls", type=common.positive_int, nargs="*", default=[7, 32],
                    help="numbers of experts for g = 1 runs matching the larger g's parameters")
    ap.add_argument("--steps", type=common.positive_int, default=400)
    common.add_common_args(ap)
    args = ap.parse_args()
    bad = [g for g in args.groups if common.HIDDEN % g]
    if bad:
        ap.error(f"--groups {' '.join(map(str, bad))}: must divide d = {common.HIDDEN}")
    out = common.output_dir(ap, args.out)
    info = common.provenance(args)
    common.setup()
    import matplotlib.pyplot as plt

    results = {}
    # dict.fromkeys: once each, in order (a control N = 4 is the g = 1 run itself).
    runs = list(dict.fromkeys([(g, 4) for g in args.groups] + [(1, n) for n in args.controls]))
    for g, n_exp in runs:
        accs, params = [], 0
        for seed in range(args.seeds):
            tasks = common.Tasks.make(args.tasks, seed=seed)
            cfg = MTLoRAConfig(r=8, num_experts=n_exp, groups=g, alpha=16.0, dropout=0.0)
            model, handle = common.adapted(args.tasks, cfg, seed=seed, placement="ffn")
            common.train(model, handle, tasks, steps=args.steps, seed=seed)
            accs.append(common.accuracy(model, tasks))
            params = handle.num_parameters()
            print(f"g = {g:2d}, N = {n_exp:2d}, seed {seed}: mean acc {accs[-1].mean():.3f} "
                  f"(worst task {accs[-1].min():.3f})", flush=True)
        results[g, n_exp] = (torch.stack(accs), params)
    table = [[g, n, f"{p:,}", f"{acc.mean():.3f}",
              f"{acc.mean(1).min():.3f} - {acc.mean(1).max():.3f}",
              f"{acc.min(1).values.mean():.3f}"] for (g, n), (acc, p) in results.items()]
    markdown = (
        "# (c) Routing groups: g = 1 vs g > 1\n\n"
        f"{args.tasks} tasks, block-level FFN, r=8, {args.steps} Adam steps (lr {common.LR:g}, "
        f"batch {common.BATCH}), frozen random 2-layer Llama (d={common.HIDDEN}), "
        f"{args.seeds} seeds; chance = 0.031.\n\n"
        + common.markdown_table(["g", "N", "adapter params", "mean accuracy",
                                 "range over seeds", "worst task (mean over seeds)"], table)
        + common.provenance_markdown(info, start))

    def plot():
        fig, ax = plt.subplots(figsize=(5, 3.5))
        # The controls' curve starts from g = 1, N = 4 when that was run; the point is labelled
        # once (it is on both curves).
        controls = [(1, 4)] * ((1, 4) in results) + [(1, n) for n in args.controls if n != 4]
        labelled = set()
        for label, keys, dy in (("N = 4, g varies", [(g, 4) for g in args.groups], 6),
                                ("g = 1, N varies (parameter controls)", controls, -12)):
            keys = list(dict.fromkeys(keys))
            if not keys:
                continue
            ax.errorbar([results[k][1] for k in keys],
                        [results[k][0].mean().item() for k in keys],
                        yerr=[results[k][0].mean(1).std().item() if args.seeds > 1 else 0
                              for k in keys], marker="o", capsize=3, label=label)
            for k in keys:
                if k not in labelled:
                    labelled.add(k)
                    ax.annotate(f"g={k[0]}, N={k[1]}",
                                (results[k][1], results[k][0].mean().item()),
                                fontsize=7, textcoords="offset points", xytext=(-20, dy))
        ax.set(xlabel="adapter parameters", ylabel="mean task accuracy", ylim=(0, 1.05),
               xscale="log", title=f"Fine-grained routing, {args.tasks} tasks")
        ax.legend(fontsize=8, loc="lower right")
        return fig

    common.publish(out, "routing_groups", markdown, plot)


if __name__ == "__main__":
    main()
