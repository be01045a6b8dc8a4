"""Shared pieces of the experiments: synthetic multi-task data, a frozen tiny Llama, training.

The tasks: task t is a fixed random permutation perm_t of K symbols. An example is the two
tokens ``[TASK_t, x]`` and the answer is ``perm_t(x)``, read from the frozen LM head at the last
position. The same x needs a different answer in every task, so the tasks conflict by
construction, and the task is known only through the first token: the adapters must route on
it (through the frozen attention, which mixes the task token into the last position).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import mtlora_kernels
from mtlora_kernels import MTLoRAConfig, attach

SYMBOLS = 32  # K: the answer space; tokens 0..K-1 are symbols, K.. are task tokens
HIDDEN = 64  # d of frozen_llama: the block-level adapters' d_out, which groups must divide
BATCH, LR = 128, 1e-2  # Adam's batch and learning rate in every experiment
EVAL_SEED = 1  # accuracy's generator seed (training batches use the run's seed)
RESULTS = Path(__file__).resolve().parent / "results"


@dataclasses.dataclass
class Tasks:
    perms: torch.Tensor  # [n_tasks, K]

    @classmethod
    def make(cls, n_tasks: int, seed: int = 0) -> "Tasks":
        g = torch.Generator().manual_seed(seed)
        return cls(torch.stack([torch.randperm(SYMBOLS, generator=g) for _ in range(n_tasks)]))

    @property
    def n(self) -> int:
        return self.perms.shape[0]

    def batch(self, size: int, g: torch.Generator, task: int | None = None):
        t = (torch.randint(0, self.n, (size,), generator=g) if task is None
             else torch.full((size,), task))
        x = torch.randint(0, SYMBOLS, (size,), generator=g)
        ids = torch.stack([SYMBOLS + t, x], 1)
        return ids, self.perms[t, x], t


def frozen_llama(n_tasks: int, d: int = HIDDEN, layers: int = 2, seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=SYMBOLS + n_tasks, hidden_size=d, intermediate_size=2 * d,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=8)
    return LlamaForCausalLM(cfg)


def answer_logits(model, ids):
    return model(ids).logits[:, -1, :SYMBOLS]


class Trainer:
    """Adam on the adapters (task loss + the balance term of ``aux_loss``, no spectral term).

    One optimizer and one data generator for the whole run: training in segments, with
    measurements in between (gradient_conflict), continues the same run as training straight
    through would, instead of restarting Adam's moments at every segment.
    """

    def __init__(self, model, handle, tasks: Tasks, batch: int = BATCH, lr: float = LR,
                 seed: int = 0, aux: bool = True) -> None:
        self.model, self.handle, self.tasks, self.batch, self.aux = model, handle, tasks, batch, aux
        self.g = torch.Generator().manual_seed(seed)
        self.opt = torch.optim.Adam([p for p in handle.parameters() if p.requires_grad], lr=lr)
        self.steps = 0

    def run(self, steps: int) -> float:
        """``steps`` more steps; returns seconds taken."""
        self.model.train()  # a measurement in between may have left it in eval mode
        start = time.perf_counter()
        for _ in range(steps):
            ids, y, _ = self.tasks.batch(self.batch, self.g)
            loss = nn.functional.cross_entropy(answer_logits(self.model, ids), y)
            if self.aux:
                loss = loss + self.handle.aux_loss(spectral_weight=0.0)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        self.steps += steps
        return time.perf_counter() - start


def train(model, handle, tasks: Tasks, steps: int, seed: int = 0, **kwargs) -> float:
    """``steps`` steps of a fresh :class:`Trainer`; returns seconds taken."""
    return Trainer(model, handle, tasks, seed=seed, **kwargs).run(steps)


@torch.no_grad()
def accuracy(model, tasks: Tasks, per_task: int = 256, seed: int = EVAL_SEED) -> torch.Tensor:
    """Per-task accuracy [n_tasks] on ``per_task`` examples of each task.

    Not a held-out split: a task has only SYMBOLS (32) inputs and training sees all of them.
    The examples are resampled (with replacement) from a generator seeded with ``seed``, not the
    training seed, so this measures how well each task's map was learnt.
    """
    model.eval()
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in range(tasks.n):
        ids, y, _ = tasks.batch(per_task, g, task=t)
        out.append((answer_logits(model, ids).argmax(-1) == y).float().mean())
    return torch.stack(out)


def uniform_routing(handle) -> None:
    """Naive expert averaging: router weights zero and frozen, so pi = 1/N everywhere."""
    for a in handle.adapters.values():
        if a.lora_route is not None:
            nn.init.zeros_(a.lora_route)
            a.lora_route.requires_grad_(False)


def adapted(n_tasks: int, config: MTLoRAConfig, seed: int = 0, **where):
    model = frozen_llama(n_tasks, seed=seed)
    return model, attach(model, config, **where)


def publish(out: Path, name: str, markdown: str, plot) -> None:
    """Write <out>/<name>.md and print it, then <out>/<name>.png from ``plot()`` (a figure, saved
    at 120 dpi). The table goes first so that a failing plot cannot lose it."""
    (out / f"{name}.md").write_text(markdown)
    print(markdown, flush=True)
    fig = plot()
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=120)


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a bad value is a usage error before any work)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_common_args(ap: argparse.ArgumentParser, seeds: int = 2) -> None:
    ap.add_argument("--seeds", type=positive_int, default=seeds,
                    help="runs 0 .. SEEDS-1 (data, model and training seeds)")
    ap.add_argument("--out", type=Path, default=RESULTS,
                    help=f"directory for the .md and .png (default: {RESULTS})")


def output_dir(ap: argparse.ArgumentParser, out: Path) -> Path:
    """Create ``out`` and check that a file can be written there, before any training: a bad
    --out found after minutes of training would lose the results."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out):
            pass
    except OSError as e:
        ap.error(f"--out {out}: not a writable directory ({e})")
    return out


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), *args],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def machine() -> str:
    """The CPU the run computed on, by name. A run is deterministic on one machine, not across
    CPUs: the same code and seeds gave other numbers after a few hundred steps on another CPU."""
    name = None
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name")), None)
    except OSError:
        pass
    return (f"{name or platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"{platform.system()}")


def provenance(args: argparse.Namespace, extra: dict[str, str] | None = None) -> dict[str, str]:
    """What a results file needs to be traced and re-run; taken at the start of the run (the
    commit is the code that ran, +dirty if the working tree had changes then)."""
    commit = _git("rev-parse", "--short", "HEAD")
    if commit is not None and _git("status", "--porcelain"):
        commit += "+dirty"
    info = {
        # As run, with the environment variables that choose the package and threads.
        "command": shlex.join([f"{k}={os.environ[k]}" for k in ("PYTHONPATH", "OMP_NUM_THREADS")
                               if k in os.environ] + [sys.executable, *sys.argv]),
        "working directory": os.getcwd(),
        "arguments (defaults filled in)": ", ".join(
            f"{k}={' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items() if k != "out"),
        "seeds": ", ".join(str(s) for s in range(args.seeds))
                 + " (task permutations, frozen model and adapter init, training batches)",
        "evaluation seed": f"{EVAL_SEED} (accuracy: 256 examples per task, resampled from the "
                           "32 inputs every task trains on, not a held-out split)",
        "optimizer": f"Adam, lr {LR:g}, batch {BATCH}; loss = cross-entropy + "
                     "aux_loss(balance 0.01, spectral 0)",
    }
    info.update(extra or {})
    info.update({
        "machine": machine(),
        "mtlora_kernels": f"{mtlora_kernels.__version__}, git commit {commit or 'unknown'}",
        "torch": f"{torch.__version__}, {torch.get_num_threads()} thread(s); "
                 f"Python {platform.python_version()}",
        "date (UTC)": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
    })
    return info


def provenance_markdown(info: dict[str, str], start: tuple[float, float]) -> str:
    """The provenance as a markdown list, with the wall and CPU seconds since ``start``
    (``(time.perf_counter(), time.process_time())`` at the start of the run)."""
    wall, cpu = time.perf_counter() - start[0], time.process_time() - start[1]
    lines = [f"- {k}: `{v}`" if k == "command" else f"- {k}: {v}" for k, v in info.items()]
    lines.append(f"- run time: {wall:.0f} s wall, {cpu:.0f} s CPU")
    return "\n## Provenance\n\n" + "\n".join(lines) + "\n"


def setup(threads: int = 1) -> None:
    """One thread (the stated budget: a few minutes on one core) and a headless plot backend."""
    import matplotlib

    matplotlib.use("Agg")
    torch.set_num_threads(threads)
