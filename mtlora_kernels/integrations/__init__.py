"""Integrations with model libraries. Nothing here imports the library it integrates with at
import time: :mod:`mtlora_kernels.integrations.hf` works on the model objects it is given."""
