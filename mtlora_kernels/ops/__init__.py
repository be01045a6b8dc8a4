"""Operators: each module holds one op's validation, dispatch, autograd and torch backend."""
