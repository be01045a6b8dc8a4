"""mtlora_kernels: fused kernels and PyTorch tooling for multi-task LoRA (mtLoRA, ICLR 2026)."""

from mtlora_kernels._build_info import build_info
from mtlora_kernels.integrations.hf import attach  # no transformers import: works on model objects
from mtlora_kernels.io import load_adapters, save_adapters
from mtlora_kernels.linalg import randomized_svd
from mtlora_kernels.losses import SpectralRegularizer, auxiliary_loss, balance_loss
from mtlora_kernels.nn import MTLoRAAdapter, MTLoRAConfig, MTLoRALinear
from mtlora_kernels.ops.mix import mix
from mtlora_kernels.reference import mix_reference

__version__ = "0.1.0"

__all__ = ["mix", "mix_reference", "MTLoRAAdapter", "MTLoRALinear", "MTLoRAConfig",
           "attach", "save_adapters", "load_adapters", "randomized_svd", "SpectralRegularizer",
           "auxiliary_loss", "balance_loss", "build_info", "__version__"]
