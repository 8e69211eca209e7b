"""Sparse per-sample Jacobians: detect the pattern, color it, compress the passes.

    >>> P = jacket.sparsity(model, (64, 64, 1))            # scipy.sparse bool (out_size, in_size)
    >>> S = jacket.jacobian(model, x, sparse=True)         # SparseJacobian: S.pattern, S.values
    >>> S.to_scipy(0), S.to_dense()

Detection (`_detect`): the dependency structure propagated layer by layer, conservative for layers
without a rule. Coloring (`_color`): greedy, columns for forward mode and rows for reverse mode, the
side with fewer colors taken. Compressed passes (`_compressed`, prepared in `_jacobian`): one batched `jacket.jvp` (or `vjp`)
through the repeated batch with one seed per color, then decompression into `SparseJacobian`.
Pattern, coloring and seeds are made once per model and input shape and kept in the engine's
per-model state (`jacket.engine.state`), beside the dense plans. `verify` (`_verify`) checks a
pattern against the Jacobian at random points.
"""

from __future__ import annotations

try:
    import scipy.sparse  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on what is installed
    from ..errors import JacketError

    raise JacketError(
        f'jacket.sparse needs SciPy: pip install "jacket[sparse]" ({error})'
    ) from error

from ._color import color, is_valid
from ._errors import SparsityError, SparsityWarning
from ._jacobian import SparseJacobianFn, SparsePlan, jacobian_fn, prepared
from ._pattern import sparsity, zeros_like_shape
from ._result import SparseJacobian
from ._verify import verify

__all__ = [
    "SparseJacobian",
    "SparseJacobianFn",
    "SparsePlan",
    "SparsityError",
    "SparsityWarning",
    "color",
    "is_valid",
    "jacobian_fn",
    "prepared",
    "sparsity",
    "verify",
    "zeros_like_shape",
]
