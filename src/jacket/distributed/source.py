"""The inputs of a dataset run: its model file and its samples (NumPy or zarr, never read whole),
and each chunk's piece of them."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..batches import take
from ..errors import JacketTypeError, JacketValueError
from .skeletons import path_label, to_skeleton, unflatten


@dataclass
class Source:
    """The inputs of a run: their structure and arrays (NumPy or zarr), never read whole."""

    skeleton: Any  # JSON form of the input structure (see `jacket.distributed.skeletons`)
    labels: list[str]
    arrays: list
    n: int

    @classmethod
    def open(cls, fn: str, inputs) -> Source:
        import zarr

        if isinstance(inputs, (str, os.PathLike)):
            location = str(inputs)
            if "://" not in location:
                location = str(Path(location).expanduser().resolve())
                if not Path(location).exists():
                    raise JacketValueError(
                        f"{fn}: `inputs` must be a zarr store, an array or a structure of arrays. "
                        f"Received: {str(inputs)!r}, which does not exist."
                    )
            try:
                node = zarr.open(location, mode="r")
            except (FileNotFoundError, ValueError, KeyError) as error:
                raise JacketValueError(
                    f"{fn}: `inputs` must be a zarr store. Received: {str(inputs)!r}, which zarr "
                    f"cannot open ({type(error).__name__}: {error}). Pass a NumPy array, or "
                    "convert the data once: zarr.create_array('x.zarr', data=np.load('x.npy'))."
                ) from error
            if isinstance(node, zarr.Group):
                node = dict(sorted(node.arrays()))
                if not node:
                    raise JacketValueError(
                        f"{fn}: `inputs` must hold the samples. Received: {str(inputs)!r}, a "
                        "zarr group without arrays."
                    )
            inputs = node
        try:
            skeleton, leaves = to_skeleton(inputs, is_leaf=_is_array)
        except TypeError as error:
            raise JacketTypeError(f"{fn}: `inputs` {error}.") from error
        labels = [path_label(path) for path, _ in leaves]
        arrays = [leaf for _, leaf in leaves]
        for label, array in zip(labels, arrays):
            name = f"inputs{label and '[' + repr(label) + ']'}"
            dtype = np.dtype(array.dtype)
            if dtype.kind not in "biuf":
                raise JacketTypeError(
                    f"{fn}: `{name}` must hold real numbers. Received: dtype {dtype}."
                )
            if len(array.shape) < 1 or array.shape[0] < 1:
                raise JacketValueError(
                    f"{fn}: `{name}` must have a leading sample axis with at least one sample, "
                    f"shape `(n, *in_shape)`. Received: shape {tuple(array.shape)}."
                )
        sizes = sorted({int(array.shape[0]) for array in arrays})
        if len(sizes) != 1:
            raise JacketValueError(
                f"{fn}: every input must have the same number of samples. Received: "
                + ", ".join(f"{label or 'x'} {tuple(a.shape)}" for label, a in zip(labels, arrays))
                + "."
            )
        return cls(skeleton, labels, arrays, sizes[0])

    @property
    def in_shapes(self) -> list[tuple[int, ...]]:
        return [tuple(int(d) for d in array.shape[1:]) for array in self.arrays]

    def describe(self) -> list[dict]:
        return [
            {"name": label, "shape": [int(d) for d in array.shape], "dtype": str(array.dtype)}
            for label, array in zip(self.labels, self.arrays)
        ]


@dataclass
class Piece:
    """One chunk's samples: the NumPy data itself, or the zarr arrays to read them from."""

    start: int
    stop: int
    skeleton: Any
    data: list | None = None
    arrays: list | None = None

    def read(self, batch_size: int) -> tuple[Any, int]:
        """`(x, valid)`: the samples in the input structure, the last chunk padded to `batch_size`
        with copies of its last sample (so that every chunk has one shape and one compiled kernel),
        of which the first `valid` are real."""
        if self.data is not None:
            batch = take(self.data, 0, len(self.data[0]), batch_size)
        else:
            batch = take(self.arrays, self.start, self.stop, batch_size)
        return unflatten(self.skeleton, batch.x), batch.valid


def _is_array(value) -> bool:
    if isinstance(value, np.ndarray):
        return True
    import zarr

    return isinstance(value, zarr.Array)


def model_file(fn: str, model_path) -> tuple[Path, str]:
    """`(resolved path, SHA-256)` of the `.keras` file a run loads on every worker."""
    if not isinstance(model_path, (str, os.PathLike)):
        raise JacketTypeError(
            f"{fn}: `model_path` must be the path of a `.keras` file, which each worker loads "
            f"itself (models are never pickled). Received: {type(model_path).__name__}. Save the "
            "model first: model.save('model.keras')."
        )
    path = Path(model_path).expanduser().resolve()
    if path.suffix != ".keras":
        raise JacketValueError(
            f"{fn}: `model_path` must be a Keras 3 `.keras` file. Received: {str(model_path)!r}. "
            "Save the model with model.save('model.keras')."
        )
    if not path.is_file():
        raise JacketValueError(
            f"{fn}: `model_path` must be an existing `.keras` file. Received: "
            f"{str(model_path)!r}, which does not exist."
        )
    return path, sha256(path)


def sha256(path: Path) -> str:
    """The SHA-256 of a file, in hex."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
