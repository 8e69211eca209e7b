"""The engine: Jacobians, products and checks of Keras models, written once over the backends.

`jacket.jacobian` and `jacket.jacobian_fn` (in `jacket.api`) route dense calls here; `jvp`, `vjp`
and `check` are the engine's own, and so are the second-order functions `hessian`, `hvp`, `laplacian`
and `divergence`. How one call flows through the modules: `jacket.engine.jacobian`.
"""

from .check import CheckReport as CheckReport
from .check import check as check
from .cut import graph_layers as graph_layers
from .divergence import divergence as divergence
from .estimates import Estimate as Estimate
from .hessian import hessian as hessian
from .hessian import hvp as hvp
from .jacobian import JacobianFn as JacobianFn
from .jacobian import jacobian as jacobian
from .jacobian import jacobian_fn as jacobian_fn
from .jacobian import tune as tune
from .laplacian import laplacian as laplacian
from .options import Options as Options
from .point import Point as Point
from .point import at as at
from .products import forward_mode_is_exact as forward_mode_is_exact
from .products import jvp as jvp
from .products import value_and_vjp as value_and_vjp
from .products import vjp as vjp
from .trials import PlanReport as PlanReport

__all__ = [
    "CheckReport",
    "Estimate",
    "JacobianFn",
    "Options",
    "PlanReport",
    "Point",
    "at",
    "check",
    "divergence",
    "forward_mode_is_exact",
    "graph_layers",
    "hessian",
    "hvp",
    "jacobian",
    "jacobian_fn",
    "jvp",
    "laplacian",
    "tune",
    "value_and_vjp",
    "vjp",
]
