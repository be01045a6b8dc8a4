"""The registry of Triton kernels and every launch configuration their launchers can pick.

Each kernel module registers its kernels here at import, with the same configuration list its
launcher draws from, so the kernel report (``mtlora-kernels
kernels``) and the compile tests cover new kernels and configurations automatically.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class KernelConfig:
    """One compiled variant: constexpr values plus launch options."""

    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3

    def label(self) -> str:
        cs = ",".join(f"{k}={v}" for k, v in sorted(self.constexprs.items()))
        return f"{cs},w{self.num_warps},s{self.num_stages}"


@dataclass(frozen=True)
class KernelSpec:
    """A Triton kernel as the compiler sees it.

    name: a stable display name. fn: the ``@triton.jit`` function. signature: argument name ->
    Triton type string for the non-constexpr arguments (``"*bf16"``, ``"i32"``, ``"fp32"``);
    pointer types may contain ``{dtype}``, filled from ``dtypes`` (the first is the primary one:
    CI compiles every configuration in it, the slow tests and the report every dtype).
    configs: every configuration a launcher can pick. uses_dot: the kernel carries a GEMM
    (``tl.dot``) and must compile to tensor-core instructions. cost: optional ``(shape dict) ->
    (flops, bytes)`` for the static roofline estimate at the benchmark shapes. spill_budget:
    bytes of register spill stores a configuration may have on sm_80 / sm_90 before the compile
    tests fail (default 0; a nonzero budget must be justified in ``notes``). accepted_notes:
    substrings of ptxas performance notes the compile tests let pass (default none; each must
    be justified in ``notes``).
    """

    name: str
    fn: object
    signature: dict[str, str]
    configs: tuple[KernelConfig, ...]
    dtypes: tuple[str, ...] = ("bf16",)
    uses_dot: bool = True
    cost: Callable[[dict], tuple[float, float]] | None = None
    notes: str = field(default="")
    spill_budget: int = 0
    accepted_notes: tuple[str, ...] = ()


KERNELS: dict[str, KernelSpec] = {}


def register(spec: KernelSpec) -> KernelSpec:
    """Add ``spec`` (idempotent per name, so module reloads do not duplicate it)."""
    KERNELS[spec.name] = spec
    return spec


def all_kernels() -> list[KernelSpec]:
    """Every registered kernel, after importing every kernel module of the package."""
    import importlib
    import pkgutil

    import mtlora_kernels.triton as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name != "registry":
            importlib.import_module(f"{pkg.__name__}.{mod.name}")
    return list(KERNELS.values())
