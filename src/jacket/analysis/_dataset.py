"""Norms over a whole dataset, streamed in batches (the padded batch loop of `jacket.batches`): the
Lipschitz estimate, and every sample's Jacobian norms and log-determinants in one pass."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..batches import Batch, Progress, batches
from ..checks import check_flag, check_model, positive_float, positive_int
from ..errors import JacketValueError
from . import _norms
from ._norms import ORDS, LogDet


@dataclass
class Lipschitz:
    """The largest local spectral norm over a dataset (see `jacket.analysis.lipschitz`).

    Attributes:
      value: `max_b ||J_b||_2`, a lower bound on the model's Lipschitz constant (L2 to L2).
      index: Position of the maximizing sample in the dataset.
      x: `in_shape` the maximizing input.
      u: `out_shape`, v: `in_shape`: its top singular vectors (`v` is the input direction that
        moves the output most).
      norms: `(n,)` every sample's spectral norm.
    """

    value: float
    index: int
    x: np.ndarray
    u: np.ndarray
    v: np.ndarray
    norms: np.ndarray


@dataclass
class JacobianNorms:
    """Norms of every sample's Jacobian over a dataset (see `jacket.analysis.jacobian_norms`).

    Attributes:
      values: `{ord: (n,)}`: each sample's norm, for every ord asked, in the order asked.
      errors: `{ord: (n,)}`: as `JacobianNorm.error` (0 where the norm is exact).
      methods: `{ord: method}`: as `JacobianNorm.method`.
      samples: `n`, the samples seen.
      logdet: With `logdet=True`, a `LogDet` of `(n,)` arrays, else None.
      lipschitz: With `lipschitz=True`, the `Lipschitz` estimate over the dataset, else None.
    """

    values: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)
    methods: dict = field(default_factory=dict)
    samples: int = 0
    logdet: LogDet | None = None
    lipschitz: Lipschitz | None = None


def lipschitz(
    model,
    data,
    *,
    batch_size: int | None = 64,
    method: str | None = None,
    tol: float = 1e-6,
    max_iter: int | None = None,
    progress: Progress | None = None,
) -> Lipschitz:
    """The largest local spectral norm `max_b ||J(x_b)||_2` over a dataset, and where it is attained.

    A lower bound on the model's L2 Lipschitz constant, and the inputs where the model is most
    sensitive. Streams `data` in batches; each batch's spectral norms as in `spectral_norm`.

    Args:
      model: A Keras model or layer with one input and one output.
      data: An array `(n, *in_shape)`, or an iterable of arrays (or `(x, y)` pairs).
      batch_size, progress: As in `jacket.analysis.sensitivity`.
      method, tol, max_iter: As in `spectral_norm`.

    Returns:
      A `Lipschitz` with `value`, `index`, `x` (the maximizing input), its singular vectors `u`,
      `v`, and `norms` (every sample's spectral norm).
    """
    fn = "lipschitz"
    check_model(fn, model)
    batch_size = positive_int(fn, "batch_size", batch_size, allow_none=True)
    highest = _Highest(fn, model, method, tol, max_iter)
    stream, total = batches(fn, data, batch_size)
    for part in stream:
        highest.add(part)
        if progress is not None:
            progress(part.stop, total)
    return highest.result()


def jacobian_norms(
    model,
    data,
    ords=("fro", 2),
    *,
    projections: int | None = None,
    logdet: bool = False,
    lipschitz: bool = False,
    batch_size: int | None = 64,
    progress: Progress | None = None,
) -> JacobianNorms:
    """Norms of every sample's Jacobian over a dataset, in one pass of batches: the norms
    `ords`, and on request the log-determinants and the Lipschitz estimate.

    Args:
      model: A Keras model or layer with one input and one output.
      data: An array `(n, *in_shape)`, or an iterable of arrays (or `(x, y)` pairs), as in
        `jacket.analysis.sensitivity`.
      ords: The norms, each "fro", 2 or "nuc" (see `jacobian_norm`).
      projections: Estimate the Frobenius norm from this many random projections
        (`jacobian_norm(..., method="estimate")`) instead of the dense Jacobian.
      logdet: Also each sample's `LogDet` (square Jacobians only; checked on the first batch,
        before any norm is computed).
      lipschitz: Also the `Lipschitz` estimate (see `lipschitz`).
      batch_size, progress: As in `jacket.analysis.sensitivity`.

    Returns:
      A `JacobianNorms`: `values`, `errors` and `methods` per ord, `samples`, `logdet`,
      `lipschitz`.

    Example:
      >>> norms = jacket.analysis.jacobian_norms(model, x_test, ("fro", 2), lipschitz=True)
      >>> norms.values[2].argmax() == norms.lipschitz.index
      True
    """
    fn = "jacobian_norms"
    check_model(fn, model)
    check_flag(fn, "logdet", logdet)
    check_flag(fn, "lipschitz", lipschitz)
    if isinstance(ords, (str, int)):
        ords = (ords,)
    for ord in ords:
        if isinstance(ord, (bool, np.bool_)) or ord not in ORDS:
            raise JacketValueError(
                f"{fn}: each of `ords` must be one of 'fro', 2, 'nuc'. Received: ords={ords!r}."
            )
    ords = list(dict.fromkeys(ords))
    projections = positive_int(fn, "projections", projections, allow_none=True)
    batch_size = positive_int(fn, "batch_size", batch_size, allow_none=True)
    parts: dict = {ord: ([], []) for ord in ords}
    signs, logabs = [], []
    result = JacobianNorms()
    highest = _Highest(fn, model, None, 1e-6, None) if lipschitz else None
    stream, total = batches(fn, data, batch_size)
    for part in stream:
        if logdet:  # first: a non-square model fails before any other work
            det = _norms.logdet(model, part.x)
            signs.append(det.sign[: part.valid])
            logabs.append(det.logabsdet[: part.valid])
        for ord in ords:
            options = {}
            if ord == "fro" and projections is not None:
                options = {"method": "estimate", "n_projections": projections}
            norm = _norms.jacobian_norm(model, part.x, ord, **options)
            parts[ord][0].append(norm.value[: part.valid])
            parts[ord][1].append(norm.error[: part.valid])
            result.methods[ord] = norm.method
        if highest is not None:
            highest.add(part)
        result.samples = part.stop
        if progress is not None:
            progress(part.stop, total)
    if not result.samples:
        raise JacketValueError(
            f"{fn}: `data` has no samples. Received: an empty iterable. Pass at least one sample."
        )
    for ord, (values, errors) in parts.items():
        result.values[ord], result.errors[ord] = np.concatenate(values), np.concatenate(errors)
    if logdet:
        result.logdet = LogDet(sign=np.concatenate(signs), logabsdet=np.concatenate(logabs))
    if highest is not None:
        result.lipschitz = highest.result()
    return result


class _Highest:
    """The largest spectral norm over the batches of a dataset so far, and where it is."""

    def __init__(self, fn: str, model, method, tol, max_iter):
        tol = positive_float(fn, "tol", tol)
        max_iter = positive_int(fn, "max_iter", max_iter, allow_none=True)
        if method is not None and method not in ("exact", "lanczos"):
            raise JacketValueError(
                f"{fn}: `method` must be 'exact', 'lanczos' or None. Received: method={method!r}."
            )
        self.fn, self.model = fn, model
        self.method, self.tol, self.max_iter = method, tol, max_iter
        self.rng = np.random.default_rng(0)
        self.known = None  # the output's shape and dtype, learned on the first batch
        self.norms: list[np.ndarray] = []
        self.best: Lipschitz | None = None

    def add(self, part: Batch) -> None:
        """The spectral norms of one batch's samples (see `spectral_norm`)."""
        from ..operator import JacobianOperator

        op = JacobianOperator(self.model, part.x)
        op._caller = self.fn
        op._out = self.known
        result = _norms._spectral(op, self.method, self.tol, self.max_iter, self.rng)
        self.known = op._out
        values = result.value[: part.valid]
        self.norms.append(values)
        b = int(values.argmax())
        if self.best is None or values[b] > self.best.value:
            self.best = Lipschitz(
                value=float(values[b]),
                index=part.start + b,
                x=part.x[b].copy(),
                u=result.u[b],
                v=result.v[b],
                norms=np.empty(0),
            )

    def result(self) -> Lipschitz:
        if self.best is None:
            raise JacketValueError(
                f"{self.fn}: `data` has no samples. Received: an empty iterable. Pass at least one "
                "sample."
            )
        self.best.norms = np.concatenate(self.norms)
        return self.best
