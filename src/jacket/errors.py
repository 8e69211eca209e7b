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


class JacketMemoryError(JacketError, MemoryError):
    """A request that cannot fit in memory: the result is larger than the memory available, or a
    pass ran out of memory even one seed at a time."""


class JacketWarning(UserWarning):
    """Something the result holds that the caller should know of (a Jacobian that is zero because
    the gradient stops at a non-differentiable operation)."""
