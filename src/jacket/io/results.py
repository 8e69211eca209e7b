"""Result files: Jacobians as `.npy` (one array), `.npz` or `.zarr` (one array per output x input
block, keys `"J"` for a single block, `"<output>/<input>"` otherwise), written batch by batch under a
temporary name and renamed when complete (`jacket.io.files`), and read back lazily."""

from __future__ import annotations

import math
import os
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import JacketValueError
from ..trees import flat_matrix, to_numpy
from .files import OUTPUT_SUFFIXES, check_output, optional, publish, remove, temporary_name
from .inputs import declared_inputs
from .models import check_archive

SINGLE_KEY = "J"  # the key of a result with one output and one input
FLOAT_DTYPES = ("float16", "float32", "float64")
_ZARR_CHUNK_BYTES = 64 * 2**20  # upper bound on one zarr chunk


def _block_name(name: Any) -> str:
    """One plain path component from an input or output name: path separators and control
    characters become "_", and a name of dots alone (".", "..") or none gets a "_" in front."""
    text = re.sub(r"[/\\\x00-\x1f]", "_", str(name))
    return "_" + text if set(text) <= {"."} else text


def _check_key(key: str) -> None:
    """Refuse a result key that names a path outside the result (NOTE [Untrusted files])."""
    if (
        not isinstance(key, str)
        or "\\" in key
        or re.match(r"^[A-Za-z]:", key)
        or any(part in ("", ".", "..") for part in key.split("/"))
        or re.search(r"[\x00-\x1f]", key)
    ):
        raise JacketValueError(
            f"ResultWriter.write: block key {key!r} must be one or more plain names joined by "
            "'/' (no '..', '.', empty or absolute parts, backslashes or control characters), so "
            "that every block stays inside the result."
        )


def jacobian_blocks(J, x, model=None) -> dict[str, np.ndarray]:
    """A Jacobian as NumPy arrays, one per output x input block, keyed for a file.

    Args:
      J: what `jacket.jacobian(model, x)` returned (a tensor, or the model's output structure of
        the input structure).
      x: the inputs it was computed at (their structure tells the two levels of `J` apart).
      model: the model, for the names of list-structured inputs and outputs.

    Returns:
      `{"J": array}` for a single output and input; otherwise `{"<output>/<input>": array}` in
      output-major order, names from the dict keys or the model's input and output names
      (`output_0`, `input_0`, ... where it has none). bfloat16 becomes float32.
    """

    def numpy(value):
        return portable(to_numpy(value))

    x_single = not isinstance(x, (Mapping, list, tuple))
    in_names = input_names(x, model)
    out_structure = J
    if not x_single:
        single_output = isinstance(J, type(x)) and all(
            not isinstance(v, (Mapping, list, tuple)) for v in _values(J)
        )
        if single_output:
            out_structure = None
    elif not isinstance(J, (Mapping, list, tuple)):
        return {SINGLE_KEY: numpy(J)}
    output_names = list(getattr(model, "output_names", None) or [])
    if out_structure is None:
        out_name = output_names[0] if len(output_names) == 1 else "output"
        rows = [(out_name, J)]
    else:
        keys = list(J) if isinstance(J, Mapping) else None
        if keys is None:
            names = (
                output_names
                if len(output_names) == len(J)
                else [f"output_{i}" for i in range(len(J))]
            )
            rows = list(zip(names, J))
        else:
            rows = [(key, J[key]) for key in keys]
    blocks = {}
    for out_name, row in rows:
        if x_single:
            blocks[f"{_block_name(out_name)}/{_block_name(in_names[0])}"] = numpy(row)
        else:
            for in_name, value in zip(in_names, _values(row)):
                blocks[f"{_block_name(out_name)}/{_block_name(in_name)}"] = numpy(value)
    return blocks


def _values(structure) -> list:
    return list(structure.values()) if isinstance(structure, Mapping) else list(structure)


def input_names(x, model=None) -> list[str]:
    """The names of the arrays of `x`: a dict's keys, else the model's declared input names, else
    `input_0, input_1, ...` (`input` for one array)."""
    if isinstance(x, Mapping):
        return [str(key) for key in x]
    declared = declared_inputs(model) if model is not None else None
    if isinstance(x, (list, tuple)):
        if isinstance(declared, (list, tuple)) and len(declared) == len(x):
            return [t.name for t in declared]
        return [f"input_{i}" for i in range(len(x))]
    name = getattr(declared, "name", None)
    return [name or "input"]


def portable(values) -> np.ndarray:
    """A float array `.npy` can hold: bfloat16 (no portable `.npy` type) becomes float32."""
    values = np.asarray(values)
    return values if values.dtype.name in FLOAT_DTYPES else values.astype(np.float32)


def assemble_flat(blocks: Mapping[str, np.ndarray]) -> np.ndarray:
    """Flattened blocks `(batch, out_i, in_j)` keyed `"<output>/<input>"` -> one `(batch, M, N)`.

    The rows are the outputs and the columns the inputs, each in the order of the keys: the
    Jacobian of all outputs, flattened and concatenated, with respect to all inputs likewise.
    """
    rows: dict[str, list[np.ndarray]] = {}
    for key, block in blocks.items():
        if block.ndim != 3:
            raise JacketValueError(
                f"assemble_flat: block {key!r} must be `(batch, out_size, in_size)`. "
                f"Received: shape {block.shape}. Compute it with `flatten=True`."
            )
        rows.setdefault(key.partition("/")[0], []).append(block)
    first = next(iter(rows.values()))
    return flat_matrix([block for row in rows.values() for block in row], len(first))


class ResultWriter:
    """Writes a result of `samples` rows, batch by batch, to `.npy`, `.npz` or `.zarr`, atomically.

    Blocks go to disk as they come (memory-mapped `.npy` files, or zarr chunks), under a hidden
    temporary name in the output's folder; `commit` renames the finished result to `path`. Used as
    a context manager it commits on success and discards everything on an error.

    Args:
      path: `.npy` (a single block), `.npz` or `.zarr` (one array per block).
      samples: rows of every block (the batch axis of the whole result).
      force: replace an existing `path`.
      attrs: JSON-serialisable metadata stored in a zarr group's attributes.

    Example:
      >>> with io.ResultWriter("J.npz", samples=1000) as out:
      ...     for start, stop, xb in io.iter_batches(x, 100):
      ...         out.write(start, io.jacobian_blocks(jacket.jacobian(model, xb), xb, model))
    """

    def __init__(
        self,
        path: str | os.PathLike,
        samples: int,
        *,
        force: bool = False,
        attrs: Mapping[str, Any] | None = None,
    ):
        self.path = Path(path)
        check_output(self.path, force=force)
        self.format = self.path.suffix.lower()
        if self.format == ".zarr":
            optional("zarr", "writing .zarr results")
        self.samples = int(samples)
        self.force = force
        self.attrs = dict(attrs or {})
        self._tmp = self.path.parent / temporary_name(self.path, "part")
        self._arrays: dict[str, Any] = {}
        self._layout: dict[str, tuple[tuple[int, ...], np.dtype]] | None = None
        self._written = 0

    @property
    def layout(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """`{key: (shape, dtype)}` of the whole result, once the first batch is written."""
        return {
            key: ((self.samples, *shape), dtype.name)
            for key, (shape, dtype) in (self._layout or {}).items()
        }

    def write(self, start: int, blocks: Mapping[str, np.ndarray]) -> None:
        """Store rows `start : start + len(block)` of every block (the same keys every time)."""
        blocks = {key: np.asarray(value) for key, value in blocks.items()}
        if self._layout is None:
            self._open(blocks)
        layout = {key: (value.shape[1:], value.dtype) for key, value in blocks.items()}
        if layout != self._layout:
            received = {key: (value.shape, value.dtype.name) for key, value in blocks.items()}
            raise JacketValueError(
                f"ResultWriter.write: every batch must have the blocks of the first, "
                f"{self.layout}. Received: {received}."
            )
        for key, value in blocks.items():
            stop = start + value.shape[0]
            if start < 0 or stop > self.samples:
                raise JacketValueError(
                    f"ResultWriter.write: rows {start}:{stop} lie outside the result's "
                    f"{self.samples} samples."
                )
            self._arrays[key][start:stop] = value
        self._written += next(iter(blocks.values())).shape[0]

    def commit(self) -> Path:
        """Finish the file and give it its final name. Returns `path`."""
        if self._layout is None:
            raise JacketValueError(f"nothing was written for {str(self.path)!r}.")
        if self.format == ".npz":
            self._close_arrays()
            archive = self.path.parent / temporary_name(self.path, "zip")
            try:
                with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                    for i, key in enumerate(self._layout):
                        zf.write(self._tmp / f"{i}.npy", arcname=f"{key}.npy")
                remove(self._tmp)
                self._tmp = archive
            except BaseException:
                remove(archive)
                raise
        else:
            self._close_arrays()
        publish(self._tmp, self.path, force=self.force)
        return self.path

    def discard(self) -> None:
        """Remove everything written so far."""
        self._arrays.clear()
        remove(self._tmp)

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        try:
            if kind is None:
                self.commit()
        finally:
            self.discard()

    def _open(self, blocks: dict[str, np.ndarray]) -> None:
        if not blocks:
            raise JacketValueError("ResultWriter.write: no blocks given.")
        for key in blocks:
            _check_key(key)
        if self.format == ".npy" and len(blocks) != 1:
            raise JacketValueError(
                f"cannot write {len(blocks)} blocks ({', '.join(blocks)}) to {str(self.path)!r}: "
                "an .npy file holds one array. Write .npz or .zarr, or pass --flatten "
                "(`flatten=True`) to store them as one `(batch, out_size, in_size)` matrix."
            )
        self._layout = {key: (value.shape[1:], value.dtype) for key, value in blocks.items()}
        if self.format == ".npy":
            ((shape, dtype),) = self._layout.values()
            self._arrays[next(iter(blocks))] = np.lib.format.open_memmap(
                self._tmp, mode="w+", dtype=dtype, shape=(self.samples, *shape)
            )
        elif self.format == ".npz":
            self._tmp.mkdir()
            for i, (key, (shape, dtype)) in enumerate(self._layout.items()):
                self._arrays[key] = np.lib.format.open_memmap(
                    self._tmp / f"{i}.npy", mode="w+", dtype=dtype, shape=(self.samples, *shape)
                )
        else:
            import zarr

            group = zarr.open_group(store=str(self._tmp), mode="w", zarr_format=3)
            group.attrs.update({**self.attrs, "jacket_blocks": list(self._layout)})
            batch = max(value.shape[0] for value in blocks.values())
            for key, (shape, dtype) in self._layout.items():
                row_bytes = max(1, math.prod(shape) * dtype.itemsize)
                rows = max(1, min(batch, self.samples, _ZARR_CHUNK_BYTES // row_bytes))
                self._arrays[key] = group.create_array(
                    name=key,
                    shape=(self.samples, *shape),
                    chunks=(rows, *shape),
                    dtype=dtype,
                    fill_value=0,
                )

    def _close_arrays(self) -> None:
        if self._written != self.samples:
            raise JacketValueError(
                f"{str(self.path)!r}: {self._written} of {self.samples} rows were written."
            )
        for array in self._arrays.values():
            if isinstance(array, np.memmap):
                array.flush()
        self._arrays.clear()


def write_result(
    path: str | os.PathLike,
    blocks: Mapping[str, np.ndarray] | np.ndarray,
    *,
    force: bool = False,
    attrs: Mapping[str, Any] | None = None,
) -> Path:
    """Write a whole result at once (see `ResultWriter`); an array is stored under `"J"`.

    Returns:
      `path`, written atomically.
    """
    if not isinstance(blocks, Mapping):
        blocks = {SINGLE_KEY: np.asarray(blocks)}
    samples = {np.shape(block)[0] for block in blocks.values()}
    if len(samples) != 1:
        shapes = {key: np.shape(block) for key, block in blocks.items()}
        raise JacketValueError(
            f"write_result: every block must have the same batch axis. Received: {shapes}."
        )
    with ResultWriter(path, samples.pop(), force=force, attrs=attrs) as writer:
        writer.write(0, blocks)
    return Path(path)


def read_result(path: str | os.PathLike, key: str | None = None):
    """Open one block of a result written by jacket (or any `.npy`, `.npz`, zarr file).

    Args:
      path: `.npy` (memory-mapped), `.npz`, or a `.zarr` array or group.
      key: which array of an `.npz` or zarr group; default: the only one, else an error that
        lists the keys.

    Returns:
      `(array, key)`: an array-like (sliceable, lazy for `.npy` and zarr) and the key read
      (`None` for a lone array).
    """
    path = Path(path)
    if not path.exists():
        raise JacketValueError(f"file not found: {str(path)!r}.")
    suffix = path.suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise JacketValueError(
            f"cannot read {str(path)!r}: the suffix must be one of {', '.join(OUTPUT_SUFFIXES)}."
        )
    try:
        if suffix == ".npy":
            return np.load(path, mmap_mode="r", allow_pickle=False), None
        if suffix == ".npz":
            check_archive(path)
            with np.load(path, allow_pickle=False) as archive:
                key = _choose_key(path, list(archive.files), key)
                return archive[key], key
        zarr = optional("zarr", "reading .zarr results")
        node = zarr.open(store=str(path), mode="r")
    except JacketValueError:
        raise
    except Exception as error:  # noqa: BLE001
        raise JacketValueError(
            f"cannot read {str(path)!r}: the file is corrupt, truncated or not an array "
            f"({type(error).__name__}: {error})."
        ) from None
    if hasattr(node, "shape"):
        return node, None
    keys = list(node.attrs.get("jacket_blocks", [])) or _zarr_keys(node)
    key = _choose_key(path, keys, key)
    return node[key], key


def _zarr_keys(group, prefix: str = "") -> list[str]:
    keys = [prefix + name for name, _ in group.arrays()]
    for name, sub in group.groups():
        keys += _zarr_keys(sub, f"{prefix}{name}/")
    return keys


def _choose_key(path: Path, keys: list[str], key: str | None) -> str:
    if key is None:
        if len(keys) == 1:
            return keys[0]
        raise JacketValueError(
            f"{str(path)!r} holds {len(keys)} arrays: pick one with --key (`key=`): "
            f"{', '.join(keys)}."
        )
    if key not in keys:
        raise JacketValueError(
            f"{str(path)!r} has no array {key!r}. Received: key={key!r}; it holds "
            f"{', '.join(keys)}."
        )
    return key
