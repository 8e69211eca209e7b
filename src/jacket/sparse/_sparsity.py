"""`sparsity` and `verify`: the pattern of a model's per-sample Jacobian, and a pattern checked
against the Jacobian at random points."""

from __future__ import annotations

import math
import warnings
from typing import Any

import keras
import numpy as np
import scipy.sparse as sp

from ..checks import check_flag, check_model, positive_int
from ..engine import jacobian, jvp, vjp
from ..engine.inputs import Inputs, numpy_dtype, prepare_inputs
from ..errors import JacketTypeError
from ..trees import flat_matrix, pack, to_numpy
from ._errors import SparsityError, SparsityWarning
from ._jacobian import prepared
from ._pattern import detection, outputs, user_pattern, zeros_like_shape

# `verify` compares with the dense Jacobian up to this many entries (all samples), else it probes
VERIFY_DENSE_ENTRIES = 1 << 22


def sparsity(model, input_shape, *, verify: bool = False, training: bool = False) -> sp.csr_array:
    """The sparsity pattern of `model`'s per-sample Jacobian, found from its layers.

    The dependency structure is propagated layer by layer (convolutions with their strides,
    dilation and padding, pooling, up-sampling, padding and cropping, normalisations, Dense,
    merges, reshapes; see `jacket.sparse._detect`). A layer without a rule gets a conservative
    one (each of its outputs depends on all of its inputs), so the pattern never misses a nonzero;
    `SparsityWarning` says where that happened. The pattern depends on the architecture only, not
    on the weights, and is kept with the model for each input shape.

    Args:
      model: A Keras model or layer (Sequential and Functional models are followed layer by
        layer; a subclassed model or a plain function gets the dense pattern, with a warning).
      input_shape: The per-sample input shape, without the batch axis, e.g. `(32, 32, 1)`; a list
        or dict of shapes for a model with several inputs.
      verify: Also check the pattern at two random points: against the dense Jacobian where it is
        small (`out_size * in_size <= 2**21`), else by comparing `J v` and `u^T J` of the sparse
        Jacobian with `jacket.jvp` / `jacket.vjp` on random `v`, `u` (which catches any missed
        entry larger than about `sqrt(eps)` of its row). Raises `SparsityError` on a miss.
      training: The pattern of the model in training mode (batch statistics mix more).

    Returns:
      A boolean `scipy.sparse.csr_array` `(out_size, in_size)`: entry `(i, j)` is True when output
      `i` of a sample may depend on its input `j` (inputs and outputs flattened; several are
      concatenated in `keras.tree.flatten` order).

    Example:
      >>> P = jacket.sparsity(model, (32, 32, 1))          # 3 x Conv2D 3x3 "same"
      >>> P.shape, P.nnz / (1024 * 1024)
      ((1024, 1024), 0.043)
    """
    check_model("sparsity", model)
    check_flag("sparsity", "verify", verify)
    check_flag("sparsity", "training", training)
    zeros = zeros_like_shape(model, input_shape)
    inputs = prepare_inputs("sparsity", model, zeros, check_finite=False)
    found = detection("sparsity", model, inputs, bool(training))
    if verify:
        check_pattern("sparsity", model, inputs, found.pattern, bool(training), 2)
    return found.pattern


def verify(
    model, input_shape, sparsity, *, points: int = 2, training: bool = False
) -> dict[str, Any]:
    """Check that a sparsity pattern holds every nonzero of `model`'s per-sample Jacobian at
    `points` random inputs (standard normal, seeded: the same points every call).

    While `out_size * in_size * points <= VERIFY_DENSE_ENTRIES`, against the dense Jacobian (exact:
    any nonzero outside the pattern is a miss). Beyond, `J v` and `u^T J` of the sparse Jacobian
    computed with the pattern against `jacket.jvp` / `jacket.vjp` for random `v`, `u` per point: a
    missed entry `(i, j)` changes them by `J[i, j] v[j]`, caught when it exceeds about `sqrt(eps)`
    of its row's scale.

    Args:
      model, input_shape, training: As in `sparsity`.
      sparsity: The pattern, `(out_size, in_size)` (scipy sparse or NumPy), e.g. from `sparsity`.
      points: How many random inputs.

    Returns:
      `{"method": "dense Jacobian" or "J v and u^T J products", "nonzero": how many entries of
      the pattern were nonzero at the points (dense method), else None}`.

    Raises:
      SparsityError: naming the first miss.

    Example:
      >>> P = jacket.sparsity(model, (32, 32, 1))
      >>> jacket.sparse.verify(model, (32, 32, 1), P, points=4)["method"]
      'dense Jacobian'
    """
    fn = "verify"
    check_model(fn, model)
    check_flag(fn, "training", training)
    points = positive_int(fn, "points", points)
    if not (sp.issparse(sparsity) or hasattr(sparsity, "shape")):
        raise JacketTypeError(
            f"{fn}: `sparsity` must be a scipy.sparse matrix or a 2-D array `(out_size, in_size)`, "
            f"e.g. from `jacket.sparsity`. Received: {type(sparsity).__name__}."
        )
    inputs = prepare_inputs(fn, model, zeros_like_shape(model, input_shape), check_finite=False)
    _, out_leaves = outputs(fn, model, inputs, bool(training))
    pattern = user_pattern(fn, sparsity, inputs, out_leaves)
    return check_pattern(fn, model, inputs, pattern, bool(training), points)


def check_pattern(
    fn_name, model, inputs: Inputs, pattern: sp.csr_array, training: bool, points: int
) -> dict[str, Any]:
    """Check `pattern` at `points` random points (see `verify`)."""
    rng = np.random.default_rng(0)
    xs = [
        keras.ops.convert_to_tensor(
            rng.standard_normal((points,) + leaf.shape).astype(numpy_dtype(leaf.dtype))
        )
        for leaf in inputs.leaves
    ]
    x = inputs.pack(xs)
    out_size, in_size = pattern.shape
    if out_size * in_size * points <= VERIFY_DENSE_ENTRIES:
        J = jacobian(model, x, flatten=True, training=training)
        blocks = [to_numpy(b).astype(np.float64) for b in keras.tree.flatten(J)]
        nonzero = (np.abs(flat_matrix(blocks, len(inputs.leaves))) > 0).any(axis=0)
        missed = nonzero & ~pattern.toarray()
        if missed.any():
            i, j = np.argwhere(missed)[0]
            raise SparsityError(
                f"{fn_name}: the pattern misses {int(missed.sum())} nonzero(s) of the Jacobian "
                f"at random points, e.g. output {i} / input {j}. Received: a pattern with "
                f"{pattern.nnz} entries. Pass `sparsity=` a larger pattern, or report the model's "
                "layers: a rule is wrong."
            )
        return {"method": "dense Jacobian", "nonzero": int((nonzero & pattern.toarray()).sum())}
    fn = prepared(fn_name, model, sparsity=pattern, training=training)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SparsityWarning)
        S = fn(x)
    eps = float(np.finfo(np.float32 if S.dtype.itemsize <= 4 else np.float64).eps)
    tolerance = math.sqrt(eps)
    prepared_fn = fn.passes(inputs)
    in_leaves, out_leaves = inputs.leaves, prepared_fn.out_leaves
    v = rng.standard_normal((points, in_size))
    u = rng.standard_normal((points, out_size))
    checks = (
        ("J v", jvp, v, in_leaves, [S.to_scipy(b) for b in range(points)]),
        ("u^T J", vjp, u, out_leaves, [S.to_scipy(b).T for b in range(points)]),
    )
    for name, product, w, w_leaves, matrices in checks:
        split, offset = [], 0
        for leaf in w_leaves:
            part = w[:, offset : offset + leaf.size].reshape((points,) + leaf.shape)
            split.append(keras.ops.convert_to_tensor(part.astype(numpy_dtype(leaf.dtype))))
            offset += leaf.size
        seeds = pack(inputs.structure if product is jvp else prepared_fn.y_structure, split)
        got = product(model, x, seeds, training=training)
        got = np.concatenate(
            [to_numpy(t).astype(np.float64).reshape(points, -1) for t in keras.tree.flatten(got)],
            axis=1,
        )
        for b in range(points):
            M = matrices[b].astype(np.float64)
            expected = M @ w[b]
            scale = abs(M) @ np.abs(w[b]) + np.abs(got[b])
            bad = np.abs(got[b] - expected) > tolerance * scale + eps * scale.max(initial=0.0)
            if bad.any():
                raise SparsityError(
                    f"{fn_name}: the pattern misses nonzeros of the Jacobian at a random point: "
                    f"{name} of the sparse Jacobian differs from the exact product at "
                    f"{int(bad.sum())} position(s), e.g. {int(np.argmax(bad))}. Received: a "
                    f"pattern with {pattern.nnz} entries. Pass `sparsity=` a larger pattern, or "
                    "report the model's layers: a rule is wrong."
                )
    return {"method": "J v and u^T J products", "nonzero": None}
