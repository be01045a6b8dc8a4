"""The adapter hyper-parameters, one dataclass shared by the layers, attach and save/load."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class MTLoRAConfig:
    """Hyper-parameters of one mtLoRA adapter; defaults are the official code's.

    r: rank of the shared A. num_experts: N up-projections (1 = plain LoRA, no router).
    groups: g routing groups over the output dimensions (1 = HydraLoRA's scalar routing).
    alpha: scaling numerator, s = alpha / r. dropout: on the input of A.
    backend: None (``$MTLORA_BACKEND`` or auto), 'torch', 'triton' or 'cuda'.
    """

    r: int = 16
    num_experts: int = 16
    groups: int = 2
    alpha: float = 64.0
    dropout: float = 0.05
    backend: str | None = None

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"r must be >= 1, got {self.r}")
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if self.groups < 1:
            raise ValueError(f"groups must be >= 1, got {self.groups}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def to_dict(self) -> dict:
        return asdict(self)
