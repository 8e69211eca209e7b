"""The library's own errors: one base class, and the two Python kinds users already catch."""

from __future__ import annotations


class JacketError(Exception):
    """Base class of every error jacket raises on purpose."""


class JacketValueError(JacketError, ValueError):
    """A value or shape that jacket cannot use (a wrong shape, NaN in `x`, an unknown option)."""


class JacketTypeError(JacketError, TypeError):
    """A value of the wrong type (integer model inputs, complex or string arrays, a non-model)."""


class CouplingError(JacketValueError):
    """The model mixes samples of a batch, so per-sample Jacobians would be wrong."""
