"""Adversarial examples from Jacobians: FGSM, JSMA, DeepFool.

    >>> from jacket import attacks
    >>> r = attacks.deepfool(model, x_test, clip=(0, 1))
    >>> r.success_rate, r.mean_perturbation, r.x_adv.shape

Every attack takes a classifier `(batch, *in_shape) -> (batch, classes)` and NumPy inputs, works in
batches on every Keras backend through the public engine (`jacket.vjp`, `jacket.jacobian`), and
returns an `AttackResult`: the adversarial examples, per-sample success and perturbation size. The
names load on first use: importing this package imports no framework.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "fgsm": "._fgsm",
    "jsma": "._jsma",
    "deepfool": "._deepfool",
    "AttackResult": "._result",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from ._deepfool import deepfool as deepfool
    from ._fgsm import fgsm as fgsm
    from ._jsma import jsma as jsma
    from ._result import AttackResult as AttackResult


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'jacket.attacks' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
