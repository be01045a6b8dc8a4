"""Drop-in modules: the block-level adapter, the Linear wrapper and their config."""

from mtlora_kernels.nn.adapter import MTLoRAAdapter, MTLoRALinear
from mtlora_kernels.nn.config import MTLoRAConfig

__all__ = ["MTLoRAAdapter", "MTLoRALinear", "MTLoRAConfig"]
