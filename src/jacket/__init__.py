"""jacket: Jacobians for Keras.

    >>> import jacket
    >>> J = jacket.jacobian(model, x)   # (batch, *out_shape, *in_shape)

The public names are loaded on first use, so `import jacket` does not import Keras: the command line can
still choose the Keras backend (`jacket --backend jax ...`) after `import jacket`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# name -> module that defines it
_EXPORTS = {
    "jacobian": ".api",
    "jacobian_fn": ".api",
    "JacobianFn": ".engine",
    "jvp": ".engine",
    "vjp": ".engine",
    "check": ".engine",
    "CheckReport": ".engine",
    "PlanReport": ".engine",
    "tune": ".engine",
    "JacketError": ".errors",
    "JacketValueError": ".errors",
    "JacketTypeError": ".errors",
    "CouplingError": ".errors",
    "JacketMemoryError": ".errors",
    "JacketWarning": ".errors",
    "JacobianOperator": ".operator",
    "sparsity": ".sparse",
    "SparseJacobian": ".sparse",
    "SparsityWarning": ".sparse",
}
# subpackages reachable as attributes (`jacket.analysis.sensitivity`), also loaded on first use
# (each imports its framework only when first used; `import jacket` itself imports none)
_SUBPACKAGES = (
    "analysis",
    "attacks",
    "distributed",
    "engine",
    "io",
    "operator",
    "plot",
    "sparse",
)

__all__ = sorted(_EXPORTS) + list(_SUBPACKAGES) + ["__version__"]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .api import jacobian as jacobian
    from .api import jacobian_fn as jacobian_fn
    from .engine import CheckReport as CheckReport
    from .engine import JacobianFn as JacobianFn
    from .engine import PlanReport as PlanReport
    from .engine import check as check
    from .engine import jvp as jvp
    from .engine import tune as tune
    from .engine import vjp as vjp
    from .errors import CouplingError as CouplingError
    from .errors import JacketError as JacketError
    from .errors import JacketMemoryError as JacketMemoryError
    from .errors import JacketTypeError as JacketTypeError
    from .errors import JacketValueError as JacketValueError
    from .errors import JacketWarning as JacketWarning
    from .operator import JacobianOperator as JacobianOperator
    from .sparse import SparseJacobian as SparseJacobian
    from .sparse import SparsityWarning as SparsityWarning
    from .sparse import sparsity as sparsity


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'jacket' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
