"""What users do with Jacobians: sensitivity, saliency, norms, Lipschitz estimates, log-determinants,
and attribution maps (Grad-CAM, integrated gradients, SmoothGrad, token scores).

    >>> from jacket import analysis
    >>> analysis.sensitivity(model, x_test).top(5)          # the most influential input features
    >>> analysis.jacobian_norm(model, x, 2).value            # spectral norm per sample
    >>> analysis.lipschitz(model, x_test).index              # where the model is most sensitive
    >>> analysis.jacobian_norms(model, x_test, ("fro", 2)).values["fro"]   # per sample, one pass
    >>> analysis.integrated_gradients(model, x, steps=50).attributions     # batched steps
    >>> analysis.gradcam(model, x).map                                     # last conv layer
    >>> analysis.token_attribution(text_model, ids).scores                 # (batch, seq)

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
    "integrated_gradients": "._attribution",
    "IntegratedGradients": "._attribution",
    "smoothgrad": "._attribution",
    "SmoothGrad": "._attribution",
    "gradcam": "._attribution",
    "GradCAM": "._attribution",
    "attribute": "._attribution",
    "Attribution": ".maps",
    "token_attribution": "._tokens",
    "TokenAttribution": "._tokens",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from ._attribution import GradCAM as GradCAM
    from ._attribution import IntegratedGradients as IntegratedGradients
    from ._attribution import SmoothGrad as SmoothGrad
    from ._attribution import attribute as attribute
    from ._attribution import gradcam as gradcam
    from ._attribution import integrated_gradients as integrated_gradients
    from ._attribution import smoothgrad as smoothgrad
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
    from ._tokens import TokenAttribution as TokenAttribution
    from ._tokens import token_attribution as token_attribution
    from .maps import Attribution as Attribution


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'jacket.analysis' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
