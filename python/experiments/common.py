"""Shared pieces of the experiments: synthetic multi-task data, a frozen tiny Llama, training.

The tasks: task t is a fixed random permutation perm_t of K symbols. An example is the two
tokens ``[TASK_t, x]`` and the answer is ``perm_t(x)``, read from the frozen LM head at the last
position. The same x needs a different answer in every task, so the tasks conflict by
construction, and the task is known only through the first token: the adapters must route on
it (through the frozen attention, which mixes the task token into the last position).
"""

from __future__ import annotations

import dataclasses
import time

import torch
from torch import nn

from mtlora_kernels import MTLoRAConfig, attach

SYMBOLS = 32  # K: the answer space; tokens 0..K-1 are symbols, K.. are task tokens


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


def frozen_llama(n_tasks: int, d: int = 64, layers: int = 2, seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=SYMBOLS + n_tasks, hidden_size=d, intermediate_size=2 * d,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=8)
    return LlamaForCausalLM(cfg)


def answer_logits(model, ids):
    return model(ids).logits[:, -1, :SYMBOLS]


def train(model, handle, tasks: Tasks, steps: int, batch: int = 128, lr: float = 1e-2,
          seed: int = 0, aux: bool = True) -> float:
    """Adam on the adapters; returns seconds taken."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in handle.parameters() if p.requires_grad], lr=lr)
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        ids, y, _ = tasks.batch(batch, g)
        loss = nn.functional.cross_entropy(answer_logits(model, ids), y)
        if aux:
            loss = loss + handle.aux_loss(spectral_weight=0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - start


@torch.no_grad()
def accuracy(model, tasks: Tasks, per_task: int = 256, seed: int = 1) -> torch.Tensor:
    """Per-task accuracy on fresh examples [n_tasks]."""
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


def publish(name: str, markdown: str, fig) -> None:
    """Write results/<name>.md and results/<name>.png (the figure at 120 dpi), print the table."""
    from pathlib import Path

    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / f"{name}.md").write_text(markdown)
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=120)
    print(markdown)


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def setup(threads: int = 1) -> None:
    """One thread (the stated budget: a few minutes on one core) and a headless plot backend."""
    import matplotlib

    matplotlib.use("Agg")
    torch.set_num_threads(threads)
