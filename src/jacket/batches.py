"""The one batch loop: a dataset cut into batches of one fixed size, the last one padded with copies
of its last sample, so that the engine sees one input signature (samples are independent, so the
copies change nothing but are computed and dropped).

`slices` is the loop over an array-like (or a list/tuple/dict of them, lazy ones such as memory maps
and zarr arrays read one batch at a time); `take` is one of its batches; `batches` is the loop over
a dataset given as an array or an iterable of batches, re-cut to the batch size. `jacket.io`'s
streams, the analyses, the attacks and `jacket.distributed`'s chunks all run through them.

Keras is imported on first use, not with this module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import JacketTypeError, JacketValueError
from .trees import map_structure, to_numpy

Progress = Callable[[int, "int | None"], None]


def single_array(fn_name: str, name: str, x) -> np.ndarray:
    """`x` as a NumPy array with a batch axis (one model input only)."""
    import keras

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
    x: Any  # `(batch_size, *in_shape)` (or a structure of such), rows past `valid` repeat the last
    valid: int

    @property
    def stop(self) -> int:
        """One past the index of its last real sample in the dataset."""
        return self.start + self.valid


def pad(x, size: int):
    """`x` (an array `(rows, ...)` or a structure of them) with `size` rows: the last row repeated."""

    def one(array):
        missing = size - array.shape[0]
        if missing <= 0:
            return array
        return np.concatenate([array, np.repeat(array[-1:], missing, axis=0)])

    return map_structure(one, x)


def take(x, start: int, stop: int, size: int | None = None, *, cast: Callable | None = None):
    """Rows `start:stop` of `x` (an array-like or a structure of them; lazy ones are read now) as
    contiguous NumPy arrays, `cast` applied, padded to `size` rows (None: not padded)."""
    part = map_structure(lambda a: np.ascontiguousarray(a[start:stop]), x)
    if cast is not None:
        part = cast(part)
    return Batch(start, part if size is None else pad(part, size), stop - start)


def slices(
    x, n: int, size: int, *, offset: int = 0, padded: bool = True, cast: Callable | None = None
) -> Iterator[Batch]:
    """The `n` samples of `x` in batches of `size` (see `take`), each read when it is reached, the
    last one padded to `size` (unless `padded=False`); `Batch.start` counts from `offset`."""
    for start in range(0, n, size):
        batch = take(x, start, min(n, start + size), size if padded else None, cast=cast)
        batch.start += offset
        yield batch


def batches(fn_name: str, data, batch_size: int | None) -> tuple[Iterator[Batch], int | None]:
    """`data` (an array `(n, *in_shape)`, or an iterable of such arrays or of `(x, y)` tuples) in
    batches of `batch_size`, and the number of samples when known.

    NOTE: [Items of a stream]
    Keras's convention, made unambiguous: a tuple item is `(x,)`, `(x, y)` or `(x, y,
    sample_weight)` (what `tf.data` and `keras.utils.PyDataset` yield), and only `x` is used; a
    list item is the inputs of a model with several inputs, which the analyses do not support,
    and is refused with an error that says so. (A two-element list of arrays could be either.)
    """
    import keras

    if isinstance(data, np.ndarray) or keras.ops.is_tensor(data):
        array = single_array(fn_name, "data", data)
        size = min(batch_size or array.shape[0], array.shape[0])
        return slices(array, array.shape[0], size), array.shape[0]
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
                yield from slices(array, array.shape[0], array.shape[0], offset=seen)
                seen += array.shape[0]
                continue
            pending.append(array)
            held += array.shape[0]
            if held >= batch_size:
                joined = np.concatenate(pending)
                full = (held // batch_size) * batch_size
                yield from slices(joined, full, batch_size, offset=seen)
                seen += full
                pending, held = ([joined[full:]] if held > full else []), held - full
        if held:
            yield from slices(np.concatenate(pending), held, batch_size, offset=seen)

    return stream(), None
