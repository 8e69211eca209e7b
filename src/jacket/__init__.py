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
    "jacobian": "._api",
    "jacobian_fn": "._api",
    "JacobianFn": "._api",
    "jvp": "._api",
    "vjp": "._api",
    "check": "._check",
    "CheckReport": "._check",
    "JacketError": "._errors",
    "JacketValueError": "._errors",
    "JacketTypeError": "._errors",
    "CouplingError": "._errors",
    "JacketMemoryError": "._errors",
    "JacketWarning": "._errors",
    "JacobianOperator": ".operator",
    "sparsity": ".sparse",
    "SparseJacobian": ".sparse",
    "SparsityWarning": ".sparse",
}
# subpackages reachable as attributes (`jacket.analysis.sensitivity`), also loaded on first use
_SUBPACKAGES = ("analysis", "attacks")

__all__ = sorted(_EXPORTS) + list(_SUBPACKAGES) + ["__version__"]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from ._api import JacobianFn as JacobianFn
    from ._api import jacobian as jacobian
    from ._api import jacobian_fn as jacobian_fn
    from ._api import jvp as jvp
    from ._api import vjp as vjp
    from ._check import CheckReport as CheckReport
    from ._check import check as check
    from ._errors import CouplingError as CouplingError
    from ._errors import JacketError as JacketError
    from ._errors import JacketMemoryError as JacketMemoryError
    from ._errors import JacketTypeError as JacketTypeError
    from ._errors import JacketValueError as JacketValueError
    from ._errors import JacketWarning as JacketWarning
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
