"""`sparsity`, and sparse Jacobians by compressed passes through `jacket.jvp` / `jacket.vjp`.

NOTE: [Compressed passes]
With a coloring of the pattern's columns (no two columns of one color share a row), one JVP whose
tangent is the sum of the one-hot columns of a color gives every entry of those columns: row `i` of
the result is `J[i, j]` for the only column `j` of that color that row `i` has. Reverse mode colors
the rows and pulls back sums of one-hot rows. All colors go through one call: the batch is repeated
once per color (`(colors * batch, *in_shape)`, color-major) next to the matching seeds, so one
compiled JVP (VJP) of batch `colors * batch` replaces `in_size` (`out_size`) dense passes; the
colors are split into chunks of equal size only when that batch would not fit `memory_budget`.

That samples do not interact (what makes the repeated batch right) is checked by the engine's
coupling probe once per batch size: on the repeated batch itself while it is small (no second
compiled signature), else on the batch as given through `jacket.vjp` (probing a large repeated
batch would cost `2 log2(colors * batch)` passes of it), the repeated batch then pushed with
`per_sample=False`. In training mode the Jacobian is computed densely (each compressed pass is a
call of the model of its own, which could draw its own dropout mask), with a `SparsityWarning`.
The pattern, the coloring and the seeds are made once per model, input signature and options, and
kept with the model.
"""

from __future__ import annotations

import scipy.sparse as sp

from ..checks import check_model
from ..engine import Options
from ..engine.inputs import Inputs
from ..engine.point import resolve
from ..engine.state import activation_size, state_of
from ..errors import JacketTypeError, JacketValueError
from ._compressed import CompressedPasses, SparsePlan
from ._pattern import Detected, detection, outputs, pattern_key, user_pattern
from ._result import SparseJacobian


def jacobian_fn(model, *, sparsity=None, **options) -> SparseJacobianFn:
    """A prepared sparse Jacobian: `jacket.jacobian_fn(model, sparse=True, **options)`.

    Options as in `jacket.jacobian` (`mode`: "auto" compresses the side with fewer colors,
    "forward" the columns, "reverse" the rows; `chunk_size`: colors per pass; `wrt`, `of`: the
    model's cut between layers), and `sparsity`: a known pattern `(out_size, in_size)` (scipy
    sparse or NumPy) instead of the detected one.
    """
    return prepared("jacobian_fn", model, sparsity=sparsity, **options)


class SparseJacobianFn:
    """`jacket.jacobian(model, x, sparse=True, **options)` as a reusable callable."""

    def __init__(self, fn_name: str, model, pattern, options: Options, wrt=None, of=None):
        self.fn_name = fn_name
        self.model = model
        self.pattern = pattern  # the caller's pattern, or None to detect
        self.options = options
        self.wrt, self.of = wrt, of

    def _resolve(self, x, check_finite: bool = True):
        """The model (or its cut between `wrt` and `of`) and its inputs at `x`."""
        return resolve(
            self.fn_name, self.model, x, self.wrt, self.of, self.options.training,
            check_finite=check_finite,
        )  # fmt: skip

    def __call__(self, x) -> SparseJacobian:
        target, inputs = self._resolve(x)
        return self.passes(inputs, target).run(self.fn_name, target, inputs, self.options)

    def plan(self, x) -> SparsePlan:
        """What this callable does for inputs like `x` (detecting and coloring if not done yet)."""
        target, inputs = self._resolve(x, check_finite=False)
        return self.passes(inputs, target).plan(inputs.batch, self.options)

    def passes(self, inputs: Inputs, target=None) -> CompressedPasses:
        """The pattern, its coloring and the seeds for these input shapes (made once, kept in
        the state of the model, or of its cut)."""
        target = self.model if target is None else target
        training = self.options.training
        pattern_key_ = "detected" if self.pattern is None else pattern_key(self.pattern)
        key = ("sparse", "passes", inputs.signature[1], pattern_key_, self.options.mode)
        cache = state_of(target, training).wrappers
        found = cache.get(key)
        if found is None:
            if self.pattern is None:
                detected = detection(self.fn_name, target, inputs, training)
            else:
                y_structure, out_leaves = outputs(self.fn_name, target, inputs, training)
                pattern = user_pattern(self.fn_name, self.pattern, inputs, out_leaves)
                # the activations from the model's graph, where it has one: they size the passes
                # within `memory_budget` (a pattern given as it is says nothing of them)
                activations = activation_size(target)
                detected = Detected(pattern, y_structure, out_leaves, activations, 0.0)
            found = cache[key] = CompressedPasses(detected, inputs, self.options.mode, training)
        return found

    def __repr__(self) -> str:
        return f"SparseJacobianFn({type(self.model).__name__}, {self.options})"


def prepared(
    fn_name: str,
    model,
    *,
    sparsity=None,
    wrt=None,
    of=None,
    mode: str = "auto",
    chunk_size: int | None = None,
    flatten: bool = False,
    per_sample: bool = True,
    training: bool = False,
    memory_budget: int | str | None = None,
) -> SparseJacobianFn:
    """The sparse form of `jacket.jacobian` / `jacobian_fn` (their `sparse=True` or `sparsity=`)."""
    check_model(fn_name, model)
    checked = Options.checked(
        fn_name, mode, chunk_size, flatten, per_sample, training, memory_budget
    )
    if not per_sample:
        raise JacketValueError(
            f"{fn_name}: sparse Jacobians are per sample. Received: per_sample=False with "
            "sparse=True (or a `sparsity` pattern). Drop `per_sample=False`, or drop sparse=True "
            "for the full cross-sample Jacobian."
        )
    if sparsity is not None and not (sp.issparse(sparsity) or hasattr(sparsity, "shape")):
        raise JacketTypeError(
            f"{fn_name}: `sparsity` must be a scipy.sparse matrix or a 2-D array "
            f"`(out_size, in_size)`, e.g. from `jacket.sparsity`. Received: "
            f"{type(sparsity).__name__}."
        )
    return SparseJacobianFn(fn_name, model, sparsity, checked, wrt, of)
