"""The sparsity pattern of a model's per-sample Jacobian, detected from its layers (`_detect`) or
given by the caller, kept in the model's state per input shape."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass

import keras
import numpy as np
import scipy.sparse as sp

from ..engine.inputs import FLOAT_DTYPES, Inputs, declared_inputs, output_leaves
from ..engine.model import eager_call
from ..engine.state import state_of
from ..errors import JacketValueError
from ..trees import skeleton
from . import _detect


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


def outputs(fn_name, model, inputs: Inputs, training: bool):
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
class Detected:
    pattern: sp.csr_array
    y_structure: object
    out_leaves: list
    activation_size: int | None
    seconds: float


def detection(fn_name, model, inputs: Inputs, training: bool) -> Detected:
    """The detected pattern for these input shapes, made once and kept in the model's state."""
    key = ("sparse", "detected", tuple(leaf.shape for leaf in inputs.leaves))
    cache = state_of(model, training).wrappers
    found = cache.get(key)
    if found is None:
        start = time.perf_counter()
        y_structure, out_leaves = outputs(fn_name, model, inputs, training)
        detection = _detect.detect(
            model,
            [leaf.shape for leaf in inputs.leaves],
            [leaf.shape for leaf in out_leaves],
            training=training,
        )
        found = Detected(
            detection.pattern,
            y_structure,
            out_leaves,
            detection.activation_size,
            time.perf_counter() - start,
        )
        cache[key] = found
    return found


def user_pattern(fn_name, pattern, inputs: Inputs, out_leaves) -> sp.csr_array:
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


def pattern_key(pattern) -> str:
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
