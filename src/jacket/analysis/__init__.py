"""What users do with Jacobians: sensitivity, saliency, norms, Lipschitz estimates, log-determinants.

    >>> from jacket import analysis
    >>> analysis.sensitivity(model, x_test).top(5)          # the most influential input features
    >>> analysis.jacobian_norm(model, x, 2).value            # spectral norm per sample
    >>> analysis.lipschitz(model, x_test).index              # where the model is most sensitive
    >>> analysis.jacobian_norms(model, x_test, ("fro", 2)).values["fro"]   # per sample, one pass

Built on the public engine (`jacket.jacobian`, `jvp`, `vjp`), so it runs on every Keras backend.
Results are NumPy arrays in small dataclasses. The names load on first use: importing this package
imports no framework.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "sensitivity": "._sensitivity",
    "Sensitivity": "._sensitivity",
    "saliency": "._sensitivity",
    "Saliency": "._sensitivity",
    "jacobian_norm": "._norms",
    "spectral_norm": "._norms",
    "JacobianNorm": "._norms",
    "lipschitz": "._dataset",
    "Lipschitz": "._dataset",
    "jacobian_norms": "._dataset",
    "JacobianNorms": "._dataset",
    "logdet": "._norms",
    "LogDet": "._norms",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from ._dataset import JacobianNorms as JacobianNorms
    from ._dataset import Lipschitz as Lipschitz
    from ._dataset import jacobian_norms as jacobian_norms
    from ._dataset import lipschitz as lipschitz
    from ._norms import JacobianNorm as JacobianNorm
    from ._norms import LogDet as LogDet
    from ._norms import jacobian_norm as jacobian_norm
    from ._norms import logdet as logdet
    from ._norms import spectral_norm as spectral_norm
    from ._sensitivity import Saliency as Saliency
    from ._sensitivity import Sensitivity as Sensitivity
    from ._sensitivity import saliency as saliency
    from ._sensitivity import sensitivity as sensitivity


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'jacket.analysis' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
