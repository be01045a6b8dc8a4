"""The adapter hyper-parameters, one dataclass shared by the layers, attach and save/load."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from mtlora_kernels._checks import as_float, as_int
from mtlora_kernels.ops.mix import BACKEND_NAMES


@dataclass
class MTLoRAConfig:
    """Hyper-parameters of one mtLoRA adapter; defaults are the official experiment scripts'
    settings (r 16, N 16, alpha 64, dropout 0.05, routing group size 2048, i.e. g = 2 at d = 4096;
    the released train.py's own argument defaults are smaller).

    r: rank of the shared A. num_experts: N up-projections (1 = plain LoRA, no router).
    groups: g routing groups over the output dimensions (1 = HydraLoRA's scalar routing).
    alpha: scaling numerator, s = alpha / r. dropout: on the input of A.
    backend: None (``$MTLORA_BACKEND``, else 'auto'), 'auto', 'torch', 'triton' or 'cuda'.
    """

    r: int = 16
    num_experts: int = 16
    groups: int = 2
    alpha: float = 64.0
    dropout: float = 0.05
    backend: str | None = None

    def __post_init__(self) -> None:
        # numpy scalars are accepted and stored as Python numbers (the config goes to JSON).
        for name in ("r", "num_experts", "groups"):
            setattr(self, name, as_int(getattr(self, name), name, minimum=1))
        for name in ("alpha", "dropout"):
            setattr(self, name, as_float(getattr(self, name), name))
        if not math.isfinite(self.alpha):
            raise ValueError(f"alpha must be finite, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.backend is not None and self.backend not in BACKEND_NAMES:
            raise ValueError(f"backend must be None or one of {BACKEND_NAMES}, got "
                             f"{self.backend!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def to_dict(self) -> dict:
        return asdict(self)
