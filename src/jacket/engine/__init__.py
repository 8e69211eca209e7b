"""The engine: Jacobians, products and checks of Keras models, written once over the backends.

`jacket.jacobian` and `jacket.jacobian_fn` (in `jacket.api`) route dense calls here; `jvp`, `vjp`
and `check` are the engine's own. How one call flows through the modules: `jacket.engine.jacobian`.
"""

from .check import CheckReport as CheckReport
from .check import check as check
from .jacobian import JacobianFn as JacobianFn
from .jacobian import jacobian as jacobian
from .jacobian import jacobian_fn as jacobian_fn
from .jacobian import tune as tune
from .options import Options as Options
from .products import forward_mode_is_exact as forward_mode_is_exact
from .products import jvp as jvp
from .products import vjp as vjp
from .trials import PlanReport as PlanReport

__all__ = [
    "CheckReport",
    "JacobianFn",
    "Options",
    "PlanReport",
    "check",
    "forward_mode_is_exact",
    "jacobian",
    "jacobian_fn",
    "jvp",
    "tune",
    "vjp",
]
