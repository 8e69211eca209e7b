"""Input derivatives that are trained on: penalties in a model's loss, on every Keras backend.

    >>> from jacket import training
    >>> reg = training.regularize(model, training.JacobianNorm(0.01))   # shares model's weights
    >>> reg.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    >>> reg.fit(x_train, y_train)                                      # logs jacobian_norm too

Penalties: `JacobianNorm` (Hoffman et al. 2019), `GradientPenalty` (WGAN-GP), `Contractive`
(contractive autoencoders), `PDEResidual` (physics-informed networks), or a `Penalty` of your own.
The functions (`vjp`, `jvp`, `jacobian`, `squared_frobenius`, `hvp`, `laplacian`,
`derivatives`) are differentiable with respect to the weights, inside `model.fit` (through
`regularize`) and inside your own training loop (a `GradientTape`, `jax.grad`, `loss.backward()`).
Unlike `jacket.jacobian` they compile nothing of their own: they run inside the step being traced.
The names load on first use: importing this package imports no framework.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "regularize": "._regularize",
    "Regularized": "._regularize",
    "Penalty": "._penalties",
    "JacobianNorm": "._penalties",
    "GradientPenalty": "._penalties",
    "Contractive": "._penalties",
    "PDEResidual": "._penalties",
    "vjp": "._derivatives",
    "jvp": "._derivatives",
    "jacobian": "._derivatives",
    "squared_frobenius": "._derivatives",
    "hvp": "._derivatives",
    "laplacian": "._derivatives",
    "derivatives": "._derivatives",
    "Derivatives": "._derivatives",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from ._derivatives import Derivatives as Derivatives
    from ._derivatives import derivatives as derivatives
    from ._derivatives import hvp as hvp
    from ._derivatives import jacobian as jacobian
    from ._derivatives import jvp as jvp
    from ._derivatives import laplacian as laplacian
    from ._derivatives import squared_frobenius as squared_frobenius
    from ._derivatives import vjp as vjp
    from ._penalties import Contractive as Contractive
    from ._penalties import GradientPenalty as GradientPenalty
    from ._penalties import JacobianNorm as JacobianNorm
    from ._penalties import PDEResidual as PDEResidual
    from ._penalties import Penalty as Penalty
    from ._regularize import Regularized as Regularized
    from ._regularize import regularize as regularize


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'jacket.training' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
