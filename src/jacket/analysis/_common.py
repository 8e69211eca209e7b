"""What the analyses and attacks share: argument checks, the model's outputs, datasets in batches."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import keras
import numpy as np

from .._errors import JacketTypeError, JacketValueError

Progress = Callable[[int, "int | None"], None]


def to_numpy(t) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(t))


def check_callable(fn_name: str, model) -> None:
    if not callable(model):
        raise JacketTypeError(
            f"{fn_name}: `model` must be a Keras model or layer, or a callable mapping a batch to a "
            f"batch. Received: model of type {type(model).__name__}."
        )


def single_array(fn_name: str, name: str, x) -> np.ndarray:
    """`x` as a NumPy array with a batch axis (one model input only)."""
    if x is None or isinstance(x, (list, tuple, dict)):
        received = "None" if x is None else f"a {type(x).__name__}"
        raise JacketValueError(
            f"{fn_name}: `{name}` must be one array of shape `(batch, *in_shape)`; models with "
            f"several inputs are not supported here. Received: {received}."
        )
    array = to_numpy(x) if keras.ops.is_tensor(x) else np.asarray(x)
    if array.dtype.kind not in "fiu":
        raise JacketTypeError(
            f"{fn_name}: `{name}` must hold real numbers. Received: {name}.dtype={array.dtype}."
        )
    if array.ndim < 2:
        raise JacketValueError(
            f"{fn_name}: `{name}` must have a leading batch axis, shape `(batch, *in_shape)`. "
            f"Received: {name}.shape={array.shape}. For one sample, pass `{name}[None]`."
        )
    if array.shape[0] == 0:
        raise JacketValueError(
            f"{fn_name}: `{name}` has an empty batch. Received: {name}.shape={array.shape}. "
            "Pass at least one sample."
        )
    if array.dtype.kind in "iu":
        array = array.astype(keras.config.floatx())
    return array


def positive_int(fn_name: str, name: str, value, *, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise JacketTypeError(
            f"{fn_name}: `{name}` must be a positive integer. Received: {name}={value!r}."
        )
    if value <= 0:
        raise JacketValueError(
            f"{fn_name}: `{name}` must be a positive integer. Received: {name}={value}."
        )
    return int(value)


def positive_float(fn_name: str, name: str, value, *, allow_zero: bool = False) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        raise JacketTypeError(f"{fn_name}: `{name}` must be a number. Received: {name}={value!r}.")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        need = "non-negative" if allow_zero else "positive"
        raise JacketValueError(
            f"{fn_name}: `{name}` must be a finite {need} number. Received: {name}={value}."
        )
    return value


def choice(fn_name: str, name: str, value, options: tuple) -> None:
    if not isinstance(value, (str, int)) or isinstance(value, bool) or value not in options:
        raise JacketValueError(
            f"{fn_name}: `{name}` must be one of {', '.join(map(repr, options))}. "
            f"Received: {name}={value!r}."
        )


def clip_bounds(fn_name: str, clip) -> tuple[float, float] | None:
    if clip is None:
        return None
    try:
        low, high = (float(c) for c in clip)
    except (TypeError, ValueError):
        raise JacketTypeError(
            f"{fn_name}: `clip` must be a pair `(low, high)` of numbers or None. "
            f"Received: clip={clip!r}."
        ) from None
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise JacketValueError(
            f"{fn_name}: `clip` must be `(low, high)` with finite low < high. "
            f"Received: clip={clip!r}."
        )
    return low, high


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


# ----------------------------------------------------------------------------------------- batches


@dataclass
class Batch:
    """A slice of a dataset, padded to a fixed size so every engine call has the same signature."""

    start: int  # index of its first sample in the dataset
    x: np.ndarray  # `(batch_size, *in_shape)`, rows past `valid` repeat the last sample
    valid: int


def batches(fn_name: str, data, batch_size: int | None) -> tuple[Iterator[Batch], int | None]:
    """`data` (an array `(n, *in_shape)`, or an iterable of such arrays or of `(x, y)` tuples) in
    batches of `batch_size`, and the number of samples when known.

    NOTE: [Items of a stream]
    Keras's convention, made unambiguous: a tuple item is `(x,)`, `(x, y)` or `(x, y,
    sample_weight)` (what `tf.data` and `keras.utils.PyDataset` yield), and only `x` is used; a
    list item is the inputs of a model with several inputs, which the analyses do not support,
    and is refused with an error that says so. (A two-element list of arrays could be either.)
    """
    if isinstance(data, np.ndarray) or keras.ops.is_tensor(data):
        array = single_array(fn_name, "data", data)
        size = min(batch_size or array.shape[0], array.shape[0])
        return _slices(array, size, 0), array.shape[0]
    if not isinstance(data, Iterable) or isinstance(data, (str, bytes, dict)):
        raise JacketTypeError(
            f"{fn_name}: `data` must be an array `(n, *in_shape)` or an iterable of batches. "
            f"Received: data of type {type(data).__name__}."
        )

    def stream():
        # re-cut the stream into batches of `batch_size` (the last one padded), so that the engine
        # sees one signature whatever sizes the stream's own batches have
        pending: list[np.ndarray] = []
        held = seen = 0
        for item in data:
            if isinstance(item, tuple) and 1 <= len(item) <= 3:
                item = item[0]  # (x,), (x, y) or (x, y, sample_weight): NOTE: [Items of a stream]
            if isinstance(item, (list, tuple, dict)):
                raise JacketValueError(
                    f"{fn_name}: each item of `data` must be an array `(batch, *in_shape)` or a "
                    f"tuple `(x, y)`. Received: an item that is a {type(item).__name__} of "
                    f"{len(item)}, which is read as the inputs of a model with several inputs "
                    "(not supported here). For (x, y) pairs, yield tuples."
                )
            array = single_array(fn_name, "data", item)
            if batch_size is None:
                yield from _slices(array, array.shape[0], seen)
                seen += array.shape[0]
                continue
            pending.append(array)
            held += array.shape[0]
            if held >= batch_size:
                joined = np.concatenate(pending)
                full = (held // batch_size) * batch_size
                yield from _slices(joined[:full], batch_size, seen)
                seen += full
                pending, held = ([joined[full:]] if held > full else []), held - full
        if held:
            yield from _slices(np.concatenate(pending), batch_size, seen)

    return stream(), None


def _slices(array: np.ndarray, size: int, offset: int) -> Iterator[Batch]:
    for start in range(0, array.shape[0], size):
        part = array[start : start + size]
        valid = part.shape[0]
        if valid < size:
            part = np.concatenate([part, np.repeat(part[-1:], size - valid, axis=0)])
        yield Batch(offset + start, part, valid)
