"""The one integer-argument check every public entry point uses, so that they all agree."""

from __future__ import annotations

import operator

import torch


def as_int(value, name: str, *, minimum: int | None = None) -> int:
    """``value`` as a Python int, for the argument ``name``.

    Anything with ``__index__`` is an integer (numpy integers, 0-d integer tensors), as for
    ``range`` and indexing; the result is a plain int, so it can go to JSON and never becomes
    a tensor in later arithmetic. Bools (Python, numpy or tensor) are refused: ``True`` as a
    rank or a layer index is a mistake, not a 1. A tensor of one element but some dimensions
    is refused too, as numpy refuses such arrays. TypeError for a non-integer, ValueError for
    an integer below ``minimum``.
    """
    if isinstance(value, bool) or (isinstance(value, torch.Tensor)
                                   and (value.dtype == torch.bool or value.dim() > 0)):
        index = None
    else:
        try:
            index = operator.index(value)  # numpy bools have no __index__: refused here
        except TypeError:
            index = None
    if index is None:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if minimum is not None and index < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {index}")
    return index
