"""The integer and real-number argument checks every public entry point uses, so that they all
agree."""

from __future__ import annotations

import numbers
import operator

import numpy as np
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
    # numpy bools by type: numpy < 2.3 (the newest for Python 3.10 is 2.2) still gives them a
    # deprecated __index__.
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, torch.Tensor)
                                               and (value.dtype == torch.bool or value.dim() > 0)):
        index = None
    else:
        try:
            index = operator.index(value)
        except TypeError:
            index = None
    if index is None:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if minimum is not None and index < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {index}")
    return index


def as_float(value, name: str) -> float:
    """``value`` as a Python float, for the argument ``name`` (a constant: scaling, dropout).

    Real numbers are (Python or numpy ints and floats), and 0-d real tensors that take no
    gradient. Refused with TypeError: bools, strings (``float("0.1")`` would pass), complex
    numbers, tensors of some dimensions, and a tensor that requires grad (its gradient would be
    dropped without a word: the op takes none for a constant)."""
    if isinstance(value, torch.Tensor):
        if value.requires_grad:
            raise TypeError(f"{name} is a constant of the op and takes no gradient; got a tensor "
                            f"that requires grad (learn a scale in the weights instead)")
        if value.dim() == 0 and not (value.dtype == torch.bool or value.is_complex()):
            return float(value)
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
