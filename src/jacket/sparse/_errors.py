"""The warning and error of the sparse package."""

from __future__ import annotations

from ..errors import JacketError


class SparsityWarning(UserWarning):
    """A sparse Jacobian was computed less sparsely than it could be: a layer without a rule got the
    conservative pattern, or the pattern was too dense to gain from compression."""


class SparsityError(JacketError):
    """A sparsity pattern misses nonzeros of the Jacobian (found by `verify=True`)."""
