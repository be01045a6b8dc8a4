"""Operators: each module holds one op's dispatch, autograd Function and torch backend."""

from mtlora_kernels.ops.mix import dropout_keep_mask, mix

__all__ = ["mix", "dropout_keep_mask"]
