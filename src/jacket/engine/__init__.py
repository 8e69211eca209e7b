"""The engine: Jacobians, products and checks of Keras models, written once over the backends.

`jacket.jacobian` and `jacket.jacobian_fn` (in `jacket.api`) route dense calls here; `jvp`, `vjp`
and `check` are the engine's own.
"""

from .api import JacobianFn as JacobianFn
from .api import jacobian as jacobian
from .api import jacobian_fn as jacobian_fn
from .api import jvp as jvp
from .api import vjp as vjp
from .check import CheckReport as CheckReport
from .check import check as check

__all__ = ["CheckReport", "JacobianFn", "check", "jacobian", "jacobian_fn", "jvp", "vjp"]
