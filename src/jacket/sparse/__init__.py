"""Sparse per-sample Jacobians: detect the pattern, color it, compress the passes.

    >>> P = jacket.sparsity(model, (64, 64, 1))            # scipy.sparse bool (out_size, in_size)
    >>> S = jacket.jacobian(model, x, sparse=True)         # SparseJacobian: S.pattern, S.values
    >>> S.to_scipy(0), S.to_dense()

A wrapper over the engine. Detection (`_detect`, over the dependency sets of `_deps` and the layer
rules of `_rules`): the dependency structure propagated layer by layer, conservative for layers
without a rule; patterns detected or given are kept per model and shape (`_pattern`). Coloring
(`_color`): greedy, columns for forward mode and rows for reverse mode, the side with fewer colors
taken. Compressed passes (`_compressed`, prepared by `_jacobian`): one batched `jvp` (or `vjp`) of
the engine through the repeated batch, one seed per color, then decompression into
`SparseJacobian` (`_result`). `sparsity` and `verify` (`_sparsity`): the pattern of a model, and a
pattern checked against the Jacobian. Pattern, coloring and seeds are made once per model and input
shape and kept in the engine's per-model state (`jacket.engine.state`), beside the dense plans.
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
from ._pattern import zeros_like_shape
from ._result import SparseJacobian
from ._sparsity import sparsity, verify

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
