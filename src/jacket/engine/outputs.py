"""The model's outputs on a NumPy batch, for the analyses and attacks built on the engine."""

from __future__ import annotations

import keras
import numpy as np

from ..errors import JacketTypeError, JacketValueError
from ..trees import to_numpy


def output_structure(model, x):
    """The model's outputs on a NumPy batch, as NumPy leaves in the model's output structure.

    A `keras.Model` runs through `predict_on_batch` (Keras compiles it once per shape); a layer or
    callable is called directly.
    """
    if isinstance(model, keras.Model):
        y = model.predict_on_batch(x)
    elif isinstance(model, keras.Layer):
        y = model(keras.ops.convert_to_tensor(x), training=False)
    else:
        y = model(keras.ops.convert_to_tensor(x))
    return keras.tree.map_structure(to_numpy, y)


def outputs(model, x, fn_name: str | None = None) -> np.ndarray:
    """The model's (single) output on a NumPy batch, as NumPy (`output_structure`, checked by
    `single_output`)."""
    y = output_structure(model, x)
    single_output(fn_name, y)
    return y


def single_output(fn_name: str | None, y, hint: str = "") -> None:
    """Raise jacket's error naming `model` when the outputs `y` are a structure, not one array."""
    if isinstance(y, (list, tuple, dict)):
        prefix = f"{fn_name}: " if fn_name else ""
        raise JacketValueError(
            f"{prefix}`model` must have one output tensor. Received: a model whose outputs are a "
            f"{type(y).__name__} of {len(keras.tree.flatten(y))} tensors. Pass a model of one of "
            "them, e.g. `keras.Model(model.inputs, model.outputs[0])`" + hint + "."
        )


def output_index(fn_name: str, name: str, value, size: int, batch: int) -> np.ndarray:
    """An output (class) index per sample: an int for all, or one per sample; flat indices."""
    array = np.asarray(value)
    if array.dtype.kind not in "iu" or array.ndim > 1:
        raise JacketTypeError(
            f"{fn_name}: `{name}` must be an integer index of the (flattened) output, or one per "
            f"sample. Received: {name}={value!r}."
        )
    if array.ndim == 1 and array.shape[0] != batch:
        raise JacketValueError(
            f"{fn_name}: `{name}` must have one index per sample ({batch}). "
            f"Received: {name}.shape={array.shape}."
        )
    if np.any(array < 0) or np.any(array >= size):
        raise JacketValueError(
            f"{fn_name}: `{name}` must index the model's {size} outputs, in [0, {size}). "
            f"Received: {name}={value!r}."
        )
    return np.broadcast_to(array.astype(np.int64), (batch,)).copy()
