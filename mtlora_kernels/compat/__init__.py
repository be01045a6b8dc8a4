"""Other methods' layers, reproduced as they compute, for comparisons and checkpoint loading."""

from mtlora_kernels.compat.hydralora import HydraLoRALayer, hydralora_eager

__all__ = ["HydraLoRALayer", "hydralora_eager"]
