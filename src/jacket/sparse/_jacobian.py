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

import hashlib
import math
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import scipy.sparse as sp

from ..checks import check_flag, check_model, positive_int
from ..engine import Options, jacobian, jvp, vjp
from ..engine.inputs import (
    FLOAT_DTYPES,
    Inputs,
    declared_inputs,
    numpy_dtype,
    output_leaves,
    prepare_inputs,
)
from ..engine.model import eager_call
from ..errors import CouplingError, JacketTypeError, JacketValueError
from ..trees import flat_matrix, pack, skeleton
from . import _color, _detect
from ._errors import SparsityError, SparsityWarning
from ._result import SparseJacobian, entries

# a pattern needing at least this share of the dense passes is computed densely
DENSE_SHARE = 1.0
# the repeated batch of the compressed passes is probed for coupling itself up to this many
# activation elements, else the batch as given is
SMALL_PROBE = 1 << 20
# `verify` compares with the dense Jacobian up to this many entries (all samples), else it probes
VERIFY_DENSE_ENTRIES = 1 << 22


# --------------------------------------------------------------------------------------- public API


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
    detection = _detection("sparsity", model, inputs, bool(training))
    if verify:
        _verify("sparsity", model, inputs, detection.pattern, bool(training), 2)
    return detection.pattern


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
    _, out_leaves = _outputs(fn, model, inputs, bool(training))
    pattern = _user_pattern(fn, sparsity, inputs, out_leaves)
    return _verify(fn, model, inputs, pattern, bool(training), points)


def jacobian_fn(model, *, sparsity=None, **options) -> SparseJacobianFn:
    """A prepared sparse Jacobian: `jacket.jacobian_fn(model, sparse=True, **options)`.

    Options as in `jacket.jacobian` (`mode`: "auto" compresses the side with fewer colors,
    "forward" the columns, "reverse" the rows; `chunk_size`: colors per pass), and `sparsity`: a
    known pattern `(out_size, in_size)` (scipy sparse or NumPy) instead of the detected one.
    """
    return prepared("jacobian_fn", model, sparsity=sparsity, **options)


@dataclass(frozen=True)
class SparsePlan:
    """How a sparse Jacobian is computed for one input signature."""

    mode: str  # "forward", "reverse" or "dense"
    n_colors: int
    chunk: int  # colors per pass
    n_passes: int
    nnz: int
    shape: tuple[int, int]
    fallback: str | None

    def describe(self) -> str:
        density = self.nnz / max(math.prod(self.shape), 1)
        if self.fallback:
            return f"dense fallback: {self.fallback}"
        return (
            f"{self.mode} mode, {self.n_colors} colors in {self.n_passes} pass(es) of "
            f"{self.chunk}, pattern {self.shape[0]}x{self.shape[1]} with {self.nnz} nonzeros "
            f"({density:.2%})"
        )


class SparseJacobianFn:
    """`jacket.jacobian(model, x, sparse=True, **options)` as a reusable callable."""

    def __init__(self, fn_name: str, model, pattern, options: dict):
        self.fn_name = fn_name
        self.model = model
        self.pattern = pattern  # the caller's pattern, or None to detect
        self.options = options

    def __call__(self, x) -> SparseJacobian:
        inputs = prepare_inputs(self.fn_name, self.model, x)
        return self._prepared(inputs).run(self.fn_name, self.model, inputs, self.options)

    def plan(self, x) -> SparsePlan:
        """What this callable does for inputs like `x` (detecting and coloring if not done yet)."""
        inputs = prepare_inputs(self.fn_name, self.model, x, check_finite=False)
        return self._prepared(inputs).plan(inputs.batch, self.options)

    def _prepared(self, inputs: Inputs) -> _Prepared:
        training = self.options["training"]
        if self.pattern is None:
            pattern_key = "detected"
        else:
            pattern_key = _pattern_key(self.pattern)
        key = ("prepared", training, inputs.signature[1], pattern_key, self.options["mode"])
        cache = _cache(self.model)
        found = cache.get(key)
        if found is None:
            if self.pattern is None:
                detected = _detection(self.fn_name, self.model, inputs, training)
            else:
                y_structure, out_leaves = _outputs(self.fn_name, self.model, inputs, training)
                pattern = _user_pattern(self.fn_name, self.pattern, inputs, out_leaves)
                detected = _Detected(pattern, y_structure, out_leaves, None, 0.0)
            found = cache[key] = _Prepared(detected, inputs, self.options["mode"], training)
        return found

    def __repr__(self) -> str:
        return f"SparseJacobianFn({type(self.model).__name__}, {self.options})"


def prepared(
    fn_name: str,
    model,
    *,
    sparsity=None,
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
    options = {
        "mode": checked.mode,
        "chunk_size": checked.chunk_size,
        "flatten": checked.flatten,
        "training": checked.training,
        "memory_budget": checked.memory_budget,
    }
    return SparseJacobianFn(fn_name, model, sparsity, options)


# -------------------------------------------------------------------------------------- detection


def _is_shape(value) -> bool:
    return isinstance(value, (tuple, list)) and all(
        isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in value
    )


def zeros_like_shape(model, input_shape):
    """Zeros of batch 1 with the structure of `input_shape` (a per-sample shape, or a list or dict
    of them) in the dtypes of the model's inputs, checked against the shapes it declares."""
    if isinstance(input_shape, Mapping):
        items = list(input_shape.items())
    elif _is_shape(input_shape):
        items = [(None, input_shape)]
    elif isinstance(input_shape, (tuple, list)) and input_shape:
        items = list(enumerate(input_shape))
    else:
        items = [(None, input_shape)]
    declared = declared_inputs(model)
    specs = keras.tree.flatten(declared) if declared is not None else []
    zeros = []
    for k, (key, shape) in enumerate(items):
        label = "input_shape" if key is None else f"input_shape[{key!r}]"
        if not _is_shape(shape) or any(d <= 0 for d in shape):
            raise JacketValueError(
                f"sparsity: `{label}` must be the per-sample input shape, a tuple of positive "
                f"ints without the batch axis, e.g. (32, 32, 1) (a list or dict of them for "
                f"several inputs). Received: {label}={shape!r}."
            )
        shape = tuple(int(d) for d in shape)
        spec = specs[k] if len(specs) == len(items) else None
        if spec is not None:
            want = tuple(spec.shape[1:])
            fits = len(want) == len(shape) and all(w is None or w == d for w, d in zip(want, shape))
            if not fits:
                shown = "(" + ", ".join("?" if d is None else str(d) for d in want) + ")"
                hint = (
                    " Leave out the batch axis."
                    if len(shape) == len(want) + 1
                    else " Pass the shape of one sample."
                )
                raise JacketValueError(
                    f"sparsity: `{label}` does not fit the model, whose input is `{shown}` per "
                    f"sample. Received: {label}={shape}.{hint}"
                )
        dtype = keras.backend.standardize_dtype(spec.dtype) if spec is not None else None
        zeros.append(np.zeros((1,) + shape, dtype=dtype if dtype in FLOAT_DTYPES else "float32"))
    if isinstance(input_shape, Mapping):
        return dict(zip(input_shape, zeros))
    return zeros[0] if len(items) == 1 and items[0][0] is None else list(zeros)


def _outputs(fn_name, model, inputs: Inputs, training: bool):
    """The structure (leaves None) and the leaves of the model's output for a batch of one:
    symbolic for a Keras layer (no computation, nothing compiled), else from a forward pass."""
    y = None
    if isinstance(model, keras.Layer):
        specs = [keras.KerasTensor((1,) + leaf.shape, dtype=leaf.dtype) for leaf in inputs.leaves]
        try:
            y = model.compute_output_spec(inputs.pack(specs))
        except Exception:  # noqa: BLE001 - a layer that cannot run symbolically runs for real
            y = None
    if y is None:
        y = eager_call(model, training)(inputs.pack([t[:1] for t in inputs.tensors]))
    return skeleton(y), output_leaves(fn_name, y, 1)


@dataclass
class _Detected:
    pattern: sp.csr_array
    y_structure: object
    out_leaves: list
    activation_size: int | None
    seconds: float


def _detection(fn_name, model, inputs: Inputs, training: bool) -> _Detected:
    key = ("detected", training, tuple(leaf.shape for leaf in inputs.leaves))
    cache = _cache(model)
    found = cache.get(key)
    if found is None:
        start = time.perf_counter()
        y_structure, out_leaves = _outputs(fn_name, model, inputs, training)
        detection = _detect.detect(
            model,
            [leaf.shape for leaf in inputs.leaves],
            [leaf.shape for leaf in out_leaves],
            training=training,
        )
        found = _Detected(
            detection.pattern,
            y_structure,
            out_leaves,
            detection.activation_size,
            time.perf_counter() - start,
        )
        cache[key] = found
    return found


def _user_pattern(fn_name, pattern, inputs: Inputs, out_leaves) -> sp.csr_array:
    in_size = sum(leaf.size for leaf in inputs.leaves)
    out_size = sum(leaf.size for leaf in out_leaves)
    shape = tuple(int(d) for d in pattern.shape)
    if shape != (out_size, in_size):
        raise JacketValueError(
            f"{fn_name}: `sparsity` must have shape (out_size, in_size) = ({out_size}, {in_size}) "
            f"for this model and input. Received: sparsity.shape={shape}. Make it with "
            "`jacket.sparsity(model, x.shape[1:])`."
        )
    out = sp.csr_array(pattern if sp.issparse(pattern) else np.asarray(pattern) != 0, dtype=bool)
    out.sum_duplicates()
    out.eliminate_zeros()
    out.sort_indices()
    return out


def _pattern_key(pattern) -> str:
    if sp.issparse(pattern):
        P = sp.csr_array(pattern, dtype=bool)
        P.sum_duplicates()
        P.eliminate_zeros()
        P.sort_indices()
        parts = (P.indptr, P.indices)
    else:
        parts = (np.asarray(pattern) != 0,)
    digest = hashlib.blake2b(repr(tuple(pattern.shape)).encode(), digest_size=16)
    for part in parts:
        digest.update(np.ascontiguousarray(part).tobytes())
    return digest.hexdigest()


_ATTRIBUTE = "_jacket_sparse"


def _cache(model) -> dict:
    """Patterns, colorings and seeds kept with the model (bypassing Keras's attribute tracking)."""
    cache = getattr(model, _ATTRIBUTE, None)
    if cache is None:
        cache = {}
        try:
            object.__setattr__(model, _ATTRIBUTE, cache)
        except (AttributeError, TypeError):
            pass  # an object that takes no attributes: nothing is kept between calls
    return cache


# ------------------------------------------------------------------------------ compressed passes


class _Prepared:
    """A pattern, its coloring and the mode for one input signature; seeds made per batch size."""

    def __init__(self, detected: _Detected, inputs: Inputs, mode: str, training: bool):
        self.pattern = pattern = detected.pattern
        self.in_structure, self.y_structure = inputs.structure, detected.y_structure
        self.in_leaves = list(inputs.leaves)
        self.out_leaves = list(detected.out_leaves)
        self.in_size = sum(leaf.size for leaf in self.in_leaves)
        self.out_size = sum(leaf.size for leaf in self.out_leaves)
        self.activation_size = detected.activation_size
        self.rows, self.cols = entries(pattern)
        colorings = {}
        if mode in ("auto", "forward"):
            colorings["forward"] = _color.color(pattern, "columns")
        if mode in ("auto", "reverse"):
            colorings["reverse"] = _color.color(pattern, "rows")
        counts = {m: int(c.max(initial=-1)) + 1 for m, c in colorings.items()}
        if mode == "auto":
            # fewer colors wins; on a tie reverse, whose batched VJP was 1.3-3x faster than the
            # batched JVP on all three backends (3 x Conv2D 3x3, 49 colors, 64x64: TensorFlow's
            # forward accumulator, JAX's jvp, PyTorch's double-backward JVP)
            mode = min(counts, key=lambda m: (counts[m], m != "reverse"))
        self.mode = mode
        self.colors = colorings[mode]
        self.n_colors = counts[mode]
        dense_passes = min(self.in_size, self.out_size)
        self.fallback = None
        if self.n_colors >= DENSE_SHARE * dense_passes and self.pattern.nnz:
            self.fallback = (
                f"the pattern ({self.out_size}x{self.in_size}, {pattern.nnz} nonzeros, "
                f"{pattern.nnz / max(self.out_size * self.in_size, 1):.0%} dense) needs "
                f"{self.n_colors} compressed passes against {dense_passes} dense ones"
            )
        elif training:
            self.fallback = (
                "in training mode the compressed passes, separate calls of the model, could "
                "each draw their own dropout masks"
            )
        if mode == "forward":  # compressed (color, out) -> entry
            self.gather = self.colors[self.cols] * self.out_size + self.rows
        else:  # compressed (color, in) -> entry
            self.gather = self.colors[self.rows] * self.in_size + self.cols
        self._seeds: dict = {}
        self._probed: set = set()
        self._warned = False

    def chunk(self, batch: int, options: dict) -> int:
        """Colors per pass: `chunk_size`, else as many as the memory budget allows."""
        if options["chunk_size"] is not None:
            chunk = min(options["chunk_size"], self.n_colors)
        else:
            itemsize = max(np.dtype(numpy_dtype(leaf.dtype)).itemsize for leaf in self.in_leaves)
            activations = self.activation_size or 4 * (self.in_size + self.out_size)
            per_color = batch * itemsize * (3 * activations + self.in_size + self.out_size)
            chunk = max(1, min(self.n_colors, options["memory_budget"] // max(per_color, 1)))
        n_passes = math.ceil(self.n_colors / chunk)
        return math.ceil(self.n_colors / n_passes)  # equal passes: one compiled signature

    def plan(self, batch: int, options: dict) -> SparsePlan:
        chunk = self.chunk(batch, options)
        return SparsePlan(
            mode="dense" if self.fallback else self.mode,
            n_colors=self.n_colors,
            chunk=chunk,
            n_passes=math.ceil(self.n_colors / chunk),
            nnz=self.pattern.nnz,
            shape=tuple(self.pattern.shape),
            fallback=self.fallback,
        )

    def run(self, fn_name: str, model, inputs: Inputs, options: dict) -> SparseJacobian:
        if self.fallback:
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"{fn_name}: sparse=True, but {self.fallback}: the Jacobian is computed "
                    "densely (`.fallback` on the result says so).",
                    SparsityWarning,
                    stacklevel=4,
                )
            values = self._dense_values(model, inputs, options)
            mode = "dense"
        else:
            values = self._compressed_values(fn_name, model, inputs, options)
            mode = self.mode
        return SparseJacobian(
            self.pattern,
            values,
            [leaf.shape for leaf in self.in_leaves],
            [leaf.shape for leaf in self.out_leaves],
            mode=mode,
            n_colors=self.n_colors,
            fallback=self.fallback,
            flatten=options["flatten"],
        )

    def _dense_values(self, model, inputs: Inputs, options: dict) -> np.ndarray:
        J = jacobian(
            model,
            inputs.pack(inputs.tensors),
            mode=options["mode"],
            flatten=True,
            training=options["training"],
            memory_budget=options["memory_budget"],
        )
        blocks = [_numpy(block) for block in keras.tree.flatten(J)]
        n_in = len(self.in_leaves)
        rows = [
            np.concatenate(blocks[o * n_in : (o + 1) * n_in], axis=2)
            for o in range(len(self.out_leaves))
        ]
        dense = np.concatenate(rows, axis=1)
        return dense[:, self.rows, self.cols]

    def _compressed_values(self, fn_name, model, inputs: Inputs, options: dict) -> np.ndarray:
        batch = inputs.batch
        chunk = self.chunk(batch, options)
        activations = self.activation_size or 4 * (self.in_size + self.out_size)
        # a small repeated batch is probed itself (no second compiled signature); a large one
        # on the batch as given (see the NOTE at the top)
        probe_repeated = chunk * batch * activations <= SMALL_PROBE
        if not probe_repeated:
            self._check_independent(fn_name, model, inputs)
        forward = self.mode == "forward"
        other_size = self.out_size if forward else self.in_size
        parts = []
        for seeds in self._seeds_for(batch, chunk):
            xs = inputs.pack([_tile(t, chunk) for t in inputs.tensors])
            push = jvp if forward else vjp
            try:
                out = push(model, xs, seeds, per_sample=probe_repeated)
            except CouplingError as error:
                raise CouplingError(f"{fn_name} (sparse=True): {error}") from None
            flat = [_numpy(t).reshape(chunk, batch, -1) for t in keras.tree.flatten(out)]
            parts.append(flat[0] if len(flat) == 1 else np.concatenate(flat, axis=2))
        compressed = np.concatenate(parts, axis=0)[: self.n_colors]  # (colors, batch, other)
        compressed = np.moveaxis(compressed, 1, 0).reshape(batch, self.n_colors * other_size)
        return compressed[:, self.gather]

    def _check_independent(self, fn_name, model, inputs: Inputs) -> None:
        """Probe once per batch size that samples do not interact (the engine's coupling probe,
        through `jacket.vjp`), on the batch as given (two copies of a single sample): cheaper
        than probing the repeated batch of the compressed passes."""
        if inputs.batch in self._probed:
            return
        k = 2 if inputs.batch == 1 else 1
        xs = [_tile(t, k) for t in inputs.tensors]
        zeros = [
            keras.ops.zeros((k * inputs.batch,) + leaf.shape, dtype=leaf.dtype)
            for leaf in self.out_leaves
        ]
        try:
            vjp(model, inputs.pack(xs), pack(self.y_structure, zeros))
        except CouplingError as error:
            raise CouplingError(f"{fn_name} (sparse=True): {error}") from None
        self._probed.add(inputs.batch)

    def _seeds_for(self, batch: int, chunk: int) -> list:
        """Per pass, the tangents (cotangents) of `chunk` colors for the repeated batch."""
        key = (batch, chunk)
        seeds = self._seeds.get(key)
        if seeds is None:
            forward = self.mode == "forward"
            leaves = self.in_leaves if forward else self.out_leaves
            size = self.in_size if forward else self.out_size
            n_passes = math.ceil(self.n_colors / chunk)
            onehot = np.zeros((n_passes * chunk, size), dtype=np.float32)
            onehot[self.colors, np.arange(size)] = 1.0  # padding colors stay zero
            seeds = []
            for p in range(n_passes):
                block = np.broadcast_to(
                    onehot[p * chunk : (p + 1) * chunk, None, :], (chunk, batch, size)
                ).reshape(chunk * batch, size)
                tensors, offset = [], 0
                for leaf in leaves:
                    part = block[:, offset : offset + leaf.size].reshape((-1,) + leaf.shape)
                    tensors.append(
                        keras.ops.convert_to_tensor(part.astype(numpy_dtype(leaf.dtype)))
                    )
                    offset += leaf.size
                seeds.append(pack(self.in_structure if forward else self.y_structure, tensors))
            self._seeds[key] = seeds
        return seeds


def _tile(x, k: int):
    """`(batch, *s)` -> `(k * batch, *s)`: the batch repeated `k` times (color-major)."""
    if k == 1:
        return x
    shape = tuple(x.shape)
    return keras.ops.reshape(keras.ops.broadcast_to(x[None], (k,) + shape), (-1,) + shape[1:])


def _numpy(t) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(t))


# ----------------------------------------------------------------------------------------- verify


def _verify(
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
        blocks = [_numpy(b).astype(np.float64) for b in keras.tree.flatten(J)]
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
    prepared_fn = fn._prepared(inputs)
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
            [_numpy(t).astype(np.float64).reshape(points, -1) for t in keras.tree.flatten(got)],
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
