"""The one batch loop: a dataset (an array, or an iterable of arrays or `(x, y)` tuples) cut into
batches of one fixed size, the last one padded, so that the engine sees one input signature."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import keras
import numpy as np

from .errors import JacketTypeError, JacketValueError
from .trees import to_numpy

Progress = Callable[[int, "int | None"], None]


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
